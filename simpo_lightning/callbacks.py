"""Callbacks: held-out evaluation before and after training (reward accuracy and a generation metric),
peak memory, and returning freed memory to the OS on CPU."""

import ctypes
import ctypes.util
import logging

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from simpo_lightning.demo import exact_match
from simpo_lightning.generation import SamplingConfig, greedy_answers

log = logging.getLogger(__name__)


@torch.no_grad()
def reward_metrics(module: L.LightningModule, loader, device: torch.device) -> dict[str, float]:
    """Over validation pairs: the share whose chosen reward beats the rejected one, the mean reward margin and,
    where the module reports them, the mean log-probs of the chosen and rejected responses (empty for
    unpaired data)."""
    sums, total = {}, 0
    for batch in loader:
        _, metrics = module.step(move_data_to_device(batch, device))
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
    prints a table. For a module with a judge (online methods) and data with ``val_prompts``, also the
    judge's mean score of greedy answers to the held-out prompts (``judge_score``).

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
            answered: dict[tuple[int, ...], str] = {}
            if examples:
                answers = greedy_answers(module.model, module.tokenizer, [p for p, _ in examples], self.sampling)
                answered = {tuple(p): a for (p, _), a in zip(examples, answers)}
                result["exact_match"] = sum(exact_match(a, r) for a, (_, r) in zip(answers, examples)) / len(examples)
                self.samples = [
                    (module.tokenizer.decode(p, skip_special_tokens=True).strip()[-60:], a, r)
                    for (p, r), a in zip(examples, answers)
                ]
            judge, rows = getattr(module, "judge", None), getattr(data, "val_prompts", None)
            if judge is not None and rows:  # online methods: what they optimise, on held-out prompts
                missing = [r.tokens for r in rows if tuple(r.tokens) not in answered]  # answered above: not again
                if missing:
                    answers = greedy_answers(module.model, module.tokenizer, missing, self.sampling)
                    answered |= {tuple(p): a for p, a in zip(missing, answers)}
                answers = [answered[tuple(r.tokens)] for r in rows]
                scores = judge([r.prompt for r in rows], answers, [r.reference for r in rows])
                result["judge_score"] = sum(scores) / len(scores)
        module.train(was_training)
        self.results[when] = result
        for logger in trainer.loggers:
            logger.log_metrics({f"heldout/{when}/{k}": v for k, v in result.items()}, step=trainer.global_step)
        if trainer.is_global_zero:
            print(f"held-out {when} training: " + ", ".join(f"{k} = {v:.3f}" for k, v in result.items()), flush=True)

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


class PeakMemory(L.Callback):
    """Prints and logs the peak memory of training when it ends: GPU memory allocated by PyTorch on
    CUDA, else the process's peak resident memory."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            kind, gb = "gpu_allocated", torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        else:
            import resource

            kind, gb = "cpu_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        for logger in trainer.loggers:
            logger.log_metrics({f"peak_memory_gb/{kind}": gb}, step=trainer.global_step)
        print(f"PEAK_MEMORY_GB {kind} rank {trainer.global_rank} {gb:.3f}", flush=True)


def return_freed_memory(threshold_mb: int = 1) -> bool:
    """Make glibc's malloc serve every block of at least ``threshold_mb`` MiB straight from the OS and
    give it back when freed (``mallopt(M_MMAP_THRESHOLD)``). Returns False where that is not possible
    (not glibc). Affects allocations made after the call, in this process only."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return libc.mallopt(m_mmap_threshold, threshold_mb << 20) == 1


class ReturnFreedMemory(L.Callback):
    """CPU training: stop glibc's malloc from keeping freed tensors' memory.

    By default glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so
    later activations, logits chunks and gradients of varying sizes come from its heap, which
    fragments and is rarely returned: on SmolLM2-135M full fine-tuning (batch 4, 512 tokens, gradient
    checkpointing, optimizer in backward) the process's peak resident memory was 3.4 GB with the
    default and 2.4 GB with a fixed 1 MiB threshold, at about the same step time (README,
    Performance). Each block of at least ``threshold_mb`` then costs fresh page faults. Without
    glibc this warns and does nothing.
    """

    def __init__(self, threshold_mb: int = 1):
        self.threshold_mb = threshold_mb

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # setup runs before configure_model, so the model's weights are allocated under the new setting.
        if not return_freed_memory(self.threshold_mb):
            log.warning("ReturnFreedMemory: this C library has no glibc mallopt; the allocator is unchanged")
