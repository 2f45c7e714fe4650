"""Preference data: reading, format handling, tokenisation, collation and the DataModule.

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

import gzip
import hashlib
import json
import logging
import warnings
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from simpo_lightning import demo
from simpo_lightning.errors import UserError
from simpo_lightning.logprobs import IGNORE_INDEX

log = logging.getLogger(__name__)
# GlobalBatchSampler makes mid-epoch resumption exact (it skips the trained batches, see
# PreferenceDataModule.train_dataloader); Lightning cannot see that and would warn otherwise.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")

Row = dict[str, Any]
Format = Literal["auto", "standard", "conversational", "hh"]
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"
FILE_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


class DataError(UserError, ValueError):
    """A row or file that cannot be used as preference data; the message names where."""


class Skip(Exception):
    """A well-formed row that is dropped and counted under ``reason``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- reading


def read_source(source: str) -> tuple[list[tuple[int, Row]], str]:
    """Read rows from ``demo[:split]``, a JSONL/JSON/Parquet file (optionally gzipped), or a
    ``datasets`` name or saved directory with an optional ``:split`` (default ``train``).

    Returns:
        ``([(row_number, row), …], identity)``; row numbers are 1-based file lines for JSONL and
        0-based indices otherwise. ``identity`` changes whenever the content may have changed.
    """
    name, _, split = source.partition(":") if not source.endswith(FILE_SUFFIXES) else (source, "", "")
    if name == "demo":
        return list(enumerate(demo.rows(split or "train"))), f"demo:{split}:{demo.VERSION}"
    path = Path(source).expanduser()
    if source.endswith(FILE_SUFFIXES):
        if not path.is_file():
            raise DataError(f"{source}: no such file")
        stat = path.stat()
        return _read_file(path), f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    if path.is_file():
        raise DataError(f"{source}: unknown file type; use .jsonl, .json or .parquet (each optionally .gz), "
                        "a datasets save_to_disk folder, or a datasets name")
    import datasets

    try:
        dataset = datasets.load_from_disk(name) if Path(name).is_dir() else datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001  (datasets raises many kinds for a name it cannot find or reach)
        raise DataError(f"{source}: not a data file, a saved dataset folder, or a datasets name that can be loaded "
                        f"here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[split or "train"]
    return list(enumerate(dataset)), f"datasets:{name}:{split}:{dataset._fingerprint}"


def _read_file(path: Path) -> list[tuple[int, Row]]:
    if path.suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet as pq

        try:
            return list(enumerate(pq.read_table(path).to_pylist()))
        except pyarrow.ArrowException as e:
            raise DataError(f"{path}: not a readable Parquet file ({e})") from e
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); is it a binary file?") from e
    except (EOFError, OSError, zlib.error) as e:  # EOFError: a truncated .gz; BadGzipFile (OSError): not gzip
        raise DataError(f"{path}: cannot read it ({type(e).__name__}: {e}); the file is truncated or corrupt: "
                        "download or write it again") from e
    if ".jsonl" in path.name:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return list(enumerate(data))


# --------------------------------------------------------------------------- encoding


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


@dataclass
class Truncation:
    """Length budget of each sequence (prompt + one response), in tokens."""

    max_length: int = 512
    max_prompt_length: int | None = 256
    """Longer prompts are cut to this; None never cuts the prompt."""
    mode: Literal["keep_end", "keep_start"] = "keep_end"
    """Which end of a long prompt to keep: the end (the latest turns, as the SimPO reference) or the start."""


