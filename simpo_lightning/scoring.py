"""Scoring responses with a causal LM: the summed log-probability of each response's tokens.

Given a ``chunk`` size and a model whose output head is a plain linear layer, only the positions
that predict a response token go through the head, ``chunk`` at a time (``label_logps``), so the
batch's ``[sequences, length, vocabulary]`` logits never exist. ``chunk=None`` (and a head that is
more than a linear layer, such as logit soft-capping or LoRA on the head) uses the model's own logits.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from simpo_lightning.batch import PackedPairs, PairBatch, Sequences
from simpo_lightning.logprobs import IGNORE_INDEX, at_least_float32, label_logps, sequence_logps
from simpo_lightning.model import decoder_and_head


@dataclass
class Scores:
    """Per-sequence totals over response tokens, each ``[N]``.

    Attributes:
        sum_logps: summed log-probability of the response (carries the gradient).
        lengths: response tokens |y|.
        mean_logits: mean logit over the response positions (no gradient; logged as ``logits/…``).
    """

    sum_logps: Tensor
    lengths: Tensor
    mean_logits: Tensor

    @property
    def mean_logps(self) -> Tensor:
        """SimPO's length-normalised log-probability, (1/|y|) Σ log π(y_t | …)."""
        return self.sum_logps / self.lengths

    def logps(self, average: bool) -> Tensor:
        return self.mean_logps if average else self.sum_logps

    def __getitem__(self, rows: slice | Tensor) -> "Scores":
        return Scores(self.sum_logps[rows], self.lengths[rows], self.mean_logits[rows])

    def halves(self) -> tuple["Scores", "Scores"]:
        """The first and the second half (chosen and rejected of a pair batch)."""
        n = len(self.lengths) // 2
        return self[:n], self[n:]


def score_sequences(model: nn.Module, seqs: Sequences, chunk: int | None) -> Scores:
    """Scores of right-padded sequences."""
    head = _chunked_head(model, chunk)
    if head is not None:
        labels = seqs.labels
        scored = labels[:, 1:] != IGNORE_INDEX  # position t predicts token t + 1
        rows, positions = scored.nonzero(as_tuple=True)
        index = rows * labels.shape[1] + positions
        logps, mean_logit = _flat_logps(
            model,
            head,
            chunk,
            index,
            labels[:, 1:][scored],
            input_ids=seqs.input_ids,
            attention_mask=seqs.attention_mask,
        )
        return _per_sequence(logps, mean_logit, rows, len(seqs))
    # Only positions that predict a response token need logits: skipping the output head over the
    # rest of the prompt saves most of its cost (by FLOPs the head is a fifth of SmolLM2's forward).
    first = int((seqs.labels != IGNORE_INDEX).int().argmax(-1).min())
    keep = min(seqs.labels.shape[1], seqs.labels.shape[1] - first + 1)
    logits = model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask, logits_to_keep=keep).logits
    labels = seqs.labels[:, -keep:]
    sums, lengths = sequence_logps(logits, labels, average=False)
    mask = labels[:, 1:] != IGNORE_INDEX
    mean_logit = (at_least_float32(logits[:, :-1].detach()).mean(-1) * mask).sum(-1) / lengths
    return Scores(sums, lengths, mean_logit)


def score_packed(model: nn.Module, packed: PackedPairs, chunk: int | None) -> Scores:
    """Scores of chosen then rejected (``[2B]``) from shared-prompt sequences: rejected tokens attend to the
    prompt and to themselves, never to the chosen tokens, and their position ids continue from the end of
    the prompt, so each response is scored exactly as in its own sequence while the prompt is encoded once."""
    segments = packed.segments
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    key, query = segments[:, None, :], segments[:, :, None]
    visible = causal & ((key == 0) | (key == query)) & (key >= 0)
    visible |= torch.eye(width, dtype=torch.bool, device=segments.device)  # padding rows see themselves, not nothing
    logps, mean_logit = _flat_logps(
        model,
        _chunked_head(model, chunk),
        chunk,
        packed.index,
        packed.targets,
        input_ids=packed.input_ids,
        attention_mask=visible[:, None],
        position_ids=packed.position_ids,
    )
    return _per_sequence(logps, mean_logit, packed.sequence, 2 * len(segments))


def score_pair_batch(model: nn.Module, batch: PairBatch, chunk: int | None) -> Scores:
    """Scores of the chosen then the rejected responses, ``[2B]``, in one forward pass (packed, or both stacked)."""
    return (
        score_packed(model, batch.packed, chunk)
        if batch.packed is not None
        else score_sequences(model, batch.both(), chunk)
    )


def _chunked_head(model: nn.Module, chunk: int | None) -> tuple[nn.Module, Tensor] | None:
    """``decoder_and_head(model)`` where the chunked path applies, else None."""
    return decoder_and_head(model) if chunk else None


def _flat_logps(
    model: nn.Module,
    head: tuple[nn.Module, Tensor] | None,
    chunk: int | None,
    index: Tensor,
    targets: Tensor,
    **inputs: Tensor,
) -> tuple[Tensor, Tensor]:
    """Log-prob of ``targets`` ``[M]`` predicted at flat positions ``index`` ``[M]`` (row * width + position)
    of the model's output, and the mean logit there (no gradient). Given ``head`` (decoder, head weight)
    the logits exist a chunk at a time (``label_logps``), else the model's full logits are computed."""
    if head is not None:
        decoder, weight = head
        hidden = decoder(**inputs).last_hidden_state
        return label_logps(hidden.flatten(0, 1)[index], weight, targets, chunk)
    logits = at_least_float32(model(**inputs).logits.flatten(0, 1)[index])
    logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return logps, logits.detach().mean(-1)


def _per_sequence(logps: Tensor, mean_logit: Tensor, rows: Tensor, n: int) -> Scores:
    """Per-token values ``[M]`` of sequences ``rows`` ``[M]`` summed into ``Scores`` of ``n`` sequences."""
    lengths = torch.bincount(rows, minlength=n)
    if (lengths == 0).any():
        raise ValueError("a sequence has no response tokens; the data pipeline should have dropped it")

    def total(x: Tensor) -> Tensor:
        return torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, rows, x)

    return Scores(total(logps), lengths, total(mean_logit) / lengths)
