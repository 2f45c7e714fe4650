import math

import pytest
import torch

from simpo_lightning.data import PairEncoder, PreferenceCollator, Truncation, Columns
from simpo_lightning.logprobs import IGNORE_INDEX, sequence_logps, token_logps
from simpo_lightning.model import LoraConfig, PolicyConfig
from simpo_lightning.module import SimPOModule


def test_token_logps_by_hand():
    """Vocab of 2, logits [0, ln 3] give p = [1/4, 3/4]. Sequence [a, b, b] with labels on the last two:
    position 0 predicts b (log 3/4), position 1 predicts b (log 3/4); the first label is never scored."""
    logits = torch.tensor([[[0.0, math.log(3)]] * 3])
    labels = torch.tensor([[IGNORE_INDEX, 1, 1]])
    assert token_logps(logits, labels)[0].tolist() == pytest.approx([math.log(0.75), math.log(0.75)])
    mean, n = sequence_logps(logits, labels)
    total, _ = sequence_logps(logits, labels, average=False)
    assert n.tolist() == [2] and mean.item() == pytest.approx(math.log(0.75)) and total.item() == pytest.approx(2 * math.log(0.75))
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]])  # only the last token, p = 1/4
    assert sequence_logps(logits, labels)[0].item() == pytest.approx(math.log(0.25))


def test_empty_response_is_an_error():
    with pytest.raises(ValueError, match="no response tokens"):
        sequence_logps(torch.zeros(1, 3, 2), torch.full((1, 3), IGNORE_INDEX))


def slow_reference(model, prompt: list[int], response: list[int]) -> float:
    """Mean log p(response | prompt), one unpadded sequence, token by token."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0]
    total = 0.0
    for i, token in enumerate(response):
        position = len(prompt) + i - 1  # logits at position t predict token t + 1
        total += torch.log_softmax(logits[position].double(), -1)[token].item()
    return total / len(response)


def test_batched_logps_match_separate_forwards(tiny_dir, tokenizer):
    module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=None)
    module.configure_model()
    encode = PairEncoder(tokenizer, Columns(), Truncation(), "auto")
    rows = [
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello there, friend"}],
         "rejected": [{"role": "assistant", "content": "No"}]},
        {"prompt": "A much longer prompt that needs more tokens than the other one", "chosen": "yes", "rejected": "no way at all"},
    ]
    pairs = [encode(r) for r in rows]
    batch = PreferenceCollator(tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        out = module.forward_logps(batch)
        for i, pair in enumerate(pairs):
            for side in ("chosen", "rejected"):
                expected = slow_reference(module.model, pair["prompt"], pair[side])
                assert out[f"{side}_logps"][i].item() == pytest.approx(expected, abs=1e-4)
                assert out[f"{side}_lengths"][i].item() == len(pair[side])