def _check_messages(value: Any, what: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        raise DataError(f"{what} must be a list of {{'role': str, 'content': str}} messages")
    return value


def _split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
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
            prompt, chosen, rejected = _split_hh(chosen, rejected)
            self._check_responses(chosen, rejected)
            return self._pair(*self._encode_text(prompt, [chosen, rejected]))
        if fmt == "standard":
            if cols.prompt not in row:
                raise DataError(f"missing column {cols.prompt!r} (has {sorted(row)}); set data.columns")
            prompt = row[cols.prompt]
            for name, value in ((cols.prompt, prompt), (cols.chosen, chosen), (cols.rejected, rejected)):
                if not isinstance(value, str):
                    raise DataError(f"column {name!r} must be a string in the standard format, got {type(value).__name__}")
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
        return self._truncate(tok(prompt)["input_ids"], responses)

    def _encode_messages(self, prompt: list, responses: list[list]) -> tuple[list[int], list[list[int]]]:
        tok = self.tokenizer
        if not tok.chat_template:
            raise DataError("conversational row, but the tokenizer has no chat template; set tokenizer.chat_template")

        def ids(messages: list[dict[str, str]], **kwargs) -> list[int]:
            text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
            return tok(text, add_special_tokens=False)["input_ids"]

        prompt_ids = ids(prompt, add_generation_prompt=True)
        encoded = []
        for messages in responses:
            full = ids(prompt + messages)
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


def encode_rows(rows: list[tuple[int, Row]], encoder: PairEncoder, source: str, reference: str) -> tuple[list[dict], Counter]:
    """Encode every row; returns the pairs and the skip counts. Raises ``DataError`` naming the row.
    A source holds rows of one format (see ``row_format``)."""
    if not rows:
        raise DataError(f"{source}: no rows (the file is empty)")
    pairs, skipped, where = [], Counter(), defaultdict(list)
    first: tuple[str, int] | None = None
    for number, row in rows:
        if isinstance(row, dict):
            kind = row_format(row, encoder.columns)
            first = first or (kind, number)
            if kind != first[0]:
                raise DataError(f"{source} row {number}: a {kind} row, but row {first[1]} is {first[0]}; a source "
                                "holds rows of one format: split it into files of one format each")
        try:
            pair = encoder(row)
        except Skip as s:
            skipped[s.reason] += 1
            where[s.reason].append(number)
            continue
        except DataError as e:
            raise DataError(f"{source} row {number}: {e}") from None
        if isinstance(row.get(reference), str):
            pair["reference"] = row[reference]
        pairs.append(pair)
    for reason, count in skipped.items():
        shown = ", ".join(map(str, where[reason][:10])) + (", …" if count > 10 else "")
        log.warning("%s: skipped %d of %d rows: %s (rows %s)", source, count, len(rows), reason, shown)
    if not pairs:
        raise DataError(f"{source}: no usable preference pairs: all {len(rows)} rows were skipped ({dict(skipped)}); "
                        "see the warnings above for the rows")
    return pairs, skipped


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(tokenizer.get_vocab())).encode())
    h.update(repr((tokenizer.chat_template, tokenizer.eos_token_id, type(tokenizer).__name__)).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- collation


def pad_sequences(seqs: list[list[int]], prompt_lengths: list[int], pad_token_id: int, prefix: str) -> dict[str, Tensor]:
    """Right-pads ``prompt + response`` token lists into ``{prefix}_{input_ids,attention_mask,labels}``,
    each ``[N, T]``; labels are ``IGNORE_INDEX`` on the prompt and padding, so only responses are scored."""
    length = max(map(len, seqs))
    ids = torch.full((len(seqs), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(seqs), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, (seq, start) in enumerate(zip(seqs, prompt_lengths)):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, start : len(seq)] = ids[i, start : len(seq)]
    return {f"{prefix}_input_ids": ids, f"{prefix}_attention_mask": mask, f"{prefix}_labels": labels}


def pack_pairs(examples: list[dict], pad_token_id: int) -> dict[str, Tensor]:
    """Each pair as one right-padded sequence ``[prompt, chosen, rejected]`` (the prompt once).

    Returns ``packed_input_ids``, ``packed_position_ids`` (the rejected part continues from the end of
    the prompt, as in its own sequence) and ``packed_segments`` (0 prompt, 1 chosen, 2 rejected,
    -1 padding), each ``[B, T]``; and, per scored response token, ``packed_index`` (row * T + the
    position whose output predicts it), ``packed_targets`` (the token) and ``packed_sequence`` (i for
    pair i's chosen, B + i for its rejected), each ``[M]``. The first rejected token is predicted by
    the prompt's last position, like the first chosen token.
    """
    n, width = len(examples), max(len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) for e in examples)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    segments = torch.full((n, width), -1, dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    index, targets, sequence = [], [], []
    for i, e in enumerate(examples):
        p, c, r = len(e["prompt"]), len(e["chosen"]), len(e["rejected"])
        ids[i, : p + c + r] = torch.tensor(e["prompt"] + e["chosen"] + e["rejected"])
        segments[i, : p + c + r] = torch.tensor([0] * p + [1] * c + [2] * r)
        positions[i, : p + c + r] = torch.tensor(list(range(p + c)) + list(range(p, p + r)))
        predicted_at = [p + k - 1 for k in range(c)] + [p - 1] + [p + c + k - 1 for k in range(1, r)]
        for where, token, seq in zip(predicted_at, e["chosen"] + e["rejected"], [i] * c + [n + i] * r):
            if where >= 0:  # with an empty prompt the first token has no predictor, as in a separate sequence
                index.append(i * width + where)
                targets.append(token)
                sequence.append(seq)
    return {"packed_input_ids": ids, "packed_position_ids": positions, "packed_segments": segments,
            "packed_index": torch.tensor(index), "packed_targets": torch.tensor(targets), "packed_sequence": torch.tensor(sequence)}


class PreferenceCollator:
    """Pads a batch of examples (right padding).

    Pairs give ``{chosen,rejected}_{input_ids,attention_mask,labels}``, each ``[B, T]`` with one
    common ``T`` (with ``shared_prompt``, also the ``packed_*`` tensors of ``pack_pairs``), plus
    ``ref_chosen_logps`` / ``ref_rejected_logps`` ``[B]`` where the examples carry precomputed
    reference log-probs. Unpaired examples give ``completion_{…}`` and ``desirable`` ``[B]``.
    """

    def __init__(self, pad_token_id: int, shared_prompt: bool = False):
        self.pad_token_id, self.shared_prompt = pad_token_id, shared_prompt

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        lengths = [len(e["prompt"]) for e in examples]
        if "completion" in examples[0]:
            batch = pad_sequences([e["prompt"] + e["completion"] for e in examples], lengths, self.pad_token_id, "completion")
            batch["desirable"] = torch.tensor([e["desirable"] for e in examples])
            return batch
        seqs = [e["prompt"] + e[side] for side in ("chosen", "rejected") for e in examples]
        both = pad_sequences(seqs, lengths + lengths, self.pad_token_id, "all")
        n, batch = len(examples), {}
        for side, rows in (("chosen", slice(0, n)), ("rejected", slice(n, None))):
            batch.update({f"{side}_{k}": both[f"all_{k}"][rows] for k in ("input_ids", "attention_mask", "labels")})
        if self.shared_prompt:  # the model uses it where the method allows (not kto), else the separate sequences
            batch.update(pack_pairs(examples, self.pad_token_id))
        for side in ("chosen", "rejected"):
            if f"ref_{side}_logps" in examples[0]:
                # float64: as precomputed (in the policy's dtype, float64 included); the step casts to the policy's
                batch[f"ref_{side}_logps"] = torch.tensor([e[f"ref_{side}_logps"] for e in examples], dtype=torch.float64)
        return batch


def mismatched_batch(input_ids: Tensor, attention_mask: Tensor, labels: Tensor, pad_token_id: int) -> dict[str, Tensor]:
    """KTO's KL sequences: row i is the prompt of row i followed by the response of row i - 1
    (cyclically), the rotation TRL's KTOTrainer applies within each batch.

    Args:
        input_ids, attention_mask, labels: ``[N, T]`` right-padded, labels ``IGNORE_INDEX`` off the response.

    Returns:
        ``{input_ids, attention_mask, labels}``, each ``[N, T']``.
    """
    scored = labels != IGNORE_INDEX
    starts = scored.int().argmax(-1).tolist()
    ends = attention_mask.sum(-1).tolist()
    rows = [input_ids[i, :end].tolist() for i, end in enumerate(ends)]
    seqs = [rows[i][: starts[i]] + rows[i - 1][starts[i - 1] :] for i in range(len(rows))]
    padded = pad_sequences(seqs, starts, pad_token_id, "kl")
    return {k.removeprefix("kl_"): v for k, v in padded.items()}


# --------------------------------------------------------------------------- sampling


def example_length(example: dict) -> int:
    """Tokens of an encoded example: prompt plus its responses."""
    return sum(len(example[k]) for k in ("prompt", "chosen", "rejected", "completion") if k in example)


class GlobalBatchSampler(DistributedSampler):
    """Training order that is the same for any number of processes and can resume mid-epoch.

    Each epoch shuffles the split with a generator seeded by ``(seed, epoch)`` and cuts the order into
    global batches of ``batch_size * world_size``; process ``rank`` takes its own ``batch_size`` slice
    of each. Given ``lengths``, batches group examples of similar length (bucketing, same seeding). A 2-process run with batch size B therefore trains on the same global batches as a
    1-process run with 2B, and a resumed run can skip exactly the batches it has trained on.
    (A ``DistributedSampler`` subclass so Lightning does not replace it with its own.)
    """

    def __init__(self, size: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0,
                 lengths: list[int] | None = None, pool: int = 64):
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
            order = [i for s in range(0, self.size, span) for i in sorted(order[s : s + span], key=self.lengths.__getitem__)]
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


# --------------------------------------------------------------------------- DataModule


torch.serialization.add_safe_globals([Columns, Truncation])  # recorded in checkpoints' hyperparameters


class PreferenceDataModule(L.LightningDataModule):
    """Preference pairs for training, validation and test.

    Args:
        train_data: ``demo`` (the built-in short-answer set), a ``.jsonl``/``.json``/``.parquet`` file
            (``.gz`` allowed), or a ``datasets`` name or saved directory, optionally ``name:split``.
        val_data: same forms. None: ``demo:val`` for the demo, else ``val_fraction`` of ``train_data``.
        test_data: same forms. None: the validation set.
        format: row format, see the module docstring.
        columns: column names.
        truncation: token budget per sequence.
        val_fraction: share of the training rows held out when ``val_data`` is None.
        batch_size: preference pairs per batch (each pair is two sequences).
        num_workers: DataLoader worker processes.
        seed: seed for the validation split and the shuffling of training batches.
        shared_prompt: also encode each pair as one sequence ``[prompt, chosen, rejected]`` (see ``pack_pairs``),
            which the model computes instead of two sequences: the prompt once, half the activation memory
            on prompt-heavy data; the log-probs equal separate sequences'. kto uses the separate ones.
        group_by_length: training batches of similar-length pairs (less padding; the order is still
            random and seeded). Off: batches as drawn.
        cache_dir: where tokenised data is cached, keyed by content, settings and tokenizer; None disables it.
        tokenizer: set by the command from the model; pass one when building the DataModule by hand.
    """

    def __init__(
        self,
        train_data: str = "demo",
        val_data: str | None = None,
        test_data: str | None = None,
        format: Format = "auto",
        columns: Columns = Columns(),
        truncation: Truncation = Truncation(),
        val_fraction: float = 0.1,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        shared_prompt: bool = True,
        group_by_length: bool = False,
        cache_dir: str | None = "~/.cache/simpo-lightning",
        tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"])  # for the record: it stores dataclasses as dicts
        for name, source in (("train_data", train_data), ("val_data", val_data), ("test_data", test_data)):
            if source is not None and source.endswith(FILE_SUFFIXES) and not Path(source).expanduser().is_file():
                # said before a run starts rather than after its set-up
                raise DataError(f"data.{name}: no such file {source}; give an existing .jsonl/.json/.parquet file or 'demo'")
        self.columns, self.truncation, self.tokenizer = columns, truncation, tokenizer
        self.splits: dict[str, list[dict]] = {}
        self.skipped: Counter = Counter()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.tokenizer is None:
            raise ValueError("PreferenceDataModule needs a tokenizer (the command links it from the model)")
        hp = self.hparams
        train = self._load(hp.train_data)
        val_source = hp.val_data or ("demo:val" if hp.train_data == "demo" else None)
        if val_source is None:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(hp.seed)).tolist()
            n_val = max(1, round(hp.val_fraction * len(train)))
            if n_val >= len(train):
                raise DataError(f"{hp.train_data}: {len(train)} pairs are too few to split off a validation set")
            val, train = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
        else:
            val = self._load(val_source)
        self.splits = {"train": train, "val": val, "test": self._load(hp.test_data) if hp.test_data else val}
        log.info("preference pairs: %s", {k: len(v) for k, v in self.splits.items()})

    def _load(self, source: str) -> list[dict]:
        hp = self.hparams
        rows, identity = read_source(source)
        settings = repr((identity, hp.format, self.columns, self.truncation, tokenizer_fingerprint(self.tokenizer)))
        cache = None
        if hp.cache_dir is not None:
            cache = Path(hp.cache_dir).expanduser() / f"{hashlib.sha256(settings.encode()).hexdigest()[:24]}.pt"
            if cache.is_file():
                pairs, skipped = torch.load(cache)
                self.skipped.update(skipped)
                return pairs
        encoder = PairEncoder(self.tokenizer, self.columns, self.truncation, hp.format)
        pairs, skipped = encode_rows(rows, encoder, source, self.columns.reference)
        self.skipped.update(skipped)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((pairs, dict(skipped)), cache)
        return pairs

    def _loader(self, split: str, sampler: DistributedSampler | None = None) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id, self.hparams.shared_prompt),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # Data-parallel replicas (with tensor parallelism, fewer than the processes).
        replicas = getattr(trainer.strategy, "distributed_sampler_kwargs", None) if trainer is not None else None
        world_size, rank = (replicas["num_replicas"], replicas["rank"]) if replicas else (1, 0)
        lengths = [example_length(e) for e in self.splits["train"]] if self.hparams.group_by_length else None
        sampler = GlobalBatchSampler(len(self.splits["train"]), self.hparams.batch_size, world_size, rank, self.hparams.seed, lengths)
        if trainer is not None and trainer.fit_loop.restarting:
            # Resuming: the restored loop state says how many batches of this epoch were trained on
            # ("processed": checkpoints are written in on_train_batch_end, before "completed" counts the batch).
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            sampler.skip = (trainer.current_epoch, done)
            log.info("resuming epoch %d after %d batches", trainer.current_epoch, done)
        return self._loader("train", sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def generation_examples(self, split: str = "val") -> list[tuple[list[int], str]]:
        """Distinct ``(prompt_ids, reference)`` of a split, for rows that carry a reference answer."""
        seen = {}
        for pair in self.splits[split]:
            if "reference" in pair:
                seen.setdefault(tuple(pair["prompt"]), pair["reference"])
        return [(list(p), r) for p, r in seen.items()]
