"""The batches the modules read, one dataclass per kind, and the one padding helper.

Every token tensor is right-padded (under causal attention, right padding changes nothing before
it); ``labels`` hold the token ids of the response and ``IGNORE_INDEX`` on the prompt and the
padding, so only response tokens are scored. Lightning moves these dataclasses between devices
field by field.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100  # the label of a position that is not scored (prompt, padding)


def pad_right(rows: list[list[int]], value: int, width: int | None = None) -> Tensor:
    """``rows`` of different lengths as one ``[len(rows), width]`` long tensor, filled with ``value``
    after each row (``width`` defaults to the longest row)."""
    width = max(map(len, rows)) if width is None else width
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


@dataclass
class Sequences:
    """Token sequences, each a prompt followed by one response.

    Attributes:
        input_ids: ``[N, T]``, padded with the pad token.
        attention_mask: ``[N, T]``, 1 on real tokens.
        labels: ``[N, T]``, the response's token ids, ``IGNORE_INDEX`` elsewhere.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor

    @staticmethod
    def from_tokens(seqs: list[list[int]], prompt_lengths: list[int], pad_token_id: int) -> "Sequences":
        """Each ``prompt + response`` token list, whose first ``prompt_lengths[i]`` tokens are the prompt."""
        labels = [[IGNORE_INDEX] * p + seq[p:] for seq, p in zip(seqs, prompt_lengths)]
        return Sequences(
            pad_right(seqs, pad_token_id), pad_right([[1] * len(s) for s in seqs], 0), pad_right(labels, IGNORE_INDEX)
        )

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows(self, index: slice | Tensor) -> "Sequences":
        return Sequences(self.input_ids[index], self.attention_mask[index], self.labels[index])

    def tokens(self) -> list[tuple[list[int], list[int]]]:
        """Each sequence as ``(prompt, response)`` token lists, without padding."""
        ends = self.attention_mask.sum(-1).tolist()
        starts = (self.labels != IGNORE_INDEX).int().argmax(-1).tolist()
        return [(ids[:start], ids[start:end]) for ids, start, end in zip(self.input_ids.tolist(), starts, ends)]

    @staticmethod
    def cat(parts: list["Sequences"], pad_token_id: int) -> "Sequences":
        """Stacked on the batch axis, each padded on the right to the widest."""
        width = max(p.input_ids.shape[1] for p in parts)

        def pad(x: Tensor, value: int) -> Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return Sequences(
            torch.cat([pad(p.input_ids, pad_token_id) for p in parts]),
            torch.cat([pad(p.attention_mask, 0) for p in parts]),
            torch.cat([pad(p.labels, IGNORE_INDEX) for p in parts]),
        )


def mismatched(seqs: Sequences, pad_token_id: int) -> Sequences:
    """KTO's KL sequences: row i is the prompt of row i followed by the response of row i - 1
    (cyclically), the rotation TRL's KTOTrainer applies within each batch."""
    parts = seqs.tokens()
    rotated = [prompt + parts[i - 1][1] for i, (prompt, _) in enumerate(parts)]
    return Sequences.from_tokens(rotated, [len(prompt) for prompt, _ in parts], pad_token_id)


@dataclass
class PackedPairs:
    """Pairs as rows of ``[prompt, chosen, rejected]``, the prompt once (``pack_pairs``): one pair a row, or
    several (``data.max_tokens_per_row``), each with position ids of its own and attending to itself only.

    Attributes:
        input_ids: ``[R, T]``.
        position_ids: ``[R, T]``; each pair's start at 0, its rejected part continuing from the end of its prompt.
        segments: ``[R, T]``: 0 prompt, 1 chosen, 2 rejected, -1 padding.
        pairs: ``[R, T]``: the pair (its place in the batch) each token belongs to, -1 padding.
        index: ``[M]``, per scored response token: ``row * T + position`` of the output that predicts it.
        targets: ``[M]``, the token.
        sequence: ``[M]``, ``i`` for pair i's chosen, ``B + i`` for its rejected.
        ends: ``[2B]``, ``row * T + position`` of each response's last token (pair i's chosen, then rejected).
        spans: per row, each pair's ``(start, end)`` positions, from 0 on without gaps (``models.attention``).
    """

    input_ids: Tensor
    position_ids: Tensor
    segments: Tensor
    pairs: Tensor
    index: Tensor
    targets: Tensor
    sequence: Tensor
    ends: Tensor
    spans: list[list[tuple[int, int]]]


@dataclass
class PairBatch:
    """Preference pairs.

    Attributes:
        chosen, rejected: the two responses after their prompt, padded to one common ``T``.
        packed: the same pairs as shared-prompt sequences (``data.shared_prompt``), or None.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` float64 summed reference log-probs, when precomputed.
        margin: ``[B]`` float64 per-pair margins from the data's margin column (NaN where a row has none),
            or None when no row has one.
    """

    chosen: Sequences
    rejected: Sequences
    packed: PackedPairs | None = None
    ref_chosen_logps: Tensor | None = None
    ref_rejected_logps: Tensor | None = None
    margin: Tensor | None = None

    def __len__(self) -> int:
        return len(self.chosen)

    def tokens(self) -> Tensor:
        """Non-padding tokens of both sequences (the prompt counted twice, as in the standard layout)."""
        return (self.chosen.attention_mask.sum() + self.rejected.attention_mask.sum()).float()

    def positions(self) -> int:
        """Token positions the model computes for this batch, padding included: its packed rows, or both
        sequences."""
        if self.packed is not None:
            return self.packed.input_ids.numel()
        return self.chosen.input_ids.numel() + self.rejected.input_ids.numel()

    def both(self) -> Sequences:
        """Chosen then rejected, ``[2B, T]``."""
        return Sequences(
            *(
                torch.cat([getattr(self.chosen, k), getattr(self.rejected, k)])
                for k in ("input_ids", "attention_mask", "labels")
            )
        )

    def as_unpaired(self, pad_token_id: int) -> "UnpairedBatch":
        """Each chosen as a desirable and each rejected as an undesirable completion (what KTO trains on)."""
        completions = self.both()
        desirable = torch.arange(2 * len(self), device=completions.input_ids.device) < len(self)
        return UnpairedBatch(completions, desirable, mismatched(completions, pad_token_id), paired=True)


@dataclass
class UnpairedBatch:
    """Completions with a desirable or undesirable label (KTO).

    Attributes:
        completions: ``[N, T]``.
        desirable: ``[N]`` bool.
        kl: ``[N, T']``, ``mismatched(completions)``: each prompt with the previous row's completion.
        paired: built from pairs by ``PairBatch.as_unpaired``: rows i and B + i are one pair.
    """

    completions: Sequences
    desirable: Tensor
    kl: Sequences
    paired: bool = False

    def __len__(self) -> int:
        return len(self.completions)

    def tokens(self) -> Tensor:
        """Non-padding tokens of the completions."""
        return self.completions.attention_mask.sum().float()
