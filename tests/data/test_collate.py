import pytest
import torch

from simpo_lightning.data import (
    GlobalBatchSampler,
    PackedSampler,
    PreferenceCollator,
    PreferenceDataModule,
    first_fit,
    pack_pairs,
)
from simpo_lightning.data.batch import PairBatch, UnpairedBatch
from simpo_lightning.errors import UserError
from simpo_lightning.scoring.logprobs import IGNORE_INDEX

X = IGNORE_INDEX


def test_collator_masks_prompt_and_padding():
    pairs = [
        {"prompt": [1, 2], "chosen": [3], "rejected": [4, 5, 6]},
        {"prompt": [7], "chosen": [8, 9], "rejected": [10]},
    ]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    assert isinstance(batch, PairBatch) and batch.packed is None and batch.ref_chosen_logps is None
    assert batch.chosen.input_ids.tolist() == [[1, 2, 3, 0, 0], [7, 8, 9, 0, 0]]
    assert batch.rejected.input_ids.tolist() == [[1, 2, 4, 5, 6], [7, 10, 0, 0, 0]]
    assert batch.chosen.labels.tolist() == [[X, X, 3, X, X], [X, 8, 9, X, X]]
    assert batch.rejected.labels.tolist() == [[X, X, 4, 5, 6], [X, 10, X, X, X]]
    assert batch.rejected.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_collator_carries_precomputed_reference_logps_in_float64():
    pairs = [{"prompt": [1], "chosen": [2], "rejected": [3], "ref_chosen_logps": -1.25, "ref_rejected_logps": -3.0}]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    assert batch.ref_chosen_logps.dtype == torch.float64 and batch.ref_rejected_logps.tolist() == [-3.0]


def test_pack_pairs_by_hand():
    """Prompt [5, 6], chosen [7, 8], rejected [9]: one row [5, 6, 7, 8, 9]; positions [0, 1, 2, 3, 2]; chosen
    tokens predicted at positions 1 and 2, the rejected token at the prompt's last position, 1."""
    packed = pack_pairs(
        [{"prompt": [5, 6], "chosen": [7, 8], "rejected": [9]}, {"prompt": [1], "chosen": [2], "rejected": [3, 4]}],
        pad_token_id=0,
    )
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 2, 0]]
    assert packed.segments.tolist() == [[0, 0, 1, 1, 2], [0, 1, 2, 2, -1]]
    assert packed.index.tolist() == [1, 2, 1, 5, 5, 7]  # row 1 starts at 5: [1|2|3 4] -> 2 at 0, 3 at 0, 4 at 2
    assert packed.targets.tolist() == [7, 8, 9, 2, 3, 4]
    assert packed.sequence.tolist() == [0, 0, 2, 1, 3, 3]


def test_pack_pairs_several_to_a_row_by_hand():
    """Pairs 0 and 2 share row 0, each with positions from 0 and its own pair tag; pair 1 has row 1 to itself.
    Row 0: [5 6 | 7 8 | 9] then [1 | 2 | 3 4]; pair 2's tokens start at 5, so its chosen token 2 is predicted at
    5 (its prompt's last position) and its rejected tokens 3, 4 at 5 and 7."""
    pairs = [
        {"prompt": [5, 6], "chosen": [7, 8], "rejected": [9]},
        {"prompt": [11], "chosen": [12], "rejected": [13]},
        {"prompt": [1], "chosen": [2], "rejected": [3, 4]},
    ]
    packed = pack_pairs(pairs, pad_token_id=0, rows=[[0, 2], [1]])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4], [11, 12, 13, 0, 0, 0, 0, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 1, 2], [0, 1, 1, 0, 0, 0, 0, 0, 0]]
    assert packed.segments.tolist() == [[0, 0, 1, 1, 2, 0, 1, 2, 2], [0, 1, 2, -1, -1, -1, -1, -1, -1]]
    assert packed.pairs.tolist() == [[0, 0, 0, 0, 0, 2, 2, 2, 2], [1, 1, 1, -1, -1, -1, -1, -1, -1]]
    assert packed.index.tolist() == [1, 2, 1, 5, 5, 7, 9, 9]
    assert packed.targets.tolist() == [7, 8, 9, 2, 3, 4, 12, 13]
    assert packed.sequence.tolist() == [0, 0, 3, 2, 5, 5, 1, 4]
    assert packed.ends.tolist() == [3, 10, 6, 4, 11, 8]  # chosen ends of pairs 0, 1, 2; then their rejected ends


def test_collator_lays_out_the_rows_the_sampler_tagged():
    pairs = [
        {"prompt": [5], "chosen": [6], "rejected": [7], "row": 1},
        {"prompt": [1], "chosen": [2], "rejected": [3], "row": 0},
        {"prompt": [8], "chosen": [9], "rejected": [10], "row": 1},
    ]
    batch = PreferenceCollator(pad_token_id=0)(pairs)  # tagged rows are packed even without shared_prompt
    assert batch.packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 10], [1, 2, 3, 0, 0, 0]]
    assert batch.chosen.input_ids.tolist() == [[5, 6], [1, 2], [8, 9]]  # the separate sequences, in pair order
    assert batch.positions() == 12


