"""OnlineModule: online RL without a value model, GRPO and RLOO, as TRL's ``GRPOTrainer`` and ``RLOOTrainer``.

One training step is one rollout iteration:

1. sample G completions (``sampling.n``) of each of the batch's prompts with the current policy
   (``generation.sample_responses``), and score them with the judge;
2. turn the rewards into advantages within each prompt's group (``rl.group_advantages`` for GRPO,
   ``rl.rloo_advantages`` for RLOO, whose reward first loses β times the sequence's summed log-ratio to
   the reference);
3. update: ``num_iterations`` passes over the rollout, each split into ``updates_per_rollout`` optimizer
   steps, each accumulated over micro-batches of ``micro_batch_size`` completions, clipped by hand to
   ``max_grad_norm`` (Lightning refuses clipping and accumulation under manual optimisation).

``trainer.max_steps``, the learning-rate schedule, ``val_check_interval`` and checkpoints count rollout
iterations: Lightning counts an optimizer step only when it goes through its wrapper, which the last
update of a rollout does and the others (plain ``torch`` steps) do not. Sampling draws from generators
seeded by (``sampling.seed``, rollout index, prompt, sample), and update order from (seed, rollout index),
so a resumed run, which restores the rollout index and skips the prompts already trained on, repeats the
rollouts an uninterrupted run makes. Every G samples of a prompt are drawn in the process that holds the
prompt, so group statistics are exact with any number of processes; the batch-wide ones (``reward``,
``reward_std``, ``scale_rewards: batch``, DAPO's token count) are reduced over all processes.

Log-probs in the update use the logits divided by the sampling temperature, as sampling did. A judge score
that is not finite skips the rollout (counted with non-finite losses, ``max_nonfinite_steps``).

Logged under ``train/`` with TRL's names (``reward``, ``reward_std``, ``frac_reward_zero_std``,
``completions/*``, ``clip_ratio/*``, ``kl``, ``loss``) and the rollout's speed; a W&B logger also gets a table
``completions``. The list, and validation on held-out pairs by SimPO's reward: docs/online.md.

    simpo-lightning fit --config configs/grpo-demo.yaml
"""

import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor, nn

from simpo_lightning import rl
from simpo_lightning.batch import PairBatch, pad_right
from simpo_lightning.data.prompts import PromptBatch
from simpo_lightning.errors import UserError, require
from simpo_lightning.generation import SamplingConfig, derived_seed, sample_responses
from simpo_lightning.judges import Judge, Prompt, RuleJudge
from simpo_lightning.model import LoraConfig, PolicyConfig, QuantizationConfig, build_policy, load_tokenizer
from simpo_lightning.reference import Reference, ReferenceConfig
from simpo_lightning.scoring import score_completions, score_pair_batch
from simpo_lightning.training import TrainingModule, metric_states, pair_reward_metrics

HELD_OUT = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
HELD_OUT += ["logps/chosen", "logps/rejected"]
DEFAULT_BETA = {"grpo": 0.0, "rloo": 0.05}  # TRL's defaults


