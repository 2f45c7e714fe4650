"""RewardModule: a reward model trained on preference pairs (Bradley–Terry), to judge samples with.

The causal LM's backbone under a new one-output head (``AutoModelForSequenceClassification``) scores each
sequence at its last token that is not padding, as Hugging Face reads it, so the exported model, TRL and
``RewardModelJudge`` read the same number. Loss: -log σ(r_w - r_l - m) + c · mean((r_w + r_l)²), m the data's
``margin`` column (0 where none), c ``center_rewards_coefficient``. It pads with a token that is not
end-of-sequence (``models.loading.reward_pad_token``) and saves it in the model's config. Logged names (this
package's and TRL's): docs/methods.md ("Reward models").

    simpo-lightning fit --config configs/methods/reward.yaml
"""

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from simpo_lightning.data.batch import PackedPairs, PairBatch
from simpo_lightning.errors import UserError, require
from simpo_lightning.methods.base import SupervisedModule, pair_reward_metrics
from simpo_lightning.models.loading import LoraConfig, PolicyConfig, build_policy, reward_pad_token, without_peft
from simpo_lightning.scoring.logprobs import at_least_float32
from simpo_lightning.scoring.sequences import shared_prompt_mask

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
METRICS += ["accuracy", "margin", "mean_reward"]


class RewardModule(SupervisedModule):
    """Trains a scalar reward model on preference pairs with the Bradley–Terry loss.

    Args:
        policy: the backbone to start from (a causal LM; its LM head is replaced by a new scoring head).
        lora: LoRA settings (the scoring head is trained fully); None: train every weight.
        optimizer: a callable from parameters to an optimizer.
        center_rewards_coefficient: weight of mean((r_w + r_l)²), which keeps rewards near 0 (TRL's; 0.01
            in its docs); None: no such term.
        use_margin: subtract the data's per-pair ``margin`` column inside the sigmoid when present.
        pad_token: the pad token (must not be eos); None: chosen as the module's docstring says.
        **training: the settings every training module shares (``TrainingModule``); ``logits_chunk`` does not
            apply (the head reads one position a sequence).
    """

    metrics = METRICS
    head = "reward"
    generative = False  # no text to generate: HeldOutReport measures reward accuracy only

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        center_rewards_coefficient: float | None = None,
        use_margin: bool = True,
        pad_token: str | None = None,
        **training,
    ):
        super().__init__(policy, lora, optimizer, **training)
        require(
            self.logits_chunk == 1024,
            "model.logits_chunk does not apply to RewardModule: its head reads one position a sequence (leave it out)",
        )
        reward_pad_token(self.tokenizer, pad_token)
        self.center_rewards_coefficient, self.use_margin = center_rewards_coefficient, use_margin

    def build_model(self) -> nn.Module:
        model = build_policy(self.policy, self.lora, head="reward")
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[N]`` rewards of right-padded sequences, read at each one's last token that is not padding."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0]

    def packed_rewards(self, packed: PackedPairs) -> Tensor:
        """``[2B]`` rewards, chosen then rejected, of shared-prompt rows (``data.shared_prompt``, several pairs a
        row with ``data.max_tokens_per_row``): the backbone's hidden state at each response's last token through
        the scoring head, as ``rewards`` reads each sequence, with the prompt computed once."""
        model = without_peft(self.model)
        decoder = getattr(model, model.base_model_prefix)
        hidden = decoder(
            input_ids=packed.input_ids,
            attention_mask=shared_prompt_mask(packed.segments, packed.pairs),
            position_ids=packed.position_ids,
            pair_spans=packed.spans,
            use_cache=False,
        ).last_hidden_state
        return model.score(hidden.flatten(0, 1)[packed.ends])[:, 0]

    def step(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if not isinstance(batch, PairBatch):
            raise UserError("RewardModule trains on preference pairs (chosen and rejected), not unpaired data")
        if batch.packed is not None:
            both_rewards = self.packed_rewards(batch.packed)
        else:
            both = batch.both()
            both_rewards = self.rewards(both.input_ids, both.attention_mask)
        chosen, rejected = at_least_float32(both_rewards).chunk(2)
        margins = chosen - rejected
        logits = margins
        if self.use_margin and batch.margin is not None:
            logits = margins - batch.margin.nan_to_num(0.0).to(margins)
        losses = -F.logsigmoid(logits)
        loss = self.pair_mean(losses)
        if self.center_rewards_coefficient is not None:
            loss = loss + self.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        metrics = pair_reward_metrics(chosen.detach(), rejected.detach())
        return loss, {
            "loss": losses.detach(),
            **metrics,
            # TRL RewardTrainer's names for the same numbers
            "accuracy": metrics["rewards/accuracies"],
            "margin": metrics["rewards/margins"],
            "mean_reward": ((chosen + rejected) / 2).detach(),
        }
