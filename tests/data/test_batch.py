import torch

from simpo_lightning.data.batch import PairBatch, Sequences, mismatched, pad_right
from simpo_lightning.scoring.logprobs import IGNORE_INDEX

X = IGNORE_INDEX


def test_pad_right_fills_after_each_row():
    assert pad_right([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert pad_right([[1]], -1, width=3).tolist() == [[1, -1, -1]]


def test_sequences_label_only_the_response_and_give_their_tokens_back():
    seqs = Sequences.from_tokens([[1, 2, 3], [4, 5]], prompt_lengths=[2, 1], pad_token_id=0)
    assert seqs.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert seqs.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert seqs.labels.tolist() == [[X, X, 3], [X, 5, X]]
    assert seqs.tokens() == [([1, 2], [3]), ([4], [5])]
    wider = Sequences.from_tokens([[6, 7, 8, 9]], [1], 0)
    both = Sequences.cat([seqs, wider], pad_token_id=0)
    assert both.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]
    assert both.labels[0].tolist() == [X, X, 3, X] and len(both) == 3


def test_mismatched_pairs_each_prompt_with_the_previous_completion():
    """Row i: prompt i + completion i - 1 (cyclic), as TRL's KTOTrainer."""
    seqs = Sequences.from_tokens([[1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12]], [2, 1, 3], pad_token_id=0)
    kl = mismatched(seqs, pad_token_id=0)
    assert kl.input_ids.tolist() == [[1, 2, 11, 12, 0, 0], [4, 3, 0, 0, 0, 0], [8, 9, 10, 5, 6, 7]]
    assert kl.labels[0].tolist() == [X, X, 11, 12, X, X]
    assert kl.attention_mask.sum(-1).tolist() == [4, 2, 6]


def test_a_pair_batch_as_completions_is_chosen_desirable_then_rejected_undesirable():
    chosen = Sequences.from_tokens([[1, 2], [3, 4]], [1, 1], 0)
    rejected = Sequences.from_tokens([[1, 5], [3, 6]], [1, 1], 0)
    unpaired = PairBatch(chosen, rejected).as_unpaired(pad_token_id=0)
    assert unpaired.paired and unpaired.desirable.tolist() == [True, True, False, False]
    assert unpaired.completions.input_ids.tolist() == [[1, 2], [3, 4], [1, 5], [3, 6]]
    assert unpaired.kl.input_ids.tolist() == [[1, 6], [3, 2], [1, 4], [3, 5]]
    assert PairBatch(chosen, rejected).tokens() == torch.tensor(8.0)
