"""SFTModule: supervised fine-tuning on the preferred responses of preference data.

The SimPO recipe starts from a supervised (SFT) model; this trains one from the same data files:
the token-mean negative log-likelihood of each pair's chosen response (of each desirable completion
of unpaired data), with no preference term. It reads the same batches as ``SimPOModule`` and scores
them with the same code, and it logs ``rewards/…`` as SimPO's implicit reward with β = 1 (the mean
log-prob of a response), so the held-out reward accuracy shows whether supervision alone already
separates chosen from rejected. ``train/loss`` is the batch's token-mean NLL; the per-example ``loss``
metric (``val/loss``) is each response's mean NLL.

    simpo-lightning fit --config configs/sft.yaml
"""

from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from simpo_lightning.batch import PairBatch, UnpairedBatch
from simpo_lightning.model import LoraConfig, PolicyConfig, build_policy, load_tokenizer
from simpo_lightning.scoring import score_pair_batch, score_sequences
from simpo_lightning.training import TrainingModule, metric_states, pair_reward_metrics

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "lengths/chosen"]


class SFTModule(TrainingModule):
    """Fine-tunes a causal LM on the chosen responses (token-mean NLL).

    Args: as ``SimPOModule``'s of the same names.
    """

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_ratio: float = 0.1,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        max_nonfinite_steps: int = 10,
        logits_chunk: int | None = 1024,
        optimizer_in_backward: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.policy, self.lora, self.optimizer = policy, lora, optimizer
        self.tokenizer = load_tokenizer(policy)
        self.model: nn.Module | None = None
        self.val_metrics = metric_states(METRICS)
        self.strict_loading = lora is None

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.sharded(build_policy(self.policy, self.lora))

    def step(self, batch: PairBatch | UnpairedBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(batch, UnpairedBatch):
            scores = score_sequences(self.model, batch.completions, self.chunk)[batch.desirable.bool()]
            loss = -scores.sum_logps.sum() / scores.lengths.sum()
            return loss, {"loss": (-scores.mean_logps).detach(), "lengths/chosen": scores.lengths.float()}
        chosen, rejected = score_pair_batch(self.model, batch, self.chunk).halves()
        loss = -chosen.sum_logps.sum() / chosen.lengths.sum()
        return loss, {
            "loss": (-chosen.mean_logps).detach(),
            **pair_reward_metrics(chosen.mean_logps.detach(), rejected.mean_logps.detach()),
            "lengths/chosen": chosen.lengths.float(),
        }
