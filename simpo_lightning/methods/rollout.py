"""RolloutModule: the one base of the online methods (``GRPOModule``, ``RLOOModule``, ``PPOModule``), on a prompt
DataModule (``data.PromptDataModule``), with manual optimisation.

A training step is one rollout: sample ``sampling.n`` completions of each prompt and judge them (``sample``); the
method's advantages (``advantages``); then ``update.num_iterations`` passes of ``update.updates_per_rollout``
optimizer steps, each accumulated over micro-batches (the method's ``micro_loss``) and clipped by hand. A method
plugs in as a subclass with those two pieces and a config of its own fields; the base never asks which method it
runs. Steps, the schedule and checkpoints count rollouts; sampling and update order are seeded by the rollout
index, so a resumed run repeats an uninterrupted one; group statistics stay exact with several processes.
Everything it logs, and why: docs/online.md.
"""

import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from simpo_lightning.data.batch import PairBatch, pad_right
from simpo_lightning.data.prompts import PromptBatch, PromptRow
from simpo_lightning.errors import UserError, require
from simpo_lightning.generation.judges import Judge, Prompt, RuleJudge
from simpo_lightning.generation.sampling import SamplingConfig, derived_seed, greedy_answers, sample_responses
from simpo_lightning.methods.base import TrainingModule, pair_reward_metrics
from simpo_lightning.methods.reference import Reference, ReferenceConfig
from simpo_lightning.models.loading import LoraConfig, PolicyConfig, build_policy
from simpo_lightning.scoring.sequences import score_completions, score_pair_batch

HELD_OUT = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
HELD_OUT += ["logps/chosen", "logps/rejected"]


@dataclass
class UpdateConfig:
    """How a rollout updates the policy, whatever the method: passes, optimizer steps, micro-batches, the clip
    range of the probability ratio, gradient clipping."""

    epsilon: float = 0.2
    """Clip range below 1 (and above, unless epsilon_high); PPO's cliprange."""
    epsilon_high: float | None = None
    """Clip range above 1; None: epsilon (DAPO recommends 0.28)."""
    num_iterations: int = 1
    """Passes over each rollout (TRL's GRPO μ, PPO's num_ppo_epochs); more than 1 reuses samples, so the ratio
    moves off 1."""
    updates_per_rollout: int = 1
    """Optimizer steps per pass, each on an equal share of the rollout (PPO's num_mini_batches)."""
    micro_batch_size: int = 16
    """Completions per forward and backward pass (gradients accumulate over a share's micro-batches)."""
    shared_prompt: bool = True
    """Score a prompt's completions in one sequence, the prompt once (``scoring.score_completions``)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global norm before each optimizer step; None: no clipping."""
    log_completions_steps: int = 10
    """Every this many rollouts, a W&B table of the first prompts' completions; 0: never."""

    def __post_init__(self) -> None:
        for name in ("epsilon", "epsilon_high"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"model.update.{name} = {value}: must be ≥ 0")
        for name in ("num_iterations", "updates_per_rollout", "micro_batch_size"):
            require(getattr(self, name) >= 1, f"model.update.{name} = {getattr(self, name)}: must be ≥ 1")
        norm = self.max_grad_norm
        require(norm is None or norm > 0, f"model.update.max_grad_norm = {norm}: must be > 0, or null for no clipping")


@dataclass
class Rollout:
    """N completions of one rollout. Tensors ``[N]`` or ``[N, T]`` (completions right-padded, with the
    end-of-sequence token where the completion ended); what ``advantages`` adds is None before it runs.

    Attributes:
        prompts: each completion's prompt tokens.
        completions, mask: ``[N, T]``, the tokens and 1 on them.
        ended: ``[N]``, True where the completion ended with end-of-sequence.
        rewards: ``[N]``, the judge's scores.
        texts: (prompt as the source gives it, decoded completion) of each completion, for the completions table.
        advantages: ``[N]`` or ``[N, T]``.
        old_logps, ref_logps: ``[N, T]``, the policy's at sampling (where the update reuses samples) and the
            reference's (where the method has a KL term).
    """

    prompts: list[list[int]]
    completions: Tensor
    mask: Tensor
    ended: Tensor
    rewards: Tensor
    texts: list[tuple[Prompt, str]]
    advantages: Tensor | None = None
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None

    def take(self, rows: Tensor) -> tuple[list[list[int]], Tensor, Tensor]:
        """The prompts, completions and (float) mask of ``rows``, cut to their longest completion."""
        width = int(self.mask[rows].sum(-1).max())
        return [self.prompts[i] for i in rows.tolist()], self.completions[rows, :width], self.mask[rows, :width].float()


