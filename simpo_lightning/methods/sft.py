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

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from simpo_lightning.data.batch import PairBatch, UnpairedBatch
from simpo_lightning.methods.base import SupervisedModule, pair_reward_metrics
from simpo_lightning.models.loading import LoraConfig, PolicyConfig, build_policy
from simpo_lightning.scoring.sequences import score_pair_batch, score_sequences

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "lengths/chosen"]


class SFTModule(SupervisedModule):
    """Fine-tunes a causal LM on the chosen responses (token-mean NLL).

    Args: as ``SimPOModule``'s of the same names.
    """

    metrics = METRICS

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        **training,
    ):
        super().__init__(policy, lora, optimizer, **training)

    def build_model(self) -> nn.Module:
        return build_policy(self.policy, self.lora)

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
