"""Judges: the rule of the demo, a reward model against a plain forward, functions by import path, and
the checks every judge's scores go through."""

import math

import pytest
import torch

from simpo_lightning.data.sources import Source
from simpo_lightning.errors import UserError
from simpo_lightning.generation.judges import CallableJudge, NumberJudge, RewardModelJudge, RuleJudge

from helpers import assert_rounding_close


def test_the_rule_judge_grades_correctness_then_length():
    scores = RuleJudge()(["q"] * 4, ["Nairobi", "The capital of Kenya is Nairobi.", "Kampala", ""], ["Nairobi"] * 4)
    assert scores == [1.0, 0.5, 0.0, 0.0]
    with pytest.raises(UserError, match="needs a reference"):
        RuleJudge()(["q"], ["Nairobi"], [None])
    # length_penalty 0.2: a correct answer of w words scores 0.5 / (1 + 0.2 (w - 1)); 6 words: 0.25, 2: 0.5/1.2
    shaped = RuleJudge(length_penalty=0.2)(
        ["q"] * 3, ["The capital of Kenya is Nairobi.", "Nairobi, Kenya", "Nairobi"], ["Nairobi"] * 3
    )
    assert shaped == [pytest.approx(0.25), pytest.approx(0.5 / 1.2), 1.0]


def wrong_count(prompts, responses, references):
    return [1.0]


def not_a_number(prompts, responses, references):
    return [math.nan] * len(responses)


def test_a_judge_returning_nan_or_the_wrong_count_is_named():
    assert CallableJudge("helpers.shortest_wins")(["q", "q"], ["a", "abc"]) == [-1.0, -3.0]
    with pytest.raises(UserError, match="judge CallableJudge returned 1 scores for 2 responses"):
        CallableJudge("test_judges.wrong_count")(["q", "q"], ["a", "b"])
    with pytest.raises(UserError, match="judge CallableJudge returned a non-finite score"):
        CallableJudge("test_judges.not_a_number")(["q"], ["a"])
    with pytest.raises(UserError, match="cannot import"):
        CallableJudge("nowhere.function")


@pytest.fixture(scope="module")
def reward_dir(tiny_dir, tmp_path_factory) -> str:
    """A tiny random reward model with three outputs, saved with the SmolLM2 tokenizer (it has a chat template)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    folder = tmp_path_factory.mktemp("reward")
    config = AutoConfig.from_pretrained(tiny_dir, num_labels=3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_the_reward_model_judge_equals_a_plain_forward_of_each_conversation(reward_dir):
    """Batched with padding and a chosen output, against the model on each unpadded conversation in float64."""
    from transformers import AutoModelForSequenceClassification

    judge = RewardModelJudge(reward_dir, output=2, batch_size=2)
    prompts = [
        "Capital of France?",
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Say a long sentence, please."},
        ],
        "2 + 2 =",
    ]
    responses = ["Paris", "This is a much longer sentence than the other responses are.", "4"]
    scores = judge(prompts, responses)
    plain = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        expected = [
            plain(input_ids=torch.tensor([judge.conversation(p, r)])).logits[0, 2].item()
            for p, r in zip(prompts, responses)
        ]
    assert_rounding_close(scores, expected, reduction=128)
    assert len(set(scores)) == 3
    with pytest.raises(UserError, match="has 3 outputs"):
        RewardModelJudge(reward_dir, output=3)(prompts[:1], responses[:1])


def test_long_conversations_keep_their_end_and_are_counted(reward_dir):
    judge = RewardModelJudge(reward_dir)
    short = len(judge.conversation("short", "b"))
    judge.max_length = short + 5
    long = judge.conversation("word " * 40, "a")
    assert len(long) == short + 5 and long[-3:] == judge.conversation("short", "a")[-3:]
    judge(["word " * 40, "short"], ["a", "b"])
    assert judge.truncated == 2


def test_a_reward_model_without_chat_template_is_refused(reward_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    AutoModelForSequenceClassification.from_pretrained(reward_dir).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="no chat template"):
        RewardModelJudge(str(tmp_path))


def test_text_format_encodes_as_the_training_data_of_text_rows(reward_dir):
    """format: text gives the ids PairEncoder gives a string row's prompt and response (with eos)."""
    from simpo_lightning.data.encoding import Columns, PairEncoder, Truncation

    judge = RewardModelJudge(reward_dir, format="text")
    row = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello there", "rejected": " no"}
    encoded = PairEncoder(judge.tokenizer, Columns(), Truncation(), "auto")(row)
    assert judge.conversation(row["prompt"], row["chosen"]) == encoded["prompt"] + encoded["chosen"]
    chat = RewardModelJudge(reward_dir).conversation(row["prompt"], row["chosen"])
    assert chat != encoded["prompt"] + encoded["chosen"]


def test_the_number_judge_reads_the_answers_number_and_scores_its_format():
    answers = [
        "12",
        "7 + 5 = 12",
        "7 + 5 = 12\n\nIn this example 5 and 7 make 13",
        "The answer is 13.",
        "twelve",
        "12.",
    ]
    assert NumberJudge()(["q"] * 6, answers, ["12"] * 6) == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    assert NumberJudge(format_weight=0.5)(["q"] * 6, answers, ["12"] * 6) == [1.0, 0.5, 0.5, 0.0, 0.0, 1.0]
    assert NumberJudge()(["q"], ["23 - 4 = -19"], ["-19"]) == [1.0]  # negative numbers
    with pytest.raises(UserError, match="NumberJudge needs a number"):
        NumberJudge()(["q"], ["12"], ["Nairobi"])


def test_the_arithmetic_task_holds_out_every_fifth_problem_with_a_checkable_pair():
    train, val = Source("arithmetic:train"), Source("arithmetic:val")
    train_rows, val_rows = [row for _, row in train.rows()], [row for _, row in val.rows()]
    assert (len(train_rows), len(val_rows)) == (216, 54)  # 81 sums and 189 differences
    questions = {row["prompt"][0]["content"] for row in train_rows}
    assert not questions & {row["prompt"][0]["content"] for row in val_rows}
    for row in train_rows + val_rows:
        a, op, b = row["prompt"][0]["content"].removeprefix("What is ").split("?")[0].split()
        assert int(row["reference"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert NumberJudge()(
            ["q", "q"], [row["chosen"][0]["content"], row["rejected"][0]["content"]], [row["reference"]] * 2
        ) == [1.0, 0.0]
