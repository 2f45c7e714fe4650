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


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_label_logps_equal_log_softmax_forward_and_backward(chunk):
    from simpo_lightning.logprobs import label_logps

    torch.manual_seed(0)
    hidden, weight = torch.randn(13, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    targets, upstream = torch.randint(0, 50, (13,)), torch.randn(13)
    logps, mean_logit = label_logps(hidden, weight, targets, chunk)
    logits = hidden @ weight.T
    expected = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, expected)
    torch.testing.assert_close(mean_logit, logits.mean(-1))
    for ours, plain in zip(torch.autograd.grad(logps, (hidden, weight), upstream), torch.autograd.grad(expected, (hidden, weight), upstream)):
        torch.testing.assert_close(ours, plain)
    double = (hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_())
    assert torch.autograd.gradcheck(lambda h, w: label_logps(h, w, targets, chunk)[0], double)


def test_chunked_label_logps_under_bf16_autocast_match_the_autocast_head():
    from simpo_lightning.logprobs import label_logps

    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(9, 32), torch.randn(40, 32), torch.randint(0, 40, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = label_logps(hidden, weight, targets, 4)
        logits = hidden @ weight.T  # what the model's head computes under autocast: bfloat16
    assert logits.dtype == torch.bfloat16 and logps.dtype == torch.float32
    expected = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logps, expected)


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4)], ids=["full", "lora"])
def test_chunked_module_path_equals_full_logits_forward_and_gradients(tiny_dir, tokenizer, lora):
    encode = PairEncoder(tokenizer, Columns(), Truncation(), "auto")
    rows = [{"prompt": "Name a colour.", "chosen": "Blue, like the sky", "rejected": "Seven"},
            {"prompt": "A much longer prompt that needs more tokens than the other one", "chosen": "yes", "rejected": "no way at all"}]
    batch = PreferenceCollator(tokenizer.pad_token_id)([encode(r) for r in rows])
    results = []
    for chunk in (3, None):
        torch.manual_seed(0)  # same LoRA initialisation
        module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=lora, logits_chunk=chunk)
        module.configure_model()
        if lora is not None:  # B starts at 0; move it so the adapters matter
            for name, p in module.model.named_parameters():
                if "lora_B" in name:
                    p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        out = module.forward_logps(batch)
        loss = (out["chosen_logps"] - 0.5 * out["rejected_logps"]).sum()
        loss.backward()
        grads = {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}
        results.append((out, grads))
    (chunked, chunked_grads), (full, full_grads) = results
    for key in full:
        torch.testing.assert_close(chunked[key], full[key], rtol=1e-5, atol=1e-5)
    assert chunked_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(chunked_grads[name], full_grads[name], rtol=1e-4, atol=1e-6)


def test_pack_pairs_by_hand():
    """Prompt [5, 6], chosen [7, 8], rejected [9]: one row [5, 6, 7, 8, 9]; positions [0, 1, 2, 3, 2]; chosen
    tokens predicted at positions 1 and 2, the rejected token at the prompt's last position, 1."""
    from simpo_lightning.data import pack_pairs

    packed = pack_pairs([{"prompt": [5, 6], "chosen": [7, 8], "rejected": [9]},
                         {"prompt": [1], "chosen": [2], "rejected": [3, 4]}], pad_token_id=0)
    assert packed["packed_input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert packed["packed_position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    assert packed["packed_segments"].tolist() == [[0, 0, 1, 1, 2], [0, 1, 2, 2, -1]]
    assert packed["packed_index"].tolist() == [1, 2, 1, 5, 5, 7]  # row 1 starts at 5: [1|2|3 4] -> 2 at 0, 3 at 0, 4 at 2
    assert packed["packed_targets"].tolist() == [7, 8, 9, 2, 3, 4]
    assert packed["packed_sequence"].tolist() == [0, 0, 2, 1, 3, 3]


@pytest.mark.parametrize("lora, chunk", [(None, 4), (LoraConfig(r=4), 4), (None, None)], ids=["full", "lora", "full-logits"])
def test_shared_prompt_forward_equals_separate_sequences(tiny_dir, tokenizer, lora, chunk):
    encode = PairEncoder(tokenizer, Columns(), Truncation(), "auto")
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello there, friend"}],
             "rejected": [{"role": "assistant", "content": "No"}]},
            {"prompt": "A much longer prompt that needs more tokens than the other one", "chosen": "yes", "rejected": "no way at all"}]
    pairs = [encode(r) for r in rows]
    torch.manual_seed(0)
    module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=lora, logits_chunk=chunk)
    module.configure_model()
    results = []
    for shared in (True, False):
        module.model.zero_grad()
        out = module.forward_logps(PreferenceCollator(tokenizer.pad_token_id, shared_prompt=shared)(pairs))
        (out["chosen_logps"] - 0.5 * out["rejected_logps"]).sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}))
    (packed, packed_grads), (separate, separate_grads) = results
    assert packed["chosen_lengths"].tolist() == [len(p["chosen"]) for p in pairs]
    for key in separate:
        torch.testing.assert_close(packed[key], separate[key], rtol=1e-5, atol=1e-5)
    for name in separate_grads:
        torch.testing.assert_close(packed_grads[name], separate_grads[name], rtol=1e-4, atol=1e-6)
