"""GenerationMonitor: what the answers look like while training (off unless added to ``trainer.callbacks``).

Every ``every_n_validations`` validations the policy answers a fixed small set of prompts greedily, and the
callback logs ``monitor/…``: mean length in characters and tokens, the share that hit ``max_new_tokens``,
the share with a repeated word 4-gram and distinct-2 (as ``evaluate`` defines them), and with a judge the
win rate of the current answers against the answers at the start of training (``monitor/win_rate_vs_start``).
A preference run whose answers only grow longer or start repeating shows it here before the end.

Under ModelParallelStrategy every process generates the same answers in lockstep (``synced_gpus``), as
the sharded model's forward needs all of them.

    trainer:
      callbacks:
        - class_path: simpo_lightning.callbacks.GenerationMonitor
          init_args: {max_prompts: 16, max_new_tokens: 64, every_n_validations: 1}
"""

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from simpo_lightning.evaluation.comparison import judge_outcomes, response_stats
from simpo_lightning.generation.commands import read_prompts
from simpo_lightning.generation.judges import Judge, PairwiseJudge
from simpo_lightning.generation.sampling import SamplingConfig, sample_responses


class GenerationMonitor(L.Callback):
    """Logs length, repetition and (with a judge) win rate against the start, of greedy answers during training.

    Args:
        prompts: where the prompts are (as ``generate`` takes them); None: the validation split's prompts.
        max_prompts: how many prompts (the first distinct ones).
        max_new_tokens: tokens per answer at most.
        every_n_validations: measure at every n-th validation (and once before training).
        judge: a ``Judge`` or ``PairwiseJudge`` for the win rate against the first answers; None: no win rate.
        batch_size: sequences per generation batch.
    """

    def __init__(
        self,
        prompts: str | None = None,
        max_prompts: int = 16,
        max_new_tokens: int = 64,
        every_n_validations: int = 1,
        judge: Judge | PairwiseJudge | None = None,
        batch_size: int = 16,
    ):
        self.source, self.max_prompts, self.every = prompts, max_prompts, every_n_validations
        self.judge = judge
        self.sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.validations = 0
        self.start: dict[str, dict] | None = None  # the answers before training, keyed like evaluate's rows
        self.history: list[dict[str, float]] = []

    def _prompts(self, trainer: L.Trainer, module: L.LightningModule) -> list[tuple[list[int], object, str | None]]:
        if self.source is not None:
            rows = read_prompts(self.source, module.tokenizer)[: self.max_prompts]
            return [(r.tokens, r.prompt, r.reference) for r in rows]
        items = trainer.datamodule.generation_examples("val", with_reference=False)[: self.max_prompts]
        return [(list(p), module.tokenizer.decode(p, skip_special_tokens=True), r) for p, r in items]

    def answers(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, dict]:
        prompts = self._prompts(trainer, module)
        synced = trainer.world_size > 1 and module.device_mesh is not None
        with trainer.precision_plugin.forward_context():
            samples = sample_responses(
                module.model, module.tokenizer, [p for p, _, _ in prompts], self.sampling, synced_gpus=synced
            )
        return {
            str(i): {
                "prompt": prompt,
                "reference": reference,
                "responses": [module.tokenizer.decode(s.tokens, skip_special_tokens=True) for s in sample],
                "response_tokens": [len(s.tokens) for s in sample],
                "finish_reasons": [s.finish_reason for s in sample],
            }
            for i, ((_, prompt, reference), sample) in enumerate(zip(prompts, samples))
        }

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        current = self.answers(trainer, module)
        if self.start is None:
            self.start = current
        stats = response_stats(list(current.values()))
        metrics = {k: float(v) for k, v in stats.items() if v is not None}
        if self.judge is not None:
            outcomes, _ = judge_outcomes(self.judge, list(current), current, self.start, {})
            metrics["win_rate_vs_start"] = outcomes.mean().item()
        return metrics

    def record(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        metrics = self.measure(trainer, module)
        self.history.append({"step": trainer.global_step, **metrics})
        for logger in trainer.loggers:
            logger.log_metrics({f"monitor/{k}": v for k, v in metrics.items()}, step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is None:  # a resumed run measured its start before
            self.record(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.validations += 1
        if self.validations % self.every == 0:
            self.record(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"validations": self.validations, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.validations, self.start = state["validations"], state["start"]


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, which describes a run bounded by ``max_steps`` (where Lightning sets
    ``max_epochs`` to -1) as "Epoch 0/-2": here "Epoch 0 · max_steps N" instead."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch} · max_steps {self.trainer.max_steps}"
        return f"{description:{len(self.validation_description)}}"
