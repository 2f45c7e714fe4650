"""Encoding rows into token ids.

Three row formats are accepted (``format="auto"`` picks per row):

- standard: ``prompt``, ``chosen``, ``rejected`` are strings. Prompt and response are tokenised
  separately and concatenated, so the boundary is exact by construction; eos ends each response.
- conversational: ``prompt`` is a list of ``{"role", "content"}`` messages and ``chosen`` /
  ``rejected`` are lists of (assistant) messages; without a prompt column the shared leading
  messages are the prompt. Rendered with the tokenizer's chat template; the rendered prompt's
  tokens must be a prefix of the rendered conversation's tokens, or the row is an error.
- hh: no prompt column, ``chosen`` / ``rejected`` are whole ``\\n\\nHuman: … \\n\\nAssistant: …``
  dialogues (Anthropic HH-RLHF). The prompt is the shared prefix up to the last
  ``\\n\\nAssistant:``; rows that do not split that way are skipped and reported.

Unpaired rows (for KTO) have ``prompt``, ``completion`` and a boolean ``label`` (desirable or
not) instead of ``chosen`` / ``rejected``, as text or as messages. A source is either all pairs
or all unpaired rows; KTO also trains on pairs, each giving one desirable and one undesirable
completion.

Structural problems (bad JSON, missing columns, wrong types, a template that breaks the prefix
property) raise ``DataError`` naming the source and row. Pairs that are well formed but unusable
(empty or identical responses, no room for the response) are skipped, counted and logged once.
"""

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

from simpo_lightning.data.sources import DataError, Row, Skip
from simpo_lightning.errors import require

log = logging.getLogger(__name__)

Format = Literal["auto", "standard", "conversational", "hh"]
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


@dataclass
class Columns:
    """Names of the columns to read."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    """Unpaired rows (KTO): the completion, with ``label``."""
    label: str = "label"
    """Unpaired rows: true for a desirable completion, false for an undesirable one."""
    reference: str = "reference"
    """Optional gold answer, used by the held-out generation metric."""
    margin: str = "margin"
    """Optional number per pair: how far chosen should score above rejected (reward-model training)."""


@dataclass
class Truncation:
    """Length budget of each sequence (prompt + one response), in tokens."""

    max_length: int = 512
    max_prompt_length: int | None = 256
    """Longer prompts are cut to this; None never cuts the prompt."""
    mode: Literal["keep_end", "keep_start"] = "keep_end"
    """Which end of a long prompt to keep: the end (the latest turns, as the SimPO reference) or the start."""

    def __post_init__(self) -> None:
        require(
            self.max_length >= 2,
            f"data.truncation.max_length = {self.max_length}: must be ≥ 2 (a prompt and a response)",
        )
        require(
            self.max_prompt_length is None or self.max_prompt_length >= 1,
            f"data.truncation.max_prompt_length = {self.max_prompt_length}: must be ≥ 1, or null",
        )


def _check_messages(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise DataError(f"{what} must be a list of {{'role': str, 'content': str}} messages")
    return value


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two HH-RLHF dialogues into (prompt, chosen response, rejected response)."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    end = chosen.rfind(HH_ASSISTANT, 0, common + 1)
    if end < 0 and chosen == rejected:
        raise Skip("identical responses")
    if end < 0:
        raise Skip("hh: no shared prompt ending in '\\n\\nAssistant:'")
    end += len(HH_ASSISTANT)
    prompt, c, r = chosen[:end], chosen[end:], rejected[end:]
    if HH_HUMAN in c or HH_HUMAN in r:
        raise Skip("hh: dialogues differ before the last assistant turn")
    return prompt, c, r


def row_format(row: Row, columns: "Columns") -> str:
    """The format ``auto`` reads a row as: ``unpaired``, ``conversational``, ``standard`` or ``hh``."""
    if columns.completion in row and columns.chosen not in row:
        return "unpaired"
    if isinstance(row.get(columns.chosen), list):
        return "conversational"
    return "standard" if columns.prompt in row else "hh"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]]) -> list[int]:
    """The token ids a prompt is given as to the model: a string as the tokenizer makes it (with its special
    tokens), messages rendered by the chat template up to the assistant's turn."""
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return render_messages(tokenizer, prompt, add_generation_prompt=True)


