"""Judges: score responses to prompts. One small interface, ``score(prompts, responses, references)``,
chosen in YAML by ``class_path``:

- ``RewardModelJudge``: a sequence-classification reward model (one output, or one picked from several)
  with its own tokenizer and chat template, in batches;
- ``RuleJudge``: the built-in demo's rule, which also grades length (a correct bare answer beats a
  correct answer in a sentence, which beats a wrong one), so the loop runs on a CPU with no download;
- ``CallableJudge``: any Python function by import path (verifiable rewards);
- ``PairwiseJudge``: shown two responses, the probability that the first is better (``evaluate`` asks in
  both orders); ``CallablePairwiseJudge`` takes a function by import path.

A prompt is a string or a list of chat messages; the policy and the judge never share token ids, the
judge tokenises the text. Every judge's scores are checked: one finite number per response, or an
error that names the judge.
"""

import importlib
import logging
import math
from typing import Any, Literal

import torch

from simpo_lightning.data import arithmetic, demo
from simpo_lightning.data.encoding import render_messages
from simpo_lightning.errors import UserError

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, str]]


class Judge:
    """Scores responses: higher is better."""

    verifier: bool = False
    """Whether a score above 0 means a right answer (a verifier's ``held_out`` reports the share as accuracy)."""

    def score(self, prompts: list[Prompt], responses: list[str], references: list[str | None]) -> list[float]:
        raise NotImplementedError

    def __call__(
        self,
        prompts: list[Prompt],
        responses: list[str],
        references: list[str | None] | None = None,
        finite: bool = True,
    ) -> list[float]:
        """``score``, checked: as many numbers as responses, all finite (``finite`` false: non-finite ones are
        returned for the caller to handle, as online training skips such a step)."""
        references = references if references is not None else [None] * len(responses)
        scores = [float(s) for s in self.score(prompts, responses, references)]
        name = type(self).__name__
        if len(scores) != len(responses):
            raise UserError(f"judge {name} returned {len(scores)} scores for {len(responses)} responses")
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad and finite:
            raise UserError(
                f"judge {name} returned a non-finite score ({scores[bad[0]]}) for response {bad[0]} "
                f"and {len(bad) - 1} more; a reward model in float16 can overflow: load it in float32"
            )
        return scores

    def held_out(self, prompts: list[Prompt], responses: list[str], references: list[str | None]) -> dict[str, float]:
        """Held-out metrics of responses: the mean score (``reward``) and, for a verifier, the share it finds
        right (``accuracy``)."""
        scores = self(prompts, responses, references)
        metrics = {"reward": sum(scores) / len(scores)}
        if self.verifier:
            metrics["accuracy"] = sum(s > 0 for s in scores) / len(scores)
        return metrics


class RuleJudge(Judge):
    """The demo's rule, against each prompt's reference answer: 1 for exactly the answer, 0.5 for a response
    that contains it among other words (correct but verbose), 0 otherwise.

    Args:
        length_penalty: divide the verbose score by 1 + length_penalty · (words - 1), so that among correct
            answers a shorter one scores higher (0: every verbose answer 0.5). Online methods learn from the
            differences within a group; a policy that only ever answers in sentences gets none from the plain
            rule, and this shaping gives it a path towards the one-word answer.
    """

    def __init__(self, length_penalty: float = 0.0):
        self.length_penalty = length_penalty

    def score(self, prompts: list[Prompt], responses: list[str], references: list[str | None]) -> list[float]:
        if any(r is None for r in references):
            raise UserError("RuleJudge needs a reference answer for every prompt (the data's reference column)")
        return [
            1.0
            if demo.exact_match(text, ref)
            else 0.5 / (1 + self.length_penalty * (len(text.split()) - 1))
            if _contains(text, ref)
            else 0.0
            for text, ref in zip(responses, references)
        ]


def _contains(text: str, reference: str) -> bool:
    words = [demo.normalize(w) for w in text.split()]
    return demo.normalize(reference) in words


class NumberJudge(Judge):
    """The verifier of the arithmetic task (``data.arithmetic``), or of any task whose reference is one integer:
    1 when the answer's number (``arithmetic.answer``: the last on its first line) equals the reference, 0
    otherwise; with ``format_weight`` w (< 1) a right number among other words scores 1 - w (a bare one 1).
    """

    verifier = True

    def __init__(self, format_weight: float = 0.0):
        if not 0 <= format_weight < 1:
            raise UserError(
                f"NumberJudge format_weight = {format_weight}: must be in [0, 1) (a right number scores > 0)"
            )
        self.format_weight = format_weight

    def score(self, prompts: list[Prompt], responses: list[str], references: list[str | None]) -> list[float]:
        if any(r is None or arithmetic.answer(r) is None for r in references):
            raise UserError("NumberJudge needs a number as every prompt's reference (the data's reference column)")
        scores = []
        for text, reference in zip(responses, references):
            right = arithmetic.answer(text) == arithmetic.answer(reference)
            scores.append(float(right) * (1.0 if arithmetic.bare(text) else 1.0 - self.format_weight))
        return scores