@dataclass
class OnlineConfig:
    """The online method and its update."""

    method: Literal["grpo", "rloo"] = "grpo"
    """``grpo``: group-normalised advantages, clipped per-token ratio, KL (k3) in the loss; ``rloo``:
    leave-one-out baseline, KL in the reward, clipped per-sequence ratio."""
    beta: float | None = None
    """KL weight; None: TRL's default (grpo 0: no reference model is loaded; rloo 0.05)."""
    loss_type: rl.LossType = "dapo"
    """GRPO: how token losses are averaged (``rl.reduce_token_loss``); TRL's default dapo."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """GRPO: divide advantages by the group's reward std, the batch's, or not at all."""
    kl_bias_correction: bool = True
    """GRPO with β > 0: multiply the per-token KL by the ratio π/π_old (differentiable), which makes its gradient
    the unbiased reverse-KL gradient (TRL's ``use_bias_correction_kl``, on by default; DeepSeek-V3.2)."""
    normalize_advantages: bool = False
    """RLOO: whiten advantages over the batch (TRL's option, off by default)."""
    epsilon: float = 0.2
    """Clip range below 1 (and above, unless epsilon_high)."""
    epsilon_high: float | None = None
    """Clip range above 1; None: epsilon (DAPO recommends 0.28)."""
    num_iterations: int = 1
    """Passes over each rollout (TRL's μ); more than 1 reuses samples, so the ratio moves off 1."""
    updates_per_rollout: int = 1
    """Optimizer steps per pass, each on an equal share of the rollout."""
    micro_batch_size: int = 16
    """Completions per forward and backward pass (gradients accumulate over a share's micro-batches)."""
    shared_prompt: bool = True
    """Score a prompt's completions in one sequence, the prompt once (``scoring.score_completions``)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient's global norm before each optimizer step; None: no clipping."""
    log_completions_steps: int = 10
    """Every this many rollouts, a W&B table of the first prompts' completions; 0: never."""

    def __post_init__(self) -> None:
        for name in ("beta", "epsilon", "epsilon_high"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"model.method.{name} = {value}: must be ≥ 0")
        for name in ("num_iterations", "updates_per_rollout", "micro_batch_size"):
            require(getattr(self, name) >= 1, f"model.method.{name} = {getattr(self, name)}: must be ≥ 1")
        norm = self.max_grad_norm
        require(norm is None or norm > 0, f"model.method.max_grad_norm = {norm}: must be > 0, or null for no clipping")


@dataclass
class Rollout:
    """N completions of one rollout. Tensors ``[N]`` or ``[N, T]`` (completions right-padded, with the
    end-of-sequence token where the completion ended)."""

    prompts: list[list[int]]
    completions: Tensor
    mask: Tensor
    ended: Tensor
    rewards: Tensor
    advantages: Tensor
    old_logps: Tensor | None
    ref_logps: Tensor | None
    values: Tensor | None = None
    returns: Tensor | None = None
    texts: list[tuple[Prompt, str]] | None = None
    """(prompt as the source gives it, decoded completion) of each completion, for the completions table."""

    def take(self, rows: Tensor) -> tuple[list[list[int]], Tensor, Tensor]:
        """The prompts, completions and (float) mask of ``rows``, cut to their longest completion."""
        width = int(self.mask[rows].sum(-1).max())
        return [self.prompts[i] for i in rows.tolist()], self.completions[rows, :width], self.mask[rows, :width].float()


# Checkpoints record these in their hyperparameters and load with weights_only=True.
torch.serialization.add_safe_globals(
    [OnlineConfig, SamplingConfig, PolicyConfig, QuantizationConfig, LoraConfig, ReferenceConfig]
)


class OnlineModule(TrainingModule):
    """GRPO or RLOO on a prompt DataModule (``data.PromptDataModule``), with manual optimisation.

    Args:
        policy: which model to load and how.
        lora: LoRA adapters; null trains every weight.
        method: the method and its update (``OnlineConfig``).
        sampling: rollouts: G = ``n`` samples per prompt, temperature (> 0), top-p, completion length.
        judge: scores completions (``class_path`` in YAML); None: ``RuleJudge``, the demo's rule.
        reference: the reference model when β > 0 (with LoRA: the policy with its adapters off).
        optimizer: optimizer class and arguments, called with the trainable parameters.
        warmup_ratio, lr_schedule: the learning-rate schedule, over rollout iterations.
        max_nonfinite_steps: this many skipped rollouts in a row (non-finite reward or loss) stop training.
        logits_chunk: response positions per chunk of the output head (``SimPOModule``'s).
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        method: OnlineConfig = OnlineConfig(),
        sampling: SamplingConfig = SamplingConfig(n=8, temperature=1.0, max_new_tokens=16),
        judge: Judge | None = None,
        reference: ReferenceConfig = ReferenceConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.0,
        lr_schedule: Literal["cosine", "linear", "constant"] = "constant",
        max_nonfinite_steps: int = 10,
        logits_chunk: int | None = 1024,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "judge"])
        self.check_sampling(sampling, method)
        if sampling.temperature <= 0 or sampling.max_new_tokens < 1:
            raise UserError("online sampling needs sampling.temperature > 0 and sampling.max_new_tokens ≥ 1")
        self.automatic_optimization = False
        self.policy, self.lora, self.config, self.sampling, self.optimizer = policy, lora, method, sampling, optimizer
        self.beta = DEFAULT_BETA.get(method.method, 0.0) if method.beta is None else method.beta
        self.epsilon_high = method.epsilon if method.epsilon_high is None else method.epsilon_high
        self.judge = judge if judge is not None else RuleJudge()
        self.tokenizer = load_tokenizer(policy)
        self.model: nn.Module | None = None
        self.reference = Reference(reference, lora=lora is not None)
        self.val_metrics = metric_states(HELD_OUT)
        self.strict_loading = lora is None
        self.rollouts = 0  # rollout iterations begun, skipped ones included (they seed sampling)
        self.rollout_stats: dict[str, Tensor] = {}  # logged with the step's metrics

    def check_sampling(self, sampling: SamplingConfig, method: OnlineConfig) -> None:
        if sampling.n < 2:
            raise UserError(f"sampling.n = {sampling.n}: {method.method} needs G ≥ 2 samples per prompt (its baseline)")

    def configure_model(self) -> None:
        if self.model is None:
            self.model = build_policy(self.policy, self.lora)
            if self.beta:
                self.reference.build(self.model)
            self.model = self.sharded(self.model)
            self.reference.shard(self.sharded)

    def on_fit_start(self) -> None:
        if str(self.trainer.precision).startswith("16"):
            raise UserError("OnlineModule steps its optimizer by hand: use precision bf16-mixed or 32-true, not 16")

    # ------------------------------------------------------------------ rollout

    def logps(self, model: nn.Module, prompts: list[list[int]], completions: Tensor, mask: Tensor) -> Tensor:
        """Per-token log-probs ``[n, T]`` of completions at the sampling temperature."""
        pad, temperature = self.tokenizer.pad_token_id, self.sampling.temperature
        return score_completions(
            model, prompts, completions, mask, pad, self.chunk, temperature, self.config.shared_prompt
        )

    @torch.no_grad()
    def no_grad_per_token(self, function, rollout: Rollout) -> Tensor:
        """``function(prompts, completions, mask)`` (per-token values ``[n, T']``) over the whole rollout, a
        micro-batch at a time and without gradients, as ``[N, T]``."""
        size, mask = self.config.micro_batch_size, rollout.mask
        parts = [
            function(rollout.prompts[s : s + size], rollout.completions[s : s + size], mask[s : s + size])
            for s in range(0, len(mask), size)
        ]
        return torch.cat([nn.functional.pad(p, (0, mask.shape[1] - p.shape[1])) for p in parts])

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
        scores = self.judge(_repeat(batch.prompts, g), texts, _repeat(batch.references, g), finite=False)
        rewards = torch.tensor(scores, dtype=torch.float32, device=self.device)
        if not self.trainer.strategy.reduce_boolean_decision(bool(rewards.isfinite().all()), all=True):
            return None
        ended = torch.tensor([s.finish_reason == "stop" for s in samples], device=self.device)
        texts = list(zip(_repeat(batch.prompts, g), texts))
        return Rollout(_repeat(batch.tokens, g), completions, mask, ended, rewards, rewards, None, None, texts=texts)

    def advantages(self, rollout: Rollout) -> Rollout:
        """The rollout with its advantages and the log-probs the update needs (old, reference); statistics
        of the rollout itself go to ``rollout_stats``."""
        g, rewards, mask = self.sampling.n, rollout.rewards, rollout.mask
        reuse = self.config.num_iterations > 1 or self.config.updates_per_rollout > 1
        old = self.rollout_logps(rollout) if reuse or self.beta else None
        ref = self.rollout_logps(rollout, reference=True) if self.beta else None
        if self.config.method == "grpo":
            std = self.reduced_std(rewards) if self.config.scale_rewards == "batch" else None
            advantages = rl.group_advantages(rewards, g, self.config.scale_rewards, std)
        else:
            if self.beta:  # TRL's RLOO logs the mean per-token log-ratio to the reference as kl
                self.rollout_stats["kl"] = rl.masked_mean(old - ref, mask)
            shaped = rewards - self.beta * ((old - ref) * mask).sum(-1) if self.beta else rewards
            advantages = rl.rloo_advantages(shaped, g)
            if self.config.normalize_advantages:
                spread = self.reduced_std(advantages) + rl.STD_EPSILON
                advantages = (advantages - self.reduced_mean(advantages)) / spread
        return replace(rollout, advantages=advantages, old_logps=old if reuse else None, ref_logps=ref)

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
        """The optimizer steps on one rollout; returns the update's mean loss and clip (and KL) statistics."""
        config, optimizer = self.config, self.optimizers()
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
                    loss, parts = self._micro_loss(rollout, micro.to(self.device), len(share), tokens.item())
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

    def _micro_loss(
        self, rollout: Rollout, rows: Tensor, sequences: int, tokens: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One micro-batch's share of its update's loss, and its clip (and KL) statistics as weighted sums."""
        prompts, completions, mask = rollout.take(rows)
        logps, width = self.logps(self.model, prompts, completions, mask), mask.shape[1]
        old = rollout.old_logps[rows, :width] if rollout.old_logps is not None else logps.detach()
        advantages = rollout.advantages[rows]
        eps_low, eps_high = self.config.epsilon, self.epsilon_high
        if self.config.method == "rloo":
            log_ratio = ((logps - old) * mask).sum(-1)
            per_sequence, ratio = rl.clipped_objective(log_ratio, advantages, eps_low, eps_high)
            clipped = rl.clip_fractions(ratio, advantages, eps_low, eps_high)
            stats = {f"clip_ratio/{k}_mean": v.float().sum() for k, v in clipped.items()}
            return per_sequence.sum() / sequences, stats | {"weight": torch.tensor(float(len(rows)))}
        per_token, ratio = rl.clipped_objective(logps - old, advantages[:, None], eps_low, eps_high)
        clipped = rl.clip_fractions(ratio, advantages[:, None].expand_as(ratio), eps_low, eps_high)
        stats = {f"clip_ratio/{k}_mean": (v * mask).sum() for k, v in clipped.items()}
        if self.beta:
            kl = rl.k3_kl(logps, rollout.ref_logps[rows, :width])
            if self.config.kl_bias_correction:
                kl = kl * ratio
            per_token = per_token + self.beta * kl
            stats["kl"] = (kl.detach() * mask).sum()
        loss = rl.reduce_token_loss(
            per_token, mask, self.config.loss_type, sequences, self.sampling.max_new_tokens, tokens
        )
        return loss, {k: v.detach() for k, v in stats.items()} | {"weight": mask.sum()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass  # logged in training_step (samples per second rather than tokens)

    def _log_completions(self, rollout: Rollout) -> None:
        every = self.config.log_completions_steps
        loggers = [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)]
        if not (every and loggers and self.trainer.is_global_zero and (self.rollouts - 1) % every == 0):
            return
        rows = [
            [self.rollouts, _text(prompt)[-200:], text, reward, advantage]
            for (prompt, text), reward, advantage in zip(
                rollout.texts, rollout.rewards.tolist(), rollout.advantages.tolist()
            )
        ][: 2 * self.sampling.n]
        for logger in loggers:
            columns = ["rollout", "prompt", "completion", "reward", "advantage"]
            logger.log_table("completions", columns=columns, data=rows, step=self.global_step)

    # ------------------------------------------------------------------ held-out pairs, checkpoints

    def step(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Held-out pairs: each response's length-normalised log-prob as its reward."""
        if not isinstance(batch, PairBatch):
            raise UserError("OnlineModule validates on preference pairs (data.val_data with chosen and rejected)")
        chosen, rejected = score_pair_batch(self.model, batch, self.chunk).halves()
        c, r = chosen.mean_logps.detach().float(), rejected.mean_logps.detach().float()
        return c.new_zeros(()), pair_reward_metrics(c, r) | {"logps/chosen": c, "logps/rejected": r}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["online_rollouts"] = self.rollouts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.rollouts = checkpoint.get("online_rollouts", 0)


def _repeat(items: list, times: int) -> list:
    return [item for item in items for _ in range(times)]


def _text(prompt: str | list[dict[str, str]]) -> str:
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
