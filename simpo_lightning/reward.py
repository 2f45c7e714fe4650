"""RewardModule: a reward model trained on preference pairs (Bradley–Terry), to judge samples with.

The backbone of a causal LM under a new one-output scoring head (``AutoModelForSequenceClassification``)
scores each sequence (prompt and response) at its last token that is not the pad token, as Hugging Face
reads it, so the exported folder, TRL and ``RewardModelJudge`` read the same number. The loss is

    -log σ(r_w - r_l - m) + c · mean((r_w + r_l)²)

with m the pair's value in the data's ``margin`` column (0 where a row has none) and c
``center_rewards_coefficient`` (TRL's name; None: no centering term). It reads the same data files and
batches as ``SimPOModule``, and LoRA trains the head too (peft's ``modules_to_save``).

Pad token: sequences end with end-of-sequence, and where pad = eos (SmolLM2, Llama) the head would skip
that final token as padding and score the token before it. So the module pads with another token of the
vocabulary (``pad_token``, or by default the unknown token or another special token that is not eos) and
saves it in the model's config, which is where the exported model and the judge read it.

Logged per split (``train/``, ``val/``): ``loss``, ``rewards/chosen``, ``rewards/rejected``,
``rewards/margins`` (r_w - r_l), ``rewards/accuracies`` (share with r_w > r_l), as ``SimPOModule`` names
them; and TRL ``RewardTrainer``'s names for the same numbers: ``accuracy``, ``margin``, ``mean_reward``
(the mean of r_w and r_l). TRL's ``min_reward`` and ``max_reward`` are batch extremes, not means, and are
not logged.

    simpo-lightning fit --config configs/reward.yaml
"""

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn

from simpo_lightning.batch import PairBatch
from simpo_lightning.errors import UserError
from simpo_lightning.logprobs import at_least_float32
from simpo_lightning.model import LoraConfig, PolicyConfig, build_policy, load_tokenizer
from simpo_lightning.training import TrainingModule, metric_states

log = logging.getLogger(__name__)

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]
METRICS += ["accuracy", "margin", "mean_reward"]


def reward_pad_token(tokenizer, pad_token: str | None = None) -> None:
    """Set the tokenizer's pad token to one that is not end-of-sequence: ``pad_token`` if given, else the
    current pad if it differs from eos, else the unknown token or the first other special token."""
    eos = tokenizer.eos_token
    if pad_token is None:
        candidates = [tokenizer.pad_token, tokenizer.unk_token, *tokenizer.all_special_tokens]
        pad_token = next((t for t in candidates if t is not None and t not in (eos, tokenizer.bos_token)), None)
        if pad_token is None:
            raise UserError(
                "the reward model needs a pad token other than end-of-sequence (where pad = eos the score "
                "is read before the final eos) and the tokenizer has no other special token; set model.pad_token"
            )
    if pad_token not in tokenizer.get_vocab():
        raise UserError(f"model.pad_token {pad_token!r} is not in the tokenizer's vocabulary")
    if pad_token == eos:
        log.warning("reward model pad token = eos: each score is read at the token before the final eos")
    tokenizer.pad_token = pad_token


class RewardModule(TrainingModule):
    """Trains a scalar reward model on preference pairs with the Bradley–Terry loss.

    Args:
        policy: the backbone to start from (a causal LM; its LM head is replaced by a new scoring head).
        lora: LoRA settings (the scoring head is trained fully); None: train every weight.
        optimizer: a callable from parameters to an optimizer.
        center_rewards_coefficient: weight of mean((r_w + r_l)²), which keeps rewards near 0 (TRL's; 0.01
            in its docs); None: no such term.
        use_margin: subtract the data's per-pair ``margin`` column inside the sigmoid when present.
        pad_token: the pad token (must not be eos); None: chosen as the module's docstring says.
        warmup_ratio, lr_schedule, max_nonfinite_steps, optimizer_in_backward: as ``SimPOModule``'s.
    """

    generative = False  # no text to generate: HeldOutReport measures reward accuracy only

    def __init__(
        self,
        policy: PolicyConfig = PolicyConfig(),
        lora: LoraConfig | None = LoraConfig(),
        optimizer: OptimizerCallable = torch.optim.AdamW,
        center_rewards_coefficient: float | None = None,
        use_margin: bool = True,
        pad_token: str | None = None,
        warmup_ratio: float = 0.1,
        lr_schedule: Literal["cosine", "linear", "constant"] = "cosine",
        max_nonfinite_steps: int = 10,
        optimizer_in_backward: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.policy, self.lora, self.optimizer = policy, lora, optimizer
        self.tokenizer = load_tokenizer(policy)
        reward_pad_token(self.tokenizer, pad_token)
        self.model: nn.Module | None = None
        self.val_metrics = metric_states(METRICS)
        self.strict_loading = lora is None

    def configure_model(self) -> None:
        if self.model is None:
            model = build_policy(self.policy, self.lora, head="reward")
            model.config.pad_token_id = self.tokenizer.pad_token_id
            self.model = self.sharded(model)

    def rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[N]`` rewards of right-padded sequences, read at each one's last token that is not padding."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0]

    def step(self, batch: PairBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if not isinstance(batch, PairBatch):
            raise UserError("RewardModule trains on preference pairs (chosen and rejected), not unpaired data")
        both = batch.both()
        chosen, rejected = at_least_float32(self.rewards(both.input_ids, both.attention_mask)).chunk(2)
        margins = chosen - rejected
        logits = margins
        if self.hparams.use_margin and batch.margin is not None:
            logits = margins - batch.margin.nan_to_num(0.0).to(margins)
        losses = -F.logsigmoid(logits)
        loss = losses.mean()
        if self.hparams.center_rewards_coefficient is not None:
            loss = loss + self.hparams.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
        margins, accuracies = margins.detach(), (margins > 0).float().detach()
        return loss, {
            "loss": losses.detach(),
            "rewards/chosen": chosen.detach(),
            "rewards/rejected": rejected.detach(),
            "rewards/margins": margins,
            "rewards/accuracies": accuracies,
            "accuracy": accuracies,
            "margin": margins,
            "mean_reward": ((chosen + rejected) / 2).detach(),
        }