class CallableJudge(Judge):
    """A function ``f(prompts, responses, references) -> scores`` named by import path (``package.module.name``)."""

    def __init__(self, function: str):
        module, _, name = function.rpartition(".")
        try:
            self.function = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError, ValueError) as error:
            raise UserError(f"CallableJudge function {function!r}: cannot import it ({error})") from error
        self.name = function

    def score(self, prompts: list[Prompt], responses: list[str], references: list[str | None]) -> list[float]:
        return list(self.function(prompts, responses, references))


class RewardModelJudge(Judge):
    """A reward model: ``AutoModelForSequenceClassification`` with its own tokenizer and chat template.

    Each (prompt, response) is rendered as a conversation (the prompt's messages, or a user message for a
    string prompt, then the response as the assistant's) with the judge's chat template, and scored by the
    model's head at the last token that is not padding. A reward model trained by this package on text rows
    (such as HH-RLHF's dialogues) reads ``format: text``: a string prompt followed by the response and
    end-of-sequence, as the training data were encoded. A conversation longer than ``max_length`` keeps
    its end (counted in ``truncated``).

    Args:
        name_or_path: hub id or folder of the reward model (e.g. Skywork-Reward, or one exported by this package).
        output: which of the head's outputs is the reward (multi-output heads such as ArmoRM's).
        batch_size: conversations per forward pass.
        max_length: tokens per conversation at most.
        dtype: the model's dtype.
        format: ``chat`` (the chat template) or ``text`` (string prompts as plain text, as in training).
    """

    def __init__(
        self,
        name_or_path: str,
        output: int = 0,
        batch_size: int = 8,
        max_length: int = 2048,
        dtype: str = "float32",
        format: Literal["chat", "text"] = "chat",
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from simpo_lightning.models.loading import from_pretrained

        option = "judge (RewardModelJudge) name_or_path"
        self.tokenizer = from_pretrained(AutoTokenizer, name_or_path, "tokenizer", option)
        if format == "chat" and not self.tokenizer.chat_template:
            raise UserError(
                f"reward model {name_or_path}: its tokenizer has no chat template, so conversations "
                "cannot be rendered the way it was trained; set one in its tokenizer_config.json"
            )
        self.model = from_pretrained(
            AutoModelForSequenceClassification, name_or_path, "reward model", option, dtype=getattr(torch, dtype)
        ).eval()
        # Pad with the id the model's head skips: its config's (how it was trained), else the tokenizer's.
        pad = self.model.config.pad_token_id
        if pad is None:
            pad = (
                self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
            )
        self.pad_token_id = self.model.config.pad_token_id = pad
        self.output, self.batch_size, self.max_length, self.format = output, batch_size, max_length, format
        self.truncated = 0

    def conversation(self, prompt: Prompt, response: str) -> list[int]:
        """The token ids the model scores for one (prompt, response)."""
        if self.format == "text" and isinstance(prompt, str):
            tok = self.tokenizer
            ids = tok(prompt)["input_ids"] + tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids = render_messages(self.tokenizer, [*messages, {"role": "assistant", "content": response}])
        if len(ids) > self.max_length:
            self.truncated += 1
            ids = ids[-self.max_length :]
        return ids

    @torch.no_grad()
    def score(self, prompts: list[Prompt], responses: list[str], references: list[Any]) -> list[float]:
        already = self.truncated
        conversations = [self.conversation(p, r) for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(conversations), self.batch_size):
            batch = conversations[start : start + self.batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, c in enumerate(batch):  # right padding: the head reads the last token that is not padding
                ids[i, : len(c)], mask[i, : len(c)] = torch.tensor(c), 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            if self.output >= logits.shape[-1]:
                raise UserError(f"RewardModelJudge output {self.output}: the model has {logits.shape[-1]} outputs")
            scores += logits[:, self.output].float().tolist()
        if self.truncated > already:
            log.warning(
                "reward model: %d of %d conversations longer than %d tokens kept their end (%d so far)",
                self.truncated - already,
                len(conversations),
                self.max_length,
                self.truncated,
            )
        return scores


class PairwiseJudge:
    """Compares two responses to a prompt: ``compare(prompts, first, second)`` gives, per prompt, the
    probability (in [0, 1]) that the first is better. ``evaluate`` shows each pair in both orders and averages,
    so a judge's preference for a position cancels."""

    def compare(self, prompts: list[Prompt], first: list[str], second: list[str]) -> list[float]:
        raise NotImplementedError

    def __call__(self, prompts: list[Prompt], first: list[str], second: list[str]) -> list[float]:
        """``compare``, checked: one probability per prompt."""
        values = [float(v) for v in self.compare(prompts, first, second)]
        name = type(self).__name__
        if len(values) != len(prompts):
            raise UserError(f"pairwise judge {name} returned {len(values)} values for {len(prompts)} pairs")
        bad = [v for v in values if not 0.0 <= v <= 1.0]  # also catches NaN
        if bad:
            raise UserError(f"pairwise judge {name} returned {bad[0]}, not a probability in [0, 1]")
        return values


class CallablePairwiseJudge(PairwiseJudge):
    """A function ``f(prompts, first, second) -> probabilities that first is better``, by import path."""

    def __init__(self, function: str):
        self.function = CallableJudge(function).function

    def compare(self, prompts: list[Prompt], first: list[str], second: list[str]) -> list[float]:
        return list(self.function(prompts, first, second))
