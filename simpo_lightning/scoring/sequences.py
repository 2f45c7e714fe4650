"""Scoring responses with a causal LM: the summed log-probability of each response's tokens.

Given a ``chunk`` size and a model whose output head is a plain linear layer, only the positions
that predict a response token go through the head, ``chunk`` at a time (``label_logps``), so the
batch's ``[sequences, length, vocabulary]`` logits never exist. ``chunk=None`` (and a head that is
more than a linear layer, such as logit soft-capping or LoRA on the head) uses the model's own logits.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

from simpo_lightning.data.batch import PackedPairs, PairBatch, Sequences, pad_right
from simpo_lightning.models.loading import decoder_and_head
from simpo_lightning.scoring.logprobs import IGNORE_INDEX, at_least_float32, label_logps, sequence_logps


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
    """Scores of chosen then rejected (``[2B]``) from shared-prompt rows: rejected tokens attend to the prompt and
    to themselves, never to the chosen tokens (nor to another pair of the row), and their position ids continue
    from the end of the prompt, so each response is scored exactly as in its own sequence while the prompt is
    encoded once."""
    visible = shared_prompt_mask(packed.segments, packed.pairs)
    logps, mean_logit = _flat_logps(
        model,
        _chunked_head(model, chunk),
        chunk,
        packed.index,
        packed.targets,
        input_ids=packed.input_ids,
        attention_mask=visible,
        position_ids=packed.position_ids,
        pair_spans=packed.spans,
    )
    return _per_sequence(logps, mean_logit, packed.sequence, len(packed.ends))


def shared_prompt_mask(segments: Tensor, pairs: Tensor | None = None) -> Tensor:
    """The ``[B, 1, T, T]`` attention mask of shared-prompt rows (``segments``: 0 prompt, k > 0 the k-th response,
    -1 padding; ``pairs``: which pair of the row a token belongs to, where a row holds several): causal, within
    one pair, and a response sees its prompt and itself only. (A dense mask: a kernel computes the masked
    positions too. With FlexAttention the same rule is a ``BlockMask`` whose masked blocks are skipped, but its
    backward does not run on a CPU.)"""
    width = segments.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segments.device).tril()
    key, query = segments[:, None, :], segments[:, :, None]
    visible = causal & ((key == 0) | (key == query)) & (key >= 0)
    if pairs is not None:
        visible &= pairs[:, None, :] == pairs[:, :, None]
    visible |= torch.eye(width, dtype=torch.bool, device=segments.device)  # padding rows see themselves, not nothing
    return visible[:, None]


def score_pair_batch(model: nn.Module, batch: PairBatch, chunk: int | None) -> Scores:
    """Scores of the chosen then the rejected responses, ``[2B]``, in one forward pass (packed, or both stacked)."""
    return (
        score_packed(model, batch.packed, chunk)
        if batch.packed is not None
        else score_sequences(model, batch.both(), chunk)
    )


@dataclass
class PackedCompletions:
    """Completions after their prompts as model inputs (``pack_completions``).

    Attributes:
        inputs: ``input_ids``, ``attention_mask`` (``[S, 1, W, W]``) and ``position_ids`` of S sequences.
        index: ``[M]``, per completion token: ``sequence * W + position`` of the output that predicts it.
        targets: ``[M]``, the token.
        rows, cols: ``[M]``, where the token is in the ``[N, T]`` completions.
        shape: ``(N, T)``.
    """

    inputs: dict[str, Tensor]
    index: Tensor
    targets: Tensor
    rows: Tensor
    cols: Tensor
    shape: tuple[int, int]

    def unflatten(self, values: Tensor) -> Tensor:
        """Per-token values ``[M]`` as ``[N, T]``, 0 where there is no token."""
        out = torch.zeros(self.shape, dtype=values.dtype, device=values.device)
        return out.index_put((self.rows, self.cols), values)


def pack_completions(
    prompts: list[list[int]], completions: Tensor, mask: Tensor, pad_token_id: int, shared_prompt: bool = True
) -> PackedCompletions:
    """Right-padded ``completions`` ``[N, T]`` (``mask`` 1 on their tokens) after their prompts, as sequences.

    With ``shared_prompt`` the completions of one prompt (equal token lists) are one sequence ``[prompt, c1,
    c2, …]`` in which each completion sees the prompt and itself only, with positions continuing from the
    prompt (as ``score_packed``): the prompt is encoded once per group instead of once per completion. The
    attention mask is dense, ``[groups, 1, W, W]``; for very long groups, use separate sequences instead."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("a completion without a prompt has no position that predicts its first token")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt) if shared_prompt else (i, *prompt), []).append(i)
    lengths = mask.sum(-1).long().tolist()
    token_lists = [completions[i, : lengths[i]].tolist() for i in range(len(prompts))]
    width = max(len(prompts[m[0]]) + sum(lengths[i] for i in m) for m in groups.values())
    rows, segments, positions, index, targets, where = [], [], [], [], [], ([], [])
    for r, members in enumerate(groups.values()):
        prompt = prompts[members[0]]
        p = len(prompt)
        row, segment, position = list(prompt), [0] * p, list(range(p))
        for k, i in enumerate(members, 1):
            start = len(row)
            for j, token in enumerate(token_lists[i]):
                index.append(r * width + (p - 1 if j == 0 else start + j - 1))  # the position that predicts it
                targets.append(token)
                where[0].append(i)
                where[1].append(j)
            row += token_lists[i]
            segment += [k] * lengths[i]
            position += range(p, p + lengths[i])
        rows.append(row)
        segments.append(segment)
        positions.append(position)
    device = completions.device
    inputs = {
        "input_ids": pad_right(rows, pad_token_id, width).to(device),
        "attention_mask": shared_prompt_mask(pad_right(segments, -1, width).to(device)),
        "position_ids": pad_right(positions, 0, width).to(device),
    }

    def tensor(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return PackedCompletions(
        inputs, tensor(index), tensor(targets), tensor(where[0]), tensor(where[1]), tuple(mask.shape)
    )


def score_completions(
    model: nn.Module,
    prompts: list[list[int]],
    completions: Tensor,
    mask: Tensor,
    pad_token_id: int,
    chunk: int | None,
    temperature: float = 1.0,
    shared_prompt: bool = True,
) -> Tensor:
    """Per-token log-probs ``[N, T]`` of right-padded ``completions`` ``[N, T]`` (``mask`` 1 on their tokens)
    after their prompts (``pack_completions``), with the logits divided by the sampling ``temperature``; 0
    where ``mask`` is 0."""
    packed = pack_completions(prompts, completions, mask, pad_token_id, shared_prompt)
    head = _chunked_head(model, chunk)
    logps, _ = _flat_logps(model, head, chunk, packed.index, packed.targets, temperature, **packed.inputs)
    return packed.unflatten(logps)


def _chunked_head(model: nn.Module, chunk: int | None) -> tuple[nn.Module, Tensor] | None:
    """``decoder_and_head(model)`` where the chunked path applies, else None."""
    return decoder_and_head(model) if chunk else None


def _flat_logps(
    model: nn.Module,
    head: tuple[nn.Module, Tensor] | None,
    chunk: int | None,
    index: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    **inputs,
) -> tuple[Tensor, Tensor]:
    """Log-prob of ``targets`` ``[M]`` predicted at flat positions ``index`` ``[M]`` (row * width + position)
    of the model's output with its logits divided by ``temperature``, and the mean logit there (no gradient).
    Given ``head`` (decoder, head weight) the logits exist a chunk at a time (``label_logps``), else the
    model's full logits are computed."""
    if head is not None:
        decoder, weight = head
        hidden = decoder(**inputs).last_hidden_state
        return label_logps(
            hidden.flatten(0, 1)[index], weight / temperature if temperature != 1 else weight, targets, chunk
        )
    logits = at_least_float32(model(**inputs).logits.flatten(0, 1)[index]) / temperature
    logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return logps, logits.detach().mean(-1)


def _per_sequence(logps: Tensor, mean_logit: Tensor, rows: Tensor, n: int) -> Scores:
    """Per-token values ``[M]`` of sequences ``rows`` ``[M]`` summed into ``Scores`` of ``n`` sequences."""
    lengths = torch.zeros(n, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
    if not is_fake(lengths) and (lengths == 0).any():  # fake tensors (``estimate``) have no values to check
        raise ValueError("a sequence has no response tokens; the data pipeline should have dropped it")

    def total(x: Tensor) -> Tensor:
        return torch.zeros(n, dtype=x.dtype, device=x.device).index_add(0, rows, x)

    return Scores(total(logps), lengths, total(mean_logit) / lengths)
