"""Parity with an independent implementation: TRL's CPOTrainer(loss_type="simpo").

TRL tokenises and collates its own batch; the same token ids go through this package's step
with the same tiny model. Losses, rewards and log-probs must agree to float32 rounding, which
checks the response mask, the length normalisation, the margin mapping (TRL's absolute
``simpo_gamma`` = β · ``gamma_beta_ratio``) and the NLL term (TRL's ``cpo_alpha`` = ``sft_weight``).
"""

import os

import pytest
import torch

from simpo_lightning.logprobs import IGNORE_INDEX
from simpo_lightning.model import PolicyConfig
from simpo_lightning.module import LossConfig, SimPOModule

trl = pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

ROWS = [
    {"prompt": "Question: what is the capital of France?\nAnswer:", "chosen": " Paris", "rejected": " The capital is Rome, I think."},
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
    {"prompt": "Name a colour:", "chosen": " blue, like the sky", "rejected": " seven"},
    {"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5 or maybe 22"},
]


def pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, length - x.shape[1]), value=value)


@pytest.mark.parametrize("beta, gamma_beta_ratio, sft_weight, label_smoothing", [(2.0, 0.5, 0.0, 0.0), (10.0, 0.3, 0.5, 0.1)])
def test_simpo_matches_trl_cpo_trainer(tiny_dir, tokenizer, tmp_path, beta, gamma_beta_ratio, sft_weight, label_smoothing):
    import datasets
    from transformers import AutoModelForCausalLM
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    args = CPOConfig(
        output_dir=str(tmp_path), loss_type="simpo", beta=beta, simpo_gamma=beta * gamma_beta_ratio, cpo_alpha=sft_weight,
        label_smoothing=label_smoothing, max_length=128, per_device_train_batch_size=4, report_to="none", use_cpu=True,
    )
    reference = CPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args,
                           train_dataset=datasets.Dataset.from_list(ROWS), processing_class=tokenizer)
    batch = next(iter(reference.get_train_dataloader()))
    with torch.no_grad():
        trl_loss, trl_metrics = reference.get_batch_loss_metrics(reference.model, batch)

    module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=None,
                         loss=LossConfig(beta=beta, gamma_beta_ratio=gamma_beta_ratio, sft_weight=sft_weight,
                                         label_smoothing=label_smoothing))
    module.configure_model()
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    ours = {}
    for side in ("chosen", "rejected"):
        ours[f"{side}_input_ids"] = pad_to(batch[f"{side}_input_ids"], length, tokenizer.pad_token_id)
        ours[f"{side}_attention_mask"] = pad_to(batch[f"{side}_attention_mask"], length, 0)
        ours[f"{side}_labels"] = pad_to(batch[f"{side}_labels"], length, IGNORE_INDEX)
    with torch.no_grad():
        loss, metrics = module.step(ours)

    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert metrics[name].mean().item() == pytest.approx(trl_metrics[name], rel=1e-5, abs=1e-6), name
