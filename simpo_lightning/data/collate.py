"""Collation and sampling: encoded examples into padded batches (``data.batch``), one pair a row or several
packed into rows of a token budget, and the training order that is the same for any number of processes and
resumes mid-epoch."""

from collections.abc import Sequence

import torch
from torch.utils.data import DistributedSampler

from simpo_lightning.data.batch import PackedPairs, PairBatch, Sequences, UnpairedBatch, mismatched, pad_right


def pack_pairs(examples: list[dict], pad_token_id: int, rows: list[list[int]] | None = None) -> PackedPairs:
    """The pairs as right-padded rows of ``[prompt, chosen, rejected]`` (the prompt once; ``rows`` lists which
    examples share a row, by default one each); see ``PackedPairs``. The first rejected token is predicted by
    the prompt's last position, like the first chosen token."""
    n = len(examples)
    rows = [[i] for i in range(n)] if rows is None else rows
    sizes = [len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples]
    width = max(sum(sizes[i] for i in row) for row in rows)
    ids, segments, pairs, positions, index, targets, sequence, ends = [], [], [], [], [], [], [], [0] * (2 * n)
    spans = []
    for r, row in enumerate(rows):
        ids.append([]), segments.append([]), pairs.append([]), positions.append([]), spans.append([])
        for i in row:
            e, start = examples[i], len(ids[-1])
            spans[-1].append((start, start + sizes[i]))
            p, c, k = len(e["prompt"]), len(e["chosen"]), len(e["rejected"])
            ids[-1] += e["prompt"] + e["chosen"] + e["rejected"]
            segments[-1] += [0] * p + [1] * c + [2] * k
            pairs[-1] += [i] * (p + c + k)
            positions[-1] += list(range(p + c)) + list(range(p, p + k))
            predicted_at = [p + j - 1 for j in range(c)] + [p - 1] + [p + c + j - 1 for j in range(1, k)]
            for where, token, seq in zip(predicted_at, e["chosen"] + e["rejected"], [i] * c + [n + i] * k):
                if where >= 0:  # with an empty prompt the first token has no predictor, as in a separate sequence
                    index.append(r * width + start + where)
                    targets.append(token)
                    sequence.append(seq)
            ends[i], ends[n + i] = r * width + start + p + c - 1, r * width + start + p + c + k - 1
    return PackedPairs(
        pad_right(ids, pad_token_id, width),
        pad_right(positions, 0, width),
        pad_right(segments, -1, width),
        pad_right(pairs, -1, width),
        torch.tensor(index),
        torch.tensor(targets),
        torch.tensor(sequence),
        torch.tensor(ends),
        spans,
    )


def first_fit(items: list[int], sizes: Sequence[int], budget: int) -> list[list[int]]:
    """``items`` into rows of at most ``budget`` total ``sizes``, first fit in decreasing size order (an item over
    the budget gets a row of its own); rows in order of creation."""
    rows, room = [], []
    for item in sorted(items, key=lambda i: -sizes[i]):
        at = next((r for r, left in enumerate(room) if left >= sizes[item]), None)
        if at is None:
            rows.append([item])
            room.append(budget - sizes[item])
        else:
            rows[at].append(item)
            room[at] -= sizes[item]
    return rows


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
        rows = None
        if "row" in examples[0]:  # PackedSampler's batches: which examples share a row
            rows = [
                [i for i, e in enumerate(examples) if e["row"] == r] for r in dict.fromkeys(e["row"] for e in examples)
            ]
        batch = PairBatch(
            both.rows(slice(0, n)),
            both.rows(slice(n, None)),
            packed=pack_pairs(examples, pad, rows) if self.shared_prompt or rows else None,
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


class _GlobalBatches(DistributedSampler):
    """Global batches cut from an epoch's order seeded by ``(seed, epoch)``, each process taking its own slice, and
    a resumed run skipping the batches it trained on (``skip``). A ``DistributedSampler`` subclass so Lightning does
    not replace it with its own. Subclasses give ``_batches()``."""

    epoch: int = 0
    skip: tuple[int, int] | None = None  # (epoch, batches of it already trained)
    world_size: int
    rank: int

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100003 + self.epoch)

    def _mine(self, groups: list[list]) -> list[list]:
        """This process's slice of each global batch; a short last batch is split as evenly as it goes, and dropped
        where it has fewer items than processes."""
        out = []
        for group in groups:
            share = -(-len(group) // self.world_size)
            if len(group) >= self.world_size:
                out.append(group[self.rank * share : (self.rank + 1) * share])
        return out

    def _remaining(self) -> list[list]:
        batches = self._batches()
        if self.skip is not None and self.skip[0] == self.epoch:
            batches = batches[self.skip[1] :]
            self.skip = None
        return batches


class GlobalBatchSampler(_GlobalBatches):
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

    def _batches(self) -> list[list[int]]:
        generator = self._generator()
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
        return self._mine(groups)

    def __iter__(self):
        return iter([i for batch in self._remaining() for i in batch])

    def __len__(self) -> int:
        return sum(map(len, self._batches()))


class PackedSampler(_GlobalBatches):
    """Training batches of packed rows: several pairs a row, up to ``budget`` tokens (``[prompt, chosen, rejected]``,
    the prompt once), ``rows`` rows a batch in each process.

    Each epoch shuffles the split with a generator seeded by ``(seed, epoch)``, packs each pool of ``pool`` pairs
    into rows (``first_fit`` by length), shuffles the rows and cuts them into global batches of ``rows`` times
    ``world_size`` rows, of which process ``rank`` takes its own. It yields a batch at a time, as ``(pair, row)``
    lists for ``TaggedRows`` (the DataLoader takes ``batch_size=None``); the collator lays each row out as the
    sampler packed it. Like ``GlobalBatchSampler``, a resumed run skips the batches it trained on, and the batches
    do not depend on the number of processes beyond which process takes which rows.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        budget: int,
        rows: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        pool: int = 1024,
    ):
        self.lengths, self.budget, self.rows, self.pool = lengths, budget, rows, pool
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self._packed: tuple[int, list] | None = None  # (epoch, its batches): packing a large split takes seconds

    def _batches(self) -> list[list[tuple[int, int]]]:
        if self._packed is None or self._packed[0] != self.epoch:
            self._packed = (self.epoch, self._pack())
        return self._packed[1]

    def _pack(self) -> list[list[tuple[int, int]]]:
        generator = self._generator()
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        rows = [
            row
            for s in range(0, len(order), self.pool)
            for row in first_fit(order[s : s + self.pool], self.lengths, self.budget)
        ]
        rows = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
        step = self.rows * self.world_size
        mine = self._mine([rows[s : s + step] for s in range(0, len(rows), step)])
        return [[(i, r) for r, row in enumerate(batch) for i in row] for batch in mine]

    def __iter__(self):
        return iter(self._remaining())

    def __len__(self) -> int:
        return len(self._batches())


class TaggedRows(torch.utils.data.Dataset):
    """A split read by ``(pair, row)``: the pair's example with the row the sampler put it in."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, batch: list[tuple[int, int]]) -> list[dict]:
        return [{**self.data[i], "row": row} for i, row in batch]
