"""The ``simpo-lightning`` command.

``fit``, ``validate`` and ``test`` are LightningCLI's: they run any LightningModule and
LightningDataModule that the YAML names by ``class_path`` (``model:`` and ``data:``); a section without
``class_path`` is ``SimPOModule`` / ``PreferenceDataModule``, so plain configs stay as they are. The
other commands are functions registered in ``COMMANDS``: their typed signature is their ``--help``, and
each takes ``--config`` with the same options in a YAML file.
"""

import importlib
import inspect
import json
import logging
import signal
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from simpo_lightning.errors import UserError, reported
from simpo_lightning.loggers import WandbLogger  # noqa: F401  (its class path in configs written before loggers.py)

# Name -> "module:function". Each function's typed signature and docstring make its options and --help.
COMMANDS = {
    "estimate": "simpo_lightning.estimate.command:estimate",
    "evaluate": "simpo_lightning.evaluation.evaluate:evaluate",
    "export": "simpo_lightning.models.export:export",
    "generate": "simpo_lightning.generation.commands:generate",
    "inspect": "simpo_lightning.estimate.inspect:inspect",
    "pairs": "simpo_lightning.generation.commands:pairs",
    "rounds": "simpo_lightning.rounds:rounds",
}
TRAINER_COMMANDS = ("fit", "validate", "test")  # LightningCLI's; its predict has nothing to predict here: generate
DEFAULT_MODULE = "simpo_lightning.methods.SimPOModule"
DEFAULT_DATA = "simpo_lightning.data.PreferenceDataModule"


def run_dir(trainer: Trainer) -> Path:
    """The folder ModelCheckpoint writes ``checkpoints/`` into (same rule as Lightning's)."""
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version


class SaveConfig(SaveConfigCallback):
    """Writes the resolved config beside the run's checkpoints and logs it as hyperparameters."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        text = self.parser.dump(self.config, skip_none=False)
        if trainer.is_global_zero:
            folder = run_dir(trainer)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / self.config_filename).write_text(text)
        for logger in trainer.loggers:
            logger.log_hyperparams(yaml.safe_load(text))


def check_checkpoint(path: Path, option: str) -> None:
    """A one-line error unless ``path`` is a checkpoint Lightning can read: a file in torch's zip format or a
    sharded (distributed) checkpoint folder, which holds a ``.metadata`` file."""
    if not path.exists():
        raise UserError(f"{option} {path}: no such checkpoint file or folder")
    if path.is_dir() and not (path / ".metadata").is_file():
        raise UserError(f"{option} {path}: a folder, but not a sharded checkpoint (no .metadata file in it)")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise UserError(f"{option} {path}: not a checkpoint file (truncated or corrupt?); use another, or start afresh")


def find_last_checkpoint(trainer: Trainer) -> Path | None:
    """The newest ``last*.ckpt`` of any earlier run logged beside this one (same logger folder)."""
    found = list(run_dir(trainer).parent.glob("*/checkpoints/last*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class EndAllProcesses(Callback):
    """Ends the other processes of a run that Lightning launched when this one fails, so they do not
    wait at a barrier for a process that is gone. (When another process fails, Lightning's own
    observer in this first process ends them all.)"""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

        launcher = trainer.strategy.launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            launcher.kill(signal.SIGKILL)


class SimPOCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODULE}, "data": {"class_path": DEFAULT_DATA}})
        # Every module of this package loads its tokenizer; the data pipeline tokenises with it.
        parser.link_arguments("model.tokenizer", "data.init_args.tokenizer", apply_on="instantiate")
        parser.add_argument(
            "--estimate",
            type=bool,
            default=False,
            help="before training, print the predicted peak memory per device (simpo-lightning estimate)",
        )

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of --ckpt_path here, the first time it opens the file: checked first
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path not in (None, "last", "best", "hpc", "registry"):
            check_checkpoint(Path(ckpt_path), "--ckpt_path")
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        if self.config[self.subcommand].get("estimate") and self.trainer.is_global_zero:
            self.print_estimate()
        # Lightning looks for ``ckpt_path: last`` only in this run's new version folder, where nothing is
        # saved yet; an interrupted run's checkpoint is in an earlier version folder beside it.
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            found = find_last_checkpoint(self.trainer)
            if found is None:
                raise UserError(
                    f"--ckpt_path last: no checkpoints/last*.ckpt under {run_dir(self.trainer).parent}; "
                    "run without --ckpt_path to start afresh"
                )
            print(f"resuming from {found}")
            config["ckpt_path"] = str(found)

    def print_estimate(self) -> None:
        """``estimate --brief`` of this run's resolved config, in a process of its own (fake tensors, a fake process
        group); the device's memory where there is a GPU."""
        import subprocess
        import tempfile

        import torch

        text = self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else 0
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            file.write(text)
            file.flush()
            command = [
                sys.executable,
                "-m",
                "simpo_lightning.cli",
                "estimate",
                "--config",
                file.name,
                "--brief",
                "true",
            ]
            result = subprocess.run(command + ["--device_memory_gb", str(memory)], capture_output=True, text=True)
        lines = [line for line in result.stdout.splitlines() if line.startswith("estimate:")]
        print(lines[-1] if lines else f"estimate failed: {(result.stdout + result.stderr).strip().splitlines()[-1:]}")


