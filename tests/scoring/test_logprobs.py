import math

import pytest
import torch

from simpo_lightning.scoring.logprobs import IGNORE_INDEX, label_logps, sequence_logps, token_logps

from helpers import assert_rounding_close


def test_token_logps_by_hand():
    """Vocab of 2, logits [0, ln 3] give p = [1/4, 3/4]. Sequence [a, b, b] with labels on the last two:
    position 0 predicts b (log 3/4), position 1 predicts b (log 3/4); the first label is never scored."""
    logits = torch.tensor([[[0.0, math.log(3)]] * 3])
    labels = torch.tensor([[IGNORE_INDEX, 1, 1]])
    assert token_logps(logits, labels)[0].tolist() == pytest.approx([math.log(0.75), math.log(0.75)])
    mean, n = sequence_logps(logits, labels)
    total, _ = sequence_logps(logits, labels, average=False)
    assert n.tolist() == [2] and mean.item() == pytest.approx(math.log(0.75))
    assert total.item() == pytest.approx(2 * math.log(0.75))
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0]])  # only the last token, p = 1/4
    assert sequence_logps(logits, labels)[0].item() == pytest.approx(math.log(0.25))


def test_log_softmax_runs_in_float32_or_float64_never_lower():
    logits = torch.tensor([[[0.0, math.log(3)]] * 2])
    labels = torch.tensor([[IGNORE_INDEX, 1]])
    assert token_logps(logits.bfloat16(), labels).dtype == torch.float32
    assert token_logps(logits.double(), labels).dtype == torch.float64


def test_empty_response_is_an_error():
    with pytest.raises(ValueError, match="no response tokens"):
        sequence_logps(torch.zeros(1, 3, 2), torch.full((1, 3), IGNORE_INDEX))


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunked_label_logps_equal_log_softmax_forward_and_backward(chunk):
    torch.manual_seed(0)
    hidden, weight = torch.randn(13, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    targets, upstream = torch.randint(0, 50, (13,)), torch.randn(13)
    double = (hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_())

    def plain(h, w):
        logits = h @ w.T
        return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1), logits.mean(-1)

    reference, reference_mean = plain(*double)
    reference_grads = torch.autograd.grad(reference, double, upstream.double())
    paths = {"chunked": label_logps(hidden, weight, targets, chunk), "plain": plain(hidden, weight)}
    for name, (logps, mean_logit) in paths.items():
        assert_rounding_close(logps, reference, reduction=50, what=name)  # K: the vocabulary of 50
        assert_rounding_close(mean_logit, reference_mean, reduction=50, what=name)
        for grad, expected in zip(torch.autograd.grad(logps, (hidden, weight), upstream), reference_grads):
            assert_rounding_close(grad, expected, reduction=50, what=f"{name} gradient")
    assert torch.autograd.gradcheck(lambda h, w: label_logps(h, w, targets, chunk)[0], double)


def test_chunked_label_logps_under_bf16_autocast_match_the_autocast_head():
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