class RolloutModule(TrainingModule):
    """The online base (module docstring). A method subclasses it with ``advantages``, ``micro_loss`` and, where it
    has a KL term, ``kl_weight`` (0: no reference model is loaded).

    Args:
        policy: which model to load and how.
        lora: LoRA adapters; null trains every weight.
        sampling: rollouts: ``n`` samples per prompt, temperature (> 0), top-p, completion length.
        judge: scores completions (``class_path`` in YAML); None: ``RuleJudge``, the demo's rule.
        reference: the reference model when the method has a KL term (with LoRA: the policy with its adapters off).
        update: how each rollout updates the policy (``UpdateConfig``).
        optimizer: optimizer class and arguments, called with the trainable parameters.
        val_samples: at each validation, besides the greedy answers, this many samples of each held-out prompt at
            the sampling temperature, judged: ``val/sampled/reward`` (their mean) and, for a verifier,
            ``val/sampled/accuracy``; the same seeds at every validation. 0: greedy answers only.
        **training: the settings every training module shares (``TrainingModule``; its schedule counts rollouts,
            and ``optimizer_in_backward`` does not apply: the update steps by hand).
    """

    metrics = HELD_OUT
    min_samples: int = 2
    """Samples per prompt a method needs (a group baseline needs 2)."""
    kl_weight: float = 0.0

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        sampling: SamplingConfig = SamplingConfig(n=8, temperature=1.0, max_new_tokens=16),
        judge: Judge | None = None,
        reference: ReferenceConfig = ReferenceConfig(),
        update: UpdateConfig = UpdateConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        val_samples: int = 0,
        **training,
    ):
        super().__init__(policy, lora, optimizer, **training)
        require(val_samples >= 0, f"model.val_samples = {val_samples}: must be ≥ 0 (0: greedy answers only)")
        require(
            not self.optimizer_in_backward,
            "model.optimizer_in_backward does not apply to online methods: their update steps the optimizer by hand",
        )
        require(
            sampling.n >= self.min_samples,
            f"sampling.n = {sampling.n}: {type(self).__name__} needs {self.min_samples} or more samples per prompt"
            + (" (its baseline is the group's)" if self.min_samples > 1 else ""),
        )
        require(sampling.temperature > 0, "online sampling needs sampling.temperature > 0 (it samples, never greedy)")
        self.automatic_optimization = False
        self.sampling, self.update_config, self.val_samples = sampling, update, val_samples
        self.epsilon_high = update.epsilon if update.epsilon_high is None else update.epsilon_high
        self.judge = judge if judge is not None else RuleJudge()
        self.reference = Reference(reference, lora=lora is not None)
        self.rollouts = 0  # rollout iterations begun, skipped ones included (they seed sampling)
        self.rollout_stats: dict[str, Tensor] = {}  # logged with the step's metrics
        # The greedy answers ``held_out`` made last: (step, max_new_tokens, {prompt tokens: answer}), so that
        # HeldOutReport's "after" reuses the last validation's instead of making them again.
        self.greedy_made: tuple[int, int, dict[tuple[int, ...], str]] | None = None

    def build_model(self) -> nn.Module:
        model = build_policy(self.policy, self.lora)
        if self.kl_weight:
            self.reference.build(model)
        return model

    def shard_parts(self) -> None:
        self.reference.shard(self.sharded)

    def on_fit_start(self) -> None:
        if str(self.trainer.precision).startswith("16"):
            raise UserError(f"{type(self).__name__} steps its optimizer by hand: use precision bf16-mixed or 32-true")

    # ------------------------------------------------------------------ what a method provides

    def advantages(self, rollout: Rollout) -> Rollout:
        """The rollout with its advantages and the log-probs the update needs (old, reference); statistics
        of the rollout itself go to ``rollout_stats``."""
        raise NotImplementedError

    def micro_loss(self, rollout: Rollout, rows: Tensor, sequences: int, tokens: float) -> tuple[Tensor, dict]:
        """One micro-batch's share of its update's loss (``rows`` of a share of ``sequences`` completions holding
        ``tokens`` tokens over all processes), and statistics as weighted sums with their ``weight``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ rollout

    def logps(self, model: nn.Module, prompts: list[list[int]], completions: Tensor, mask: Tensor) -> Tensor:
        """Per-token log-probs ``[n, T]`` of completions at the sampling temperature."""
        pad, temperature = self.tokenizer.pad_token_id, self.sampling.temperature
        return score_completions(
            model, prompts, completions, mask, pad, self.chunk, temperature, self.update_config.shared_prompt
        )

    @torch.no_grad()
    def no_grad_per_token(self, function, rollout: Rollout) -> Tensor:
        """``function(prompts, completions, mask)`` (per-token values ``[n, T']``) over the whole rollout, a
        micro-batch at a time and without gradients, as ``[N, T]``."""
        size, mask = self.update_config.micro_batch_size, rollout.mask
        parts = [
            function(rollout.prompts[s : s + size], rollout.completions[s : s + size], mask[s : s + size])
            for s in range(0, len(mask), size)
        ]
        return torch.cat([nn.functional.pad(p, (0, mask.shape[1] - p.shape[1])) for p in parts])

    @property
    def reuses_samples(self) -> bool:
        """Whether an update sees each sample more than once (passes or steps), so the ratio moves off 1."""
        return self.update_config.num_iterations > 1 or self.update_config.updates_per_rollout > 1

    def old_and_reference_logps(self, rollout: Rollout) -> tuple[Tensor | None, Tensor | None]:
        """The policy's log-probs at sampling where the update needs them (it reuses samples, or has a KL term),
        and the reference's where it has a KL term; None where not needed."""
        old = self.rollout_logps(rollout) if self.reuses_samples or self.kl_weight else None
        return old, self.rollout_logps(rollout, reference=True) if self.kl_weight else None

    def rollout_logps(self, rollout: Rollout, reference: bool = False) -> Tensor:
        """Per-token log-probs ``[N, T]`` of the rollout's completions without gradients, under the policy or
        (``reference``) the reference model."""

        def under(model: nn.Module) -> Tensor:
            return self.no_grad_per_token(partial(self.logps, model), rollout)

        return self.reference.apply(self.model, under) if reference else under(self.model)

    def sample(self, batch: PromptBatch) -> Rollout | None:
        """Completions of the batch's prompts and their judge scores (``rewards``), no advantages yet; None when
        a score is not finite (in any process)."""
        g, eos = self.sampling.n, self.tokenizer.eos_token_id
        sampling = replace(self.sampling, seed=derived_seed(self.sampling.seed, self.rollouts, bits=62))
        samples = [s for group in sample_responses(self.model, self.tokenizer, batch.tokens, sampling) for s in group]
        tokens = [s.tokens + [eos] * (s.finish_reason == "stop") for s in samples]
        completions = pad_right(tokens, self.tokenizer.pad_token_id).to(self.device)
        mask = pad_right([[1] * len(t) for t in tokens], 0).to(self.device)
        texts = [self.tokenizer.decode(s.tokens, skip_special_tokens=True) for s in samples]
        scores = self.judge(repeat(batch.prompts, g), texts, repeat(batch.references, g), finite=False)
        rewards = torch.tensor(scores, dtype=torch.float32, device=self.device)
        if not self.trainer.strategy.reduce_boolean_decision(bool(rewards.isfinite().all()), all=True):
            return None
        ended = torch.tensor([s.finish_reason == "stop" for s in samples], device=self.device)
        return Rollout(
            prompts=repeat(batch.tokens, g),
            completions=completions,
            mask=mask,
            ended=ended,
            rewards=rewards,
            texts=list(zip(repeat(batch.prompts, g), texts)),
        )

    # ------------------------------------------------------------------ update

    def training_step(self, batch: PromptBatch, batch_idx: int) -> None:
        start = time.perf_counter()
        self.rollout_stats = {}
        rollout = self.sample(batch)
        self.rollouts += 1
        if rollout is None:
            self.skip_nonfinite(torch.tensor(float("nan")), "judge reward")
            return None
        rollout = self.advantages(rollout)
        self.nonfinite_in_a_row = 0
        sampled = time.perf_counter()
        stats = self.update(rollout)
        seconds = time.perf_counter() - start
        lengths = rollout.mask.sum(-1).float()
        metrics = {
            "reward_std": self.reduced_std(rollout.rewards),
            "completions/mean_length": lengths.mean(),
            "completions/min_length": lengths.min(),
            "completions/max_length": lengths.max(),
            "completions/clipped_ratio": 1 - rollout.ended.float().mean(),
            "samples_per_sec": torch.tensor(len(rollout.prompts) * self.trainer.world_size / seconds),
            "rollout_seconds": torch.tensor(sampled - start),
            "update_seconds": torch.tensor(seconds - (sampled - start)),
            "nonfinite_steps": torch.tensor(float(self.nonfinite_steps)),
            **stats,
            **self.rollout_stats,
        }
        if self.sampling.n > 1:  # groups whose samples all got the same reward: no signal from them
            groups = rollout.rewards.view(-1, self.sampling.n)
            metrics["frac_reward_zero_std"] = (groups.std(1) < 1e-8).float().mean()
        self.log("train/reward", self.reduced_mean(rollout.rewards).float(), prog_bar=True)
        self.log_dict({f"train/{k}": v.float() for k, v in metrics.items()}, sync_dist=True)
        self._log_completions(rollout)
        return None

    def update(self, rollout: Rollout) -> dict[str, Tensor]:
        """The optimizer steps on one rollout; returns the update's mean loss and the method's statistics."""
        config, optimizer = self.update_config, self.optimizers()
        n = len(rollout.prompts)
        generator = torch.Generator().manual_seed(derived_seed(self.sampling.seed, self.rollouts, "order", bits=62))
        shuffled = config.num_iterations > 1 or config.updates_per_rollout > 1
        per_update = -(-n // config.updates_per_rollout)
        sums: dict[str, Tensor] = {}
        g = self.sampling.n
        for iteration in range(config.num_iterations):
            # shuffled by whole groups, so that a micro-batch scores a prompt's completions together
            groups = torch.randperm(n // g, generator=generator) if shuffled else torch.arange(n // g)
            order = (groups[:, None] * g + torch.arange(g)).flatten()
            shares = order.split(per_update)
            for u, share in enumerate(shares):
                tokens = rollout.mask[share.to(self.device)].sum().float()
                if self.trainer.world_size > 1:  # DAPO: tokens of every process; DDP then averages the gradients
                    tokens = self.trainer.strategy.reduce(tokens, reduce_op="mean")
                for micro in share.split(config.micro_batch_size):
                    loss, parts = self.micro_loss(rollout, micro.to(self.device), len(share), tokens.item())
                    self.manual_backward(loss)
                    for key, value in {"loss": loss.detach(), **parts}.items():
                        sums[key] = sums.get(key, 0.0) + value
                if config.max_grad_norm is not None:
                    params = [p for group in optimizer.param_groups for p in group["params"]]
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                if iteration == config.num_iterations - 1 and u == len(shares) - 1:
                    optimizer.step()  # through Lightning's wrapper, which counts it: one counted step per rollout
                else:
                    optimizer.optimizer.step()
                optimizer.zero_grad()
        self.lr_schedulers().step()
        steps = config.num_iterations * len(shares)
        out = {"loss": sums.pop("loss") / steps}
        weight = sums.pop("weight")
        return out | {key: value / weight for key, value in sums.items()}

    def _log_completions(self, rollout: Rollout) -> None:
        every = self.update_config.log_completions_steps
        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
        if not (every and loggers and self.trainer.is_global_zero and (self.rollouts - 1) % every == 0):
            return
        rows = [
            [self.rollouts, prompt_text(prompt)[-200:], text, reward, advantage]
            for (prompt, text), reward, advantage in zip(
                rollout.texts, rollout.rewards.tolist(), rollout.advantages.tolist()
            )
        ][: 2 * self.sampling.n]
        for logger in loggers:
            columns = ["rollout", "prompt", "completion", "reward", "advantage"]
            logger.log_table("completions", columns=columns, data=rows, step=self.global_step)

    # ------------------------------------------------------------------ held-out prompts and pairs, checkpoints

    @torch.no_grad()
    def held_out(self, rows: list[PromptRow], answers: list[str] | None = None) -> dict[str, float]:
        """The judge on greedy answers to held-out prompts (``answers``, or made here at the sampling's length):
        ``reward`` and, for a verifier, ``accuracy`` (``Judge.held_out``)."""
        if answers is None:
            answers = greedy_answers(self.model, self.tokenizer, [r.tokens for r in rows], self.sampling)
            made = {tuple(r.tokens): a for r, a in zip(rows, answers)}
            self.greedy_made = (self.global_step, self.sampling.max_new_tokens, made)
        return self.judge.held_out([r.prompt for r in rows], answers, [r.reference for r in rows])

    @torch.no_grad()
    def sampled_held_out(self, rows: list[PromptRow]) -> dict[str, float]:
        """The judge on ``val_samples`` samples of each held-out prompt at the sampling temperature, seeded alike
        at every validation: ``reward`` (the mean) and, for a verifier, ``accuracy``."""
        n = self.val_samples
        sampling = replace(self.sampling, n=n, seed=derived_seed(self.sampling.seed, "validation", bits=62))
        groups = sample_responses(self.model, self.tokenizer, [r.tokens for r in rows], sampling)
        texts = [self.tokenizer.decode(s.tokens, skip_special_tokens=True) for group in groups for s in group]
        return self.judge.held_out(repeat([r.prompt for r in rows], n), texts, repeat([r.reference for r in rows], n))

    def on_validation_epoch_end(self) -> None:
        """``val/reward`` and, for a verifier, ``val/accuracy``: what the method optimises, on held-out prompts
        (``PromptDataModule.val_prompts``), beside the held-out pairs' metrics; with ``val_samples``, the same
        over samples (``val/sampled/…``)."""
        rows = getattr(self.trainer.datamodule, "val_prompts", None)
        if not rows or self.trainer.sanity_checking:
            return
        metrics = {f"val/{key}": value for key, value in self.held_out(rows).items()}
        if self.val_samples:
            metrics |= {f"val/sampled/{key}": value for key, value in self.sampled_held_out(rows).items()}
        for key, value in metrics.items():  # the same answers and samples in every process
            self.log(key, value, prog_bar=key.count("/") == 1, sync_dist=True)

    def evaluate(self, batch: PairBatch) -> dict[str, Tensor]:
        """Held-out pairs: each response's length-normalised log-prob as its reward."""
        if not isinstance(batch, PairBatch):
            raise UserError(
                f"{type(self).__name__} validates on preference pairs (data.val_data with chosen, rejected)"
            )
        chosen, rejected = score_pair_batch(self.model, batch, self.chunk).halves()
        c, r = chosen.mean_logps.detach().float(), rejected.mean_logps.detach().float()
        return pair_reward_metrics(c, r) | {"logps/chosen": c, "logps/rejected": r}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["online_rollouts"] = self.rollouts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollouts = checkpoint.get("online_rollouts", 0)


def repeat(items: list, times: int) -> list:
    """Each item ``times`` times in a row (a prompt for each of its samples)."""
    return [item for item in items for _ in range(times)]


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one text: itself, or its messages' contents a line each."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
