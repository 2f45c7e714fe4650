"""Collation and sampling: encoded examples into padded batches (``simpo_lightning.batch``), and the
training order that is the same for any number of processes and resumes mid-epoch."""

from collections.abc import Sequence

import torch
from torch.utils.data import DistributedSampler

from simpo_lightning.data.batch import PackedPairs, PairBatch, Sequences, UnpairedBatch, mismatched, pad_right


def pack_pairs(examples: list[dict], pad_token_id: int) -> PackedPairs:
    """Each pair as one right-padded sequence ``[prompt, chosen, rejected]`` (the prompt once); see
    ``PackedPairs``. The first rejected token is predicted by the prompt's last position, like the first
    chosen token."""
    n, width = len(examples), max(len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples)
    rows, segments, positions, index, targets, sequence = [], [], [], [], [], []
    for i, e in enumerate(examples):
        p, c, r = len(e["prompt"]), len(e["chosen"]), len(e["rejected"])
        rows.append(e["prompt"] + e["chosen"] + e["rejected"])
        segments.append([0] * p + [1] * c + [2] * r)
        positions.append(list(range(p + c)) + list(range(p, p + r)))
        predicted_at = [p + k - 1 for k in range(c)] + [p - 1] + [p + c + k - 1 for k in range(1, r)]
        for where, token, seq in zip(predicted_at, e["chosen"] + e["rejected"], [i] * c + [n + i] * r):
            if where >= 0:  # with an empty prompt the first token has no predictor, as in a separate sequence
                index.append(i * width + where)
                targets.append(token)
                sequence.append(seq)
    return PackedPairs(
        pad_right(rows, pad_token_id, width),
        pad_right(positions, 0, width),
        pad_right(segments, -1, width),
        torch.tensor(index),
        torch.tensor(targets),
        torch.tensor(sequence),
    )


class PreferenceCollator:
    """Pads a batch of encoded examples (right padding) into a ``PairBatch`` (with ``shared_prompt``, also
    packed), or, for unpaired examples, an ``UnpairedBatch`` with its KL sequences. Precomputed reference
    log-probs of the examples come along as float64 (as computed; the step casts them to the policy's dtype)."""

    def __init__(self, pad_token_id: int, shared_prompt: bool = False):
        self.pad_token_id, self.shared_prompt = pad_token_id, shared_prompt

    def __call__(self, examples: list[dict]) -> PairBatch | UnpairedBatch:
        lengths = [len(e["prompt"]) for e in examples]
        pad = self.pad_token_id
        if "completion" in examples[0]:
            seqs = Sequences.from_tokens([e["prompt"] + e["completion"] for e in examples], lengths, pad)
            return UnpairedBatch(seqs, torch.tensor([e["desirable"] for e in examples]), mismatched(seqs, pad))
        n = len(examples)
        both = Sequences.from_tokens(
            [e["prompt"] + e[side] for side in ("chosen", "rejected") for e in examples], lengths + lengths, pad
        )
        batch = PairBatch(
            both.rows(slice(0, n)),
            both.rows(slice(n, None)),
            packed=pack_pairs(examples, pad) if self.shared_prompt else None,
        )
        if "ref_chosen_logps" in examples[0]:
            batch.ref_chosen_logps, batch.ref_rejected_logps = (
                torch.tensor([e[f"ref_{side}_logps"] for e in examples], dtype=torch.float64)
                for side in ("chosen", "rejected")
            )
        margins = [e.get("margin") for e in examples]
        if any(m is not None for m in margins):
            batch.margin = torch.tensor([float("nan") if m is None else m for m in margins], dtype=torch.float64)
        return batch


class GlobalBatchSampler(DistributedSampler):
    """Training order that is the same for any number of processes and can resume mid-epoch.

    Each epoch shuffles the split with a generator seeded by ``(seed, epoch)`` and cuts the order into
    global batches of ``batch_size * world_size``; process ``rank`` takes its own ``batch_size`` slice
    of each. Given ``lengths``, batches group examples of similar length (bucketing, same seeding). A
    2-process run with batch size B therefore trains on the same global batches as a
    1-process run with 2B, and a resumed run can skip exactly the batches it has trained on.
    (A ``DistributedSampler`` subclass so Lightning does not replace it with its own.)
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        pool: int = 64,
    ):
        self.size, self.batch_size, self.world_size, self.rank, self.seed = size, batch_size, world_size, rank, seed
        self.lengths, self.pool = lengths, pool
        self.epoch = 0
        self.skip: tuple[int, int] | None = None  # (epoch, batches of it already trained)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        step = self.batch_size * self.world_size
        if self.lengths is not None:
            # Bucketing: sort each pool of `pool` global batches by length, so a batch holds similar
            # lengths and little padding, then shuffle the batches so lengths do not trend over the epoch.
            span = step * self.pool
            order = [
                i for s in range(0, self.size, span) for i in sorted(order[s : s + span], key=self.lengths.__getitem__)
            ]
        groups = [order[s : s + step] for s in range(0, self.size, step)]
        if self.lengths is not None:
            groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        out = []
        for group in groups:
            share = -(-len(group) // self.world_size)  # a short global batch is split as evenly as it goes
            if len(group) >= self.world_size:
                out.append(group[self.rank * share : (self.rank + 1) * share])
        return out

    def __iter__(self):
        batches = self._batches()
        if self.skip is not None and self.skip[0] == self.epoch:
            batches = batches[self.skip[1] :]
            self.skip = None
        return iter([i for batch in batches for i in batch])

    def __len__(self) -> int:
        return sum(map(len, self._batches()))