@contextmanager
def _only_args(args: list[str] | None):
    """LightningCLI reads ``sys.argv`` as well when given ``args`` (and warns); with ``args`` it reads those alone."""
    saved = sys.argv
    if args is not None:
        sys.argv = sys.argv[:1]
    try:
        yield
    finally:
        sys.argv = saved


def nulls_as_dicts(args: list[str]) -> list[str]:
    """``--model.loss.beta null`` as ``--model '{"init_args": {"loss": {"beta": null}}}'``, which means the same.
    jsonargparse 4.53 turns ``null`` given to a field two levels into a ``class_path`` section into the string
    ``'None'`` (it re-formats the parsed value with an f-string); the dict form merges into the section
    correctly. Other arguments pass unchanged."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        key, has_value, value = arg.partition("=")
        if not has_value and i + 1 < len(args):
            value = args[i + 1]
        parts = key.removeprefix("--").split(".")
        if parts[0] in ("model", "data") and len(parts) > 2 and key.startswith("--") and value.strip() in ("null", "~"):
            path = [p for p in parts[1:] if p != "init_args"] if parts[1] == "init_args" else parts[1:]
            nested = None
            for part in reversed(path):
                nested = {part: nested}
            out += [f"--{parts[0]}", json.dumps({"init_args": nested})]
            i += 1 if has_value else 2
            continue
        out.append(arg)
        i += 1
    return out


def cli_main(args: list[str] | None = None) -> SimPOCLI:
    """The fit/validate/test commands (LightningCLI) on ``args``, or on ``sys.argv`` when None."""
    from simpo_lightning._compat import migrated

    if args is None:
        sys.argv[1:] = nulls_as_dicts(migrated(sys.argv[1:]))
    else:
        args = nulls_as_dicts(migrated(args))
    with _only_args(args):
        return SimPOCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfig,
            save_config_kwargs={"save_to_log_dir": False},
            seed_everything_default=0,
            trainer_defaults={"callbacks": [EndAllProcesses()]},
            parser_kwargs={"exit_on_error": False},  # errors come back as exceptions, reported as one line
            args=args,
        )


def run_function(name: str, args: list[str]) -> None:
    """One of ``COMMANDS``: its options from its signature, or from ``--config`` YAML."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    module, _, attribute = COMMANDS[name].partition(":")
    function = getattr(importlib.import_module(module), attribute)
    parser = ArgumentParser(
        prog=f"simpo-lightning {name}", description=function.__doc__.split("\n")[0], exit_on_error=False
    )
    own_config = "config" in inspect.signature(function).parameters  # a file it reads itself (estimate: a fit config)
    if not own_config:
        parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_function_arguments(function, as_positional=False)
    options = parser.instantiate_classes(parser.parse_args(args)).as_dict()
    if not own_config:
        options.pop("config", None)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    function(**options)


def overview() -> str:
    lines = [
        "usage: simpo-lightning <command> [--config FILE] [options]",
        "",
        "Training and evaluation on a LightningModule and LightningDataModule (LightningCLI; default SimPOModule",
        "and PreferenceDataModule, others by class_path in the YAML):",
        "  " + ", ".join(TRAINER_COMMANDS),
        "",
        "Other commands:",
    ]
    for name, target in COMMANDS.items():
        module, _, attribute = target.partition(":")
        lines.append(f"  {name:<10} {getattr(importlib.import_module(module), attribute).__doc__.splitlines()[0]}")
    return "\n".join(lines + ["", "Options of a command: simpo-lightning <command> --help"])


def main(args: list[str] | None = None) -> None:
    """Console entry point (``simpo-lightning``); returns None so the exit status is 0. User errors are one
    line (``simpo_lightning.errors``)."""
    command = sys.argv[1:] if args is None else args
    with reported():
        if command[:1] and command[0] in COMMANDS:
            run_function(command[0], command[1:])
        elif not command or command[0] in ("-h", "--help"):
            print(overview())
        elif command[0] in TRAINER_COMMANDS or command[0].startswith("-"):
            cli_main(args)  # None: sys.argv, which Lightning also uses to launch the other processes of a run
        else:
            hint = " (`generate` answers prompts with a model or checkpoint)" if command[0] == "predict" else ""
            names = ", ".join([*TRAINER_COMMANDS, *COMMANDS])
            raise UserError(f"no command {command[0]!r}{hint}; the commands are {names} (simpo-lightning --help)")


if __name__ == "__main__":
    main()
