"""SimPOModule: offline preference tuning with SimPO or any loss of ``LOSSES``, one shared step for train,
validation and test. It asks the loss's registry entry what it needs (a reference model, paired data,
length-normalised log-probs, lengths), never its name."""

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from simpo_lightning.data.batch import PairBatch, Sequences, UnpairedBatch
from simpo_lightning.errors import UserError
from simpo_lightning.losses.config import LossConfig
from simpo_lightning.losses.preference import kto_kl
from simpo_lightning.methods.base import SupervisedModule, pair_reward_metrics
from simpo_lightning.methods.margin import margin_of, set_auto_margin
from simpo_lightning.methods.reference import Reference, ReferenceConfig, reference_identity
from simpo_lightning.models.loading import LoraConfig, PolicyConfig, build_policy
from simpo_lightning.scoring.sequences import Scores, score_pair_batch, score_sequences

# KTO turns pairs into completions in on_before_batch_transfer, which Lightning points out on every run.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")

METRICS = [f"{group}/{side}" for group in ("rewards", "logps", "logits", "lengths") for side in ("chosen", "rejected")]
METRICS += ["rewards/accuracies", "rewards/margins", "loss", "kl"]


class SimPOModule(SupervisedModule):
    """Preference-tunes a causal LM with SimPO or one of the methods it is measured against.

    Args:
        policy: which model to load and how.
        lora: LoRA adapters; null trains every weight.
        loss: the preference loss.
        reference: the reference model, for the methods that use one.
        optimizer: optimizer class and arguments, called with the trainable parameters.
        **training: the settings every training module shares (``TrainingModule``): ``warmup_ratio``,
            ``lr_schedule``, ``max_nonfinite_steps``, ``optimizer_in_backward``, ``logits_chunk``.
    """

    metrics = METRICS

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        loss: LossConfig = LossConfig(),
        reference: ReferenceConfig = ReferenceConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        **training,
    ):
        if reference.precompute and loss.method().reference and not loss.method().paired:  # before loading anything
            raise UserError(
                f"reference.precompute does not apply to {loss.name}: its KL term pairs each prompt "
                "with another example's completion, which changes with every batch"
            )
        super().__init__(policy, lora, optimizer, **training)
        self.loss_config = loss
        self.method, self.loss_hparams, self.sft_weight = loss.method(), loss.hparams(), loss.nll_weight()
        self.margin = margin_of(loss)  # gamma_beta_ratio auto or adaptive: its state, kept in checkpoints
        self.reference = Reference(reference, lora=lora is not None)

    def build_model(self) -> nn.Module:
        model = build_policy(self.policy, self.lora)
        if self.method.reference:
            self.reference.build(model)  # before sharding: a copy of the whole initial weights
        return model

    def shard_parts(self) -> None:
        self.reference.shard(self.sharded)

    # ------------------------------------------------------------------ the step

    def step(self, batch: PairBatch | UnpairedBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and per-example metrics (``[B]`` each) for one batch."""
        if self.method.paired:
            if not isinstance(batch, PairBatch):
                raise UserError(
                    f"loss {self.loss_config.name!r} needs paired data (prompt, chosen, rejected); "
                    "this batch holds unpaired completions, which only kto uses"
                )
            return self._paired_step(batch)
        return self._unpaired_step(self.on_before_batch_transfer(batch, 0))

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """KTO trains on completions: pairs become desirable chosen and undesirable rejected ones here, on the CPU."""
        if not self.method.paired and isinstance(batch, PairBatch):
            return batch.as_unpaired(self.tokenizer.pad_token_id)
        return batch

    def _paired_step(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        average = self.method.average
        chosen, rejected = score_pair_batch(self.model, batch, self.chunk).halves()
        args = [chosen.logps(average), rejected.logps(average)]
        if self.method.reference:
            if batch.ref_chosen_logps is not None:
                ref = torch.cat([batch.ref_chosen_logps, batch.ref_rejected_logps]).to(args[0].dtype)
            else:
                ref = self.reference.sum_logps(self.model, lambda model: score_pair_batch(model, batch, self.chunk))
            if average:
                ref = ref / torch.cat([chosen.lengths, rejected.lengths])
            args += list(ref.chunk(2))
        lengths = (
            {"chosen_lengths": chosen.lengths, "rejected_lengths": rejected.lengths} if self.method.lengths else {}
        )
        hparams = self.loss_hparams
        if self.margin is not None:
            hparams = {**hparams, "gamma_beta_ratio": self.margin.ratio()}
            if self.training:
                self._observe_gaps(args[0] - args[1])
        losses, chosen_rewards, rejected_rewards = self.method.loss(*args, **lengths, **hparams)
        loss = self.pair_mean(losses) + self._nll(chosen)
        metrics = preference_metrics(
            losses, {"chosen": (chosen_rewards, chosen), "rejected": (rejected_rewards, rejected)}, average, paired=True
        )
        if self.margin is not None and self.training:
            metrics["gamma_beta_ratio"] = torch.full_like(losses, hparams["gamma_beta_ratio"]).detach()
        return loss, metrics

    def _observe_gaps(self, gaps: Tensor) -> None:
        """The adaptive margin's update: this batch's mean Δ and mean Δ² over all processes."""
        gaps = gaps.detach().double()
        moments = torch.stack([gaps.mean(), gaps.pow(2).mean()])
        if self._trainer is not None and self.trainer.world_size > 1:
            moments = self.all_gather(moments).mean(0)
        self.margin.observe(moments)

    def _unpaired_step(self, batch: UnpairedBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """KTO: completions with a desirable label, and its reference point z₀ from the mismatched sequences."""
        n, desirable = len(batch), batch.desirable.bool()
        out = score_sequences(self.model, batch.completions, self.chunk)
        with torch.no_grad():
            kl_logps = score_sequences(self.model, batch.kl, self.chunk).sum_logps
        both = Sequences.cat([batch.completions, batch.kl], self.tokenizer.pad_token_id)
        ref, ref_kl = self.reference.sum_logps(
            self.model, lambda model: score_sequences(model, both, self.chunk)
        ).split([n, n])
        kl = kto_kl(kl_logps, ref_kl)
        if self._trainer is not None and self.trainer.world_size > 1:  # one reference point for all processes
            kl = self.all_gather(kl).mean()
        kl = kl.clamp(min=0)
        losses, rewards = self.method.loss(out.sum_logps, ref, desirable, kl, **self.loss_hparams)
        loss = losses.mean() + self._nll(out[desirable])
        sides = {"chosen": (rewards[desirable], out[desirable]), "rejected": (rewards[~desirable], out[~desirable])}
        return loss, preference_metrics(losses, sides, average=False, paired=batch.paired) | {"kl": kl.reshape(1)}

    def _nll(self, scores: Scores) -> Tensor | float:
        """``sft_weight`` times the token-mean NLL of the given responses (0 when the weight is 0)."""
        if not self.sft_weight or not len(scores.lengths):
            return 0.0
        return -self.sft_weight * scores.sum_logps.sum() / scores.lengths.sum()

    # ------------------------------------------------------------------ reference precomputation

    def precompute_reference(self, datamodule) -> None:
        """Adds the reference's summed log-probs as columns ``ref_chosen_logps`` / ``ref_rejected_logps`` to
        every split of ``datamodule`` (a ``PreferenceDataModule``), cached beside its data, then frees the
        frozen copy. All processes of a run take part (``Reference.precompute``)."""
        from simpo_lightning.data import PreferenceCollator

        collate, hp = PreferenceCollator(self.tokenizer.pad_token_id), datamodule.hparams
        identity = reference_identity(self.policy, self.reference.config)
        distributed = self._trainer is not None and self.trainer.world_size > 1
        rank, world = (self.global_rank, self.trainer.world_size) if distributed else (0, 1)
        for name in list(datamodule.splits):
            rows = datamodule.splits[name]
            if "ref_chosen_logps" in rows.column_names:  # done, or the same rows as a split done before
                continue

            def score(policy: nn.Module, start: int, stop: int, rows=rows) -> Tensor:
                batch = move_data_to_device(collate(rows.select(range(start, stop)).to_list()), self.device)
                return self.reference.sum_logps(policy, lambda model: score_pair_batch(model, batch, self.chunk))

            key = hashlib.sha256(repr((datamodule.split_keys[name], identity)).encode()).hexdigest()[:24]
            cache = Path(hp.cache_dir).expanduser() / f"ref-{key}.pt" if hp.cache_dir and identity else None
            values = self.reference.precompute(
                self.model, len(rows), score, hp.batch_size, cache, rank, world, self.all_gather
            )
            datamodule.add_reference_logps(name, values)
        self.reference.free()

    def _maybe_precompute(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not (self.method.reference and self.reference.config.precompute and datamodule is not None):
            return
        if getattr(datamodule, "splits", None) is None:
            raise UserError("model.reference.precompute needs a PreferenceDataModule (it scores the data's splits)")
        self.precompute_reference(datamodule)

    def on_fit_start(self) -> None:
        self._maybe_precompute()
        set_auto_margin(self, self.loss_config.auto_pairs)

    def on_validation_start(self) -> None:
        self._maybe_precompute()

    def on_test_start(self) -> None:
        self._maybe_precompute()


def preference_metrics(
    losses: Tensor, sides: dict[str, tuple[Tensor, Scores]], average: bool, paired: bool
) -> dict[str, Tensor]:
    """The logged per-example metrics (TRL's names): ``loss`` and, for ``sides`` ``chosen`` and ``rejected``
    given as (rewards, scores), ``rewards/``, ``logps/`` (mean with ``average``, else summed), ``logits/`` and
    ``lengths/``; for pairs also ``rewards/margins`` and ``rewards/accuracies`` (share with r_w > r_l)."""
    metrics = {"loss": losses.detach()}
    for side, (rewards, scores) in sides.items():
        metrics[f"rewards/{side}"] = rewards
        metrics[f"logps/{side}"] = scores.logps(average).detach().float()
        metrics[f"logits/{side}"] = scores.mean_logits.detach().float()
        metrics[f"lengths/{side}"] = scores.lengths.float()
    if paired:
        metrics |= pair_reward_metrics(metrics["rewards/chosen"], metrics["rewards/rejected"])
    return metrics
