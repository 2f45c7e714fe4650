import copy
import math

import pytest
import torch

from simpo_lightning.data import PairEncoder, PreferenceCollator, Truncation, Columns
from simpo_lightning.logprobs import IGNORE_INDEX, sequence_logps, token_logps
from simpo_lightning.model import LoraConfig, PolicyConfig
from simpo_lightning.module import SimPOModule

from helpers import assert_rounding_close


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
    """The batched, padded, chunked float32 path against a float64 copy of the model scored one
    unpadded sequence and one token at a time."""
    module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=None)
    module.configure_model()
    reference_model = copy.deepcopy(module.model).double()
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
                expected = slow_reference(reference_model, pair["prompt"], pair[side])
                assert_rounding_close(out[f"{side}_logps"][i], expected, reduction=tokenizer.vocab_size, what=side)
                assert out[f"{side}_lengths"][i].item() == len(pair[side])


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_label_logps_equal_log_softmax_forward_and_backward(chunk):
    from simpo_lightning.logprobs import label_logps

    torch.manual_seed(0)
    hidden, weight = torch.randn(13, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    targets, upstream = torch.randint(0, 50, (13,)), torch.randn(13)
    double = (hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_())

    def plain(h, w):
        logits = h @ w.T
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1), logits.mean(-1)

    reference, reference_mean = plain(*double)
    reference_grads = torch.autograd.grad(reference, double, upstream.double())
    for name, (logps, mean_logit) in {"chunked": label_logps(hidden, weight, targets, chunk), "plain": plain(hidden, weight)}.items():
        assert_rounding_close(logps, reference, reduction=50, what=name)  # K: the vocabulary of 50
        assert_rounding_close(mean_logit, reference_mean, reduction=50, what=name)
        for grad, expected in zip(torch.autograd.grad(logps, (hidden, weight), upstream), reference_grads):
            assert_rounding_close(grad, expected, reduction=50, what=f"{name} gradient")
    assert torch.autograd.gradcheck(lambda h, w: label_logps(h, w, targets, chunk)[0], double)


def test_chunked_label_logps_under_bf16_autocast_match_the_autocast_head():
    from simpo_lightning.logprobs import label_logps

    """Under autocast the products are bfloat16, as the model's own head; both are checked against
    the float64 product of the bfloat16-rounded operands, with bfloat16's epsilon in the rule."""
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(9, 32), torch.randn(40, 32), torch.randint(0, 40, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = label_logps(hidden, weight, targets, 4)
        logits = hidden @ weight.T  # what the model's head computes under autocast: bfloat16
    assert logits.dtype == torch.bfloat16 and logps.dtype == torch.float32
    head = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    exact = hidden.bfloat16().double() @ weight.bfloat16().double().T
    reference = torch.log_softmax(exact, -1).gather(-1, targets[:, None]).squeeze(-1)
    for name, value in (("chunked", logps), ("autocast head", head)):
        assert_rounding_close(value, reference, reduction=40, dtype=torch.bfloat16, what=name)


def pair_batch(tokenizer, shared_prompt: bool = False) -> dict:
    encode = PairEncoder(tokenizer, Columns(), Truncation(), "auto")
    rows = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello there, friend"}],
             "rejected": [{"role": "assistant", "content": "No"}]},
            {"prompt": "A much longer prompt that needs more tokens than the other one", "chosen": "yes", "rejected": "no way at all"}]
    return PreferenceCollator(tokenizer.pad_token_id, shared_prompt=shared_prompt)([encode(r) for r in rows])


def logps_and_gradients(tiny_dir, lora, chunk, batch, double: bool = False) -> tuple[dict, dict]:
    """forward_logps of a fresh module (same LoRA initialisation, adapters moved off 0 so they matter)
    and the gradients of a loss of them; in float64 with ``double``."""
    torch.manual_seed(0)
    module = SimPOModule(policy=PolicyConfig(name_or_path=tiny_dir), lora=lora, logits_chunk=chunk)
    module.configure_model()
    if lora is not None:
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    if double:
        module.model.double()
    out = module.forward_logps(batch)
    (out["chosen_logps"] - 0.5 * out["rejected_logps"]).sum().backward()
    return out, {n: p.grad for n, p in module.model.named_parameters() if p.requires_grad}


def assert_matches_float64(result, reference, vocab: int, what: str) -> None:
    (out, grads), (ref_out, ref_grads) = result, reference
    for key in ref_out:
        assert_rounding_close(out[key], ref_out[key], reduction=vocab, what=f"{what} {key}")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_rounding_close(grads[name], ref_grads[name], reduction=vocab, what=f"{what} gradient of {name}")


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4)], ids=["full", "lora"])
def test_chunked_module_path_equals_full_logits_forward_and_gradients(tiny_dir, tokenizer, lora):
    """Chunked head and the model's full logits, each against the full-logits path in float64."""
    batch = pair_batch(tokenizer)
    reference = logps_and_gradients(tiny_dir, lora, None, batch, double=True)
    for chunk in (3, None):
        assert_matches_float64(logps_and_gradients(tiny_dir, lora, chunk, batch), reference, tokenizer.vocab_size, f"chunk {chunk}")


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
    """The packed [prompt, chosen, rejected] sequence and the two separate ones, each against the
    separate sequences in float64."""
    separate, packed = pair_batch(tokenizer), pair_batch(tokenizer, shared_prompt=True)
    reference = logps_and_gradients(tiny_dir, lora, chunk, separate, double=True)
    for name, batch in (("shared prompt", packed), ("separate", separate)):
        result = logps_and_gradients(tiny_dir, lora, chunk, batch)
        assert_matches_float64(result, reference, tokenizer.vocab_size, name)
    assert result[0]["chosen_lengths"].tolist() == (separate["chosen_labels"][:, 1:] != IGNORE_INDEX).sum(-1).tolist()