def render_messages(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], **kwargs) -> list[int]:
    """Chat messages as token ids, rendered by the tokenizer's chat template."""
    if not tokenizer.chat_template:
        raise DataError("conversational row, but the tokenizer has no chat template; set tokenizer.chat_template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PairEncoder:
    """Turns one row into token ids ``{"prompt": […], "chosen": […], "rejected": […]}``, or for an
    unpaired row ``{"prompt": […], "completion": […], "desirable": bool}``."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, columns: Columns, truncation: Truncation, format: Format):
        self.tokenizer, self.columns, self.truncation, self.format = tokenizer, columns, truncation, format

    def __call__(self, row: Row) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise DataError(f"expected an object with columns, got {type(row).__name__}")
        cols = self.columns
        detected = row_format(row, cols)
        if detected == "unpaired":
            return self._encode_unpaired(row)
        for name in (cols.chosen, cols.rejected):
            if name not in row:
                raise DataError(f"missing column {name!r} (has {sorted(row)}); set data.columns")
        chosen, rejected = row[cols.chosen], row[cols.rejected]
        fmt = detected if self.format == "auto" else self.format
        if fmt == "hh":
            if not isinstance(chosen, str) or not isinstance(rejected, str):
                raise DataError("hh format needs string 'chosen' and 'rejected' dialogues")
            prompt, chosen, rejected = split_hh(chosen, rejected)
            self._check_responses(chosen, rejected)
            return self._pair(*self._encode_text(prompt, [chosen, rejected]))
        if fmt == "standard":
            if cols.prompt not in row:
                raise DataError(f"missing column {cols.prompt!r} (has {sorted(row)}); set data.columns")
            prompt = row[cols.prompt]
            for name, value in ((cols.prompt, prompt), (cols.chosen, chosen), (cols.rejected, rejected)):
                if not isinstance(value, str):
                    raise DataError(
                        f"column {name!r} must be a string in the standard format, got {type(value).__name__}"
                    )
            self._check_responses(chosen, rejected)
            return self._pair(*self._encode_text(prompt, [chosen, rejected]))
        chosen = _check_messages(chosen, f"column {self.columns.chosen!r}")
        rejected = _check_messages(rejected, f"column {self.columns.rejected!r}")
        prompt = row.get(cols.prompt)
        if prompt is None:  # implicit prompt: the messages both conversations share
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        prompt = _check_messages(prompt, f"column {self.columns.prompt!r}")
        self._check_responses(" ".join(m["content"] for m in chosen), " ".join(m["content"] for m in rejected))
        return self._pair(*self._encode_messages(prompt, [chosen, rejected]))

    def _encode_unpaired(self, row: Row) -> dict[str, Any]:
        cols = self.columns
        for name in (cols.prompt, cols.label):
            if name not in row:
                raise DataError(f"unpaired row without column {name!r} (has {sorted(row)}); set data.columns")
        prompt, completion, label = row[cols.prompt], row[cols.completion], row[cols.label]
        if not isinstance(label, bool):
            raise DataError(f"column {cols.label!r} must be true or false, got {label!r}")
        if isinstance(completion, str) and isinstance(prompt, str):
            if not completion.strip():
                raise Skip("empty response")
            prompt_ids, (ids,) = self._encode_text(prompt, [completion])
        else:
            messages = _check_messages(completion, f"column {cols.completion!r}")
            if not " ".join(m["content"] for m in messages).strip():
                raise Skip("empty response")
            prompt_ids, (ids,) = self._encode_messages(_check_messages(prompt, f"column {cols.prompt!r}"), [messages])
        return {"prompt": prompt_ids, "completion": ids, "desirable": label}

    def _encode_text(self, prompt: str, responses: list[str]) -> tuple[list[int], list[list[int]]]:
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        responses = [tok(r, add_special_tokens=False)["input_ids"] + eos for r in responses]
        return self._truncate(encode_prompt(tok, prompt), responses)

    def _encode_messages(self, prompt: list, responses: list[list]) -> tuple[list[int], list[list[int]]]:
        tok = self.tokenizer
        prompt_ids = encode_prompt(tok, prompt)
        encoded = []
        for messages in responses:
            full = render_messages(tok, prompt + messages)
            if full[: len(prompt_ids)] != prompt_ids:
                raise DataError(
                    "the chat template's rendering of the prompt is not a token prefix of the rendered "
                    "conversation, so the response boundary is ambiguous"
                )
            encoded.append(full[len(prompt_ids) :])
        return self._truncate(prompt_ids, encoded)

    @staticmethod
    def _check_responses(chosen: str, rejected: str) -> None:
        if not chosen.strip() or not rejected.strip():
            raise Skip("empty response")
        if chosen == rejected:
            raise Skip("identical responses")

    def _truncate(self, prompt: list[int], responses: list[list[int]]) -> tuple[list[int], list[list[int]]]:
        t = self.truncation
        if t.max_prompt_length is not None and len(prompt) > t.max_prompt_length:
            prompt = prompt[-t.max_prompt_length :] if t.mode == "keep_end" else prompt[: t.max_prompt_length]
        room = t.max_length - len(prompt)
        if room <= 0:
            raise Skip("prompt leaves no room for the response")
        if not all(responses):
            raise Skip("empty response")
        return prompt, [r[:room] for r in responses]

    @staticmethod
    def _pair(prompt: list[int], responses: list[list[int]]) -> dict[str, list[int]]:
        return {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}


@dataclass
class EncodeReport:
    """What encoding a source (or a part of it) found: rows seen and kept, the skips by reason with their
    first row numbers, and the format and number of its first row."""

    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    where: dict[str, list[int]] = field(default_factory=dict)
    first: tuple[str, int] | None = None

    def merge(self, later: "EncodeReport", source: str) -> "EncodeReport":
        """This report followed by ``later``'s (the next part of the same source)."""
        if self.first and later.first and later.first[0] != self.first[0]:
            raise _mixed(source, later.first, self.first)
        where = {r: (self.where.get(r, []) + later.where.get(r, []))[:SHOWN] for r in {*self.where, *later.where}}
        return EncodeReport(
            self.rows + later.rows,
            self.kept + later.kept,
            self.skipped + later.skipped,
            where,
            self.first or later.first,
        )

    def check(self, source: str) -> None:
        """Logs the skips once, and raises when nothing is left."""
        for reason, count in self.skipped.items():
            shown = ", ".join(map(str, self.where[reason])) + (", …" if count > SHOWN else "")
            log.warning("%s: skipped %d of %d rows: %s (rows %s)", source, count, self.rows, reason, shown)
        if not self.rows:
            raise DataError(f"{source}: no rows (the file is empty)")
        if not self.kept:
            raise DataError(
                f"{source}: no usable preference pairs: all {self.rows} rows were skipped ({dict(self.skipped)}); "
                "see the warnings above for the rows"
            )


SHOWN = 10  # row numbers kept per skip reason


def encode(
    rows: Iterable[tuple[int, Row]], encoder: PairEncoder, source: str, reference: str, report: EncodeReport
) -> Iterator[dict]:
    """Each usable row encoded, with ``row`` (its number) and ``reference`` (the gold answer or None);
    ``report`` counts as it goes. Raises ``DataError`` naming the row. A source holds rows of one format
    (see ``row_format``)."""
    for number, row in rows:
        report.rows += 1
        if isinstance(row, dict):
            kind = row_format(row, encoder.columns)
            report.first = report.first or (kind, number)
            if kind != report.first[0]:
                raise _mixed(source, (kind, number), report.first)
        try:
            pair = encoder(row)
        except Skip as s:
            report.skipped[s.reason] += 1
            report.where.setdefault(s.reason, [])
            if len(report.where[s.reason]) < SHOWN:
                report.where[s.reason].append(number)
            continue
        except DataError as e:
            raise DataError(f"{source} row {number}: {e}") from None
        report.kept += 1
        margin = row.get(encoder.columns.margin)
        if margin is not None and not isinstance(margin, (int, float)):
            raise DataError(
                f"{source} row {number}: column {encoder.columns.margin!r} must be a number, got {margin!r}"
            )
        gold = row[reference] if isinstance(row.get(reference), str) else None
        yield {"row": number, **pair, "reference": gold, "margin": None if margin is None else float(margin)}


def encode_rows(
    rows: list[tuple[int, Row]], encoder: PairEncoder, source: str, reference: str
) -> tuple[list[dict], Counter]:
    """Every row encoded in memory (small sources, tests): the pairs and the skip counts."""
    report = EncodeReport()
    pairs = list(encode(rows, encoder, source, reference, report))
    report.check(source)
    return pairs, report.skipped


def _mixed(source: str, row: tuple[str, int], first: tuple[str, int]) -> DataError:
    return DataError(
        f"{source} row {row[1]}: a {row[0]} row, but row {first[1]} is {first[0]}; a source "
        "holds rows of one format: split it into files of one format each"
    )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(repr((tokenizer.chat_template, tokenizer.eos_token_id, type(tokenizer).__name__)).encode())
    return h.hexdigest()
