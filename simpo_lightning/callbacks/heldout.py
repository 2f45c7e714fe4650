"""``HeldOutReport``: held-out evaluation before and after training (reward accuracy and a generation metric)."""

import logging

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from simpo_lightning.data.demo import exact_match
from simpo_lightning.generation.sampling import SamplingConfig, greedy_answers

log = logging.getLogger(__name__)


@torch.no_grad()
def reward_metrics(module: L.LightningModule, loader, device: torch.device) -> dict[str, float]:
    """Over validation pairs: the share whose chosen reward beats the rejected one, the mean reward margin and,
    where the module reports them, the mean log-probs of the chosen and rejected responses (empty for
    unpaired data)."""
    sums, total = {}, 0
    for batch in loader:
        metrics = module.evaluate(move_data_to_device(batch, device))
        if "rewards/accuracies" not in metrics:
            return {}
        for key in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
            if key in metrics:
                sums[key] = sums.get(key, 0.0) + metrics[key].double().sum().item()
        total += metrics["rewards/accuracies"].numel()
    return {key: value / total for key, value in sums.items()}


class HeldOutReport(L.Callback):
    """Measures held-out reward accuracy and, where the data carry reference answers, exact match
    of greedy answers, once before training and once after; logs ``heldout/{before,after}/…`` and
    prints a table. For an online method (its ``held_out``) and data with ``val_prompts``, also the judge's mean
    score of greedy answers to the held-out prompts (``reward``) and, for a verifier, the share right
    (``accuracy``): the numbers its validation logs as ``val/reward`` and ``val/accuracy``.

    Args:
        max_new_tokens: generation budget per answer.
        batch_size: prompts per generation batch.
        examples_shown: how many questions to print with their answers after training.
    """

    def __init__(self, max_new_tokens: int = 16, batch_size: int = 16, examples_shown: int = 5):
        self.sampling = SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
        self.examples_shown = examples_shown
        self.results: dict[str, dict[str, float]] = {}
        self.samples: list[tuple[str, str, str]] = []  # (end of prompt, answer, reference) after the last measure

    def measure(self, trainer: L.Trainer, module: L.LightningModule, when: str) -> None:
        was_training = module.training
        module.eval()
        data = trainer.datamodule
        with trainer.precision_plugin.forward_context():
            result = reward_metrics(module, data.val_dataloader(), module.device)
            examples = data.generation_examples("val") if getattr(module, "generative", True) else []
            answered = self.made_at_this_step(trainer, module)
            if examples:
                answers = self.answers_to(module, [p for p, _ in examples], answered)
                result["exact_match"] = sum(exact_match(a, r) for a, (_, r) in zip(answers, examples)) / len(examples)
                self.samples = [
                    (module.tokenizer.decode(p, skip_special_tokens=True).strip()[-60:], a, r)
                    for (p, r), a in zip(examples, answers)
                ]
            rows = getattr(data, "val_prompts", None)
            if hasattr(module, "held_out") and rows:  # online methods: what they optimise, on held-out prompts
                result |= module.held_out(rows, self.answers_to(module, [r.tokens for r in rows], answered))
        module.train(was_training)
        self.results[when] = result
        for logger in trainer.loggers:
            logger.log_metrics({f"heldout/{when}/{k}": v for k, v in result.items()}, step=trainer.global_step)
        if trainer.is_global_zero:
            print(f"held-out {when} training: " + ", ".join(f"{k} = {v:.3f}" for k, v in result.items()), flush=True)

    def answers(self, module: L.LightningModule, prompts: list[list[int]]) -> list[str]:
        return greedy_answers(module.model, module.tokenizer, prompts, self.sampling)

    def answers_to(self, module: L.LightningModule, prompts: list[list[int]], answered: dict) -> list[str]:
        """The greedy answer to each prompt: from ``answered`` (prompt tokens to answer) where it is there, else
        made now and added to it, so that no prompt is answered twice in one measure."""
        missing = [p for p in prompts if tuple(p) not in answered]
        if missing:
            answered.update(zip(map(tuple, missing), self.answers(module, missing)))
        return [answered[tuple(p)] for p in prompts]

    def made_at_this_step(self, trainer: L.Trainer, module: L.LightningModule) -> dict[tuple[int, ...], str]:
        """The greedy answers an online module made at this step and length (its validation at the last step), to
        reuse; none otherwise."""
        step, length, made = getattr(module, "greedy_made", None) or (None, None, {})
        return dict(made) if (step, length) == (trainer.global_step, self.sampling.max_new_tokens) else {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(trainer, pl_module, "before")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.measure(trainer, pl_module, "after")
        before, after = self.results["before"], self.results["after"]
        lines = ["", f"{'held-out metric':<22}{'before':>10}{'after':>10}"]
        lines += [f"{k:<22}{before[k]:>10.3f}{after[k]:>10.3f}" for k in after]
        for prompt, answer, reference in self.samples[: self.examples_shown]:
            lines.append(f"  …{prompt!r} -> {answer.strip()!r} (reference {reference!r})")
        if trainer.is_global_zero:
            print("\n".join(lines), flush=True)