def test_first_fit_fills_rows_up_to_the_budget():
    sizes = [5, 3, 4, 2, 9, 1]
    rows = first_fit(list(range(6)), sizes, budget=8)
    assert rows == [[4], [0, 1], [2, 3, 5]]  # 9 > 8 alone; then 5+3, 4+2+1
    assert sorted(i for row in rows for i in row) == list(range(6))


@pytest.mark.parametrize("world_size", [1, 2])
def test_packed_sampler_covers_each_pair_once_in_rows_of_the_budget(world_size):
    """Every pair once an epoch, rows within the budget (a longer pair alone), at most ``rows`` rows a process,
    a seeded order, little padding, and a resumed epoch that skips the batches already trained."""
    lengths = torch.randint(10, 300, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    lengths[7] = 700  # over the budget: a row of its own

    def epoch(epoch, seed=0, rows=3):
        samplers = [PackedSampler(lengths, 512, rows, world_size, rank, seed, pool=64) for rank in range(world_size)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        return samplers, [list(s) for s in samplers]

    samplers, batches = epoch(0)
    pairs = [i for per_rank in batches for batch in per_rank for i, _ in batch]
    assert sorted(pairs) == list(range(200))
    tokens, width = 0, 0
    for per_rank in batches:
        assert len(per_rank) == len(samplers[0])
        for batch in per_rank:
            rows = {}
            for i, row in batch:
                rows.setdefault(row, []).append(i)
            assert len(rows) <= 3 and list(rows) == list(range(len(rows)))
            sizes = [sum(lengths[i] for i in row) for row in rows.values()]
            assert all(size <= 512 or len(row) == 1 for size, row in zip(sizes, rows.values()))
            tokens, width = tokens + sum(sizes), width + max(sizes) * len(sizes)
    assert 1 - tokens / width < 0.1  # padding share of the packed rows
    assert batches == epoch(0)[1] and batches != epoch(1)[1] and batches != epoch(0, seed=1)[1]
    resumed = PackedSampler(lengths, 512, 3, world_size, 0, 0, pool=64)
    resumed.skip = (0, 2)
    assert list(resumed) == batches[0][2:]


def test_datamodule_packs_training_pairs_and_refuses_packing_without_a_shared_prompt(tokenizer):
    dm = PreferenceDataModule(tokenizer=tokenizer, cache_dir=None, batch_size=2, max_tokens_per_row=400)
    dm.setup()
    lengths = dm.splits["train"]["length"]
    batches = list(dm.train_dataloader())
    assert sum(len(b) for b in batches) == len(lengths)
    assert all(b.packed.input_ids.shape[0] <= 2 for b in batches)
    assert max(len(b) for b in batches) > 2  # more pairs than rows: several a row
    padding = 1 - sum(lengths) / sum(b.positions() for b in batches)
    assert padding < 0.1, padding
    with pytest.raises(UserError, match="data.max_tokens_per_row = 400: .* needs data.shared_prompt true"):
        PreferenceDataModule(tokenizer=tokenizer, shared_prompt=False, max_tokens_per_row=400)


def test_collator_for_unpaired_rows_builds_the_kl_sequences():
    rows = [
        {"prompt": [1, 2], "completion": [3], "desirable": True},
        {"prompt": [4], "completion": [5, 6, 7], "desirable": False},
        {"prompt": [8, 9, 10], "completion": [11, 12], "desirable": True},
    ]
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert isinstance(batch, UnpairedBatch) and not batch.paired
    assert batch.desirable.tolist() == [True, False, True]
    assert batch.completions.labels[1].tolist() == [X, 5, 6, 7, X]
    assert batch.kl.input_ids.tolist() == [[1, 2, 11, 12, 0, 0], [4, 3, 0, 0, 0, 0], [8, 9, 10, 5, 6, 7]]


@pytest.mark.parametrize("world_size", [1, 2])
def test_global_batch_sampler_bucketing_is_a_seeded_partition_with_less_padding(world_size):
    lengths = torch.randint(10, 500, (300,), generator=torch.Generator().manual_seed(0)).tolist()

    def epoch(sampler_lengths, epoch, seed=0):
        samplers = [
            GlobalBatchSampler(300, 4, world_size, rank, seed, sampler_lengths, pool=8) for rank in range(world_size)
        ]
        for s in samplers:
            s.set_epoch(epoch)
        return [b for s in samplers for b in s._batches()]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches) / sum(lengths)

    bucketed = epoch(lengths, 0)
    assert sorted(i for b in bucketed for i in b) == list(range(300))  # every example once
    assert bucketed == epoch(lengths, 0) and bucketed != epoch(lengths, 1) and bucketed != epoch(lengths, 0, seed=1)
    assert padding(bucketed) < 0.25 * padding(epoch(None, 0))


def test_datamodule_group_by_length_covers_the_split_with_less_padding(tokenizer):
    widths = {}
    for grouped in (False, True):
        dm = PreferenceDataModule(tokenizer=tokenizer, cache_dir=None, batch_size=4, group_by_length=grouped)
        dm.setup()
        batches = list(dm.train_dataloader())
        assert sum(len(b) for b in batches) == len(dm.splits["train"])
        widths[grouped] = sum(b.chosen.input_ids.numel() for b in batches)
    assert widths[True] < widths[False]
