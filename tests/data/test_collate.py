import pytest
import torch

from simpo_lightning.data import GlobalBatchSampler, PreferenceCollator, PreferenceDataModule, pack_pairs
from simpo_lightning.data.batch import PairBatch, UnpairedBatch
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
