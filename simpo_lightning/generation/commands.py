"""On-policy preference pairs, the SimPO paper's own recipe: sample several responses per prompt from the
policy being trained, score them with a judge, keep the best as chosen and the worst as rejected, train,
and repeat in rounds. Three commands:

    simpo-lightning generate --prompts demo --output generations.jsonl --sampling.n 4
    simpo-lightning pairs --generations generations.jsonl --output pairs.jsonl --judge RuleJudge
    simpo-lightning rounds --config configs/onpolicy-demo.yaml

Files are JSONL, one prompt a line, and every step resumes: ``generate`` skips the prompts its output
already holds (a truncated last line is dropped and redone), ``rounds`` skips every finished stage.
"""

import json
import logging
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from simpo_lightning.data.encoding import Columns
from simpo_lightning.data.prompts import read_prompts
from simpo_lightning.data.sources import DataError
from simpo_lightning.errors import UserError
from simpo_lightning.generation.judges import Judge
from simpo_lightning.generation.sampling import SamplingConfig, sample_responses

log = logging.getLogger(__name__)


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSONL file that may have been cut off mid-line; an incomplete last line is
    dropped (and removed from the file, so that appending goes on from a whole line)."""
    if not path.is_file():
        return []
    lines = path.read_text().splitlines(keepends=True)
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise DataError(f"{path}:{i + 1}: not valid JSON in the middle of the file") from None
            path.write_text("".join(lines[:i]))
            log.warning("%s: dropped an incomplete last line (an interrupted run); it is done again", path)
    return rows


def generate(
    prompts: str,
    output: str,
    model: str | None = None,
    gguf_file: str | None = None,
    sampling: SamplingConfig = SamplingConfig(),
    columns: Columns = Columns(),
    max_prompt_length: int = 1024,
    max_prompts: int | None = None,
    devices: int = 1,
    accelerator: str = "auto",
    progress: bool = True,
) -> Path:
    """Sample responses from a policy, several per prompt, into a JSONL file.

    Args:
        prompts: where the prompts are: ``demo``, or a JSONL/JSON/Parquet file or ``datasets`` name with a
            ``prompt`` column (text, or chat messages rendered with the policy's chat template) and an optional
            ``reference`` column, as the training data.
        output: the JSONL file to write, one prompt a line (prompt, reference, responses, finish reasons,
            response tokens, settings). Prompts it already holds are not sampled again.
        model: the policy: a ``fit`` checkpoint (``.ckpt``, with or without LoRA), a model or exported folder,
            a hub id; None: the built-in SmolLM2.
        gguf_file: a GGUF file inside ``model``'s folder.
        sampling: samples per prompt, temperature, top-p, lengths, seed, batch size.
        columns: column names of ``prompts``.
        max_prompt_length: longer prompts are skipped (counted).
        max_prompts: the first this many usable prompts only; None: all.
        devices: processes that split the prompts (each writes its part, the first merges them).
        accelerator: ``cpu``, ``gpu`` or ``auto``.
        progress: show a progress bar with samples/s and tokens/s.
    """
    from lightning.fabric import Fabric

    from simpo_lightning.models.checkpoints import inference_policy
    from simpo_lightning.models.loading import check_model_source

    check_model_source(model, "--model")
    fabric = Fabric(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto")
    fabric.launch()
    policy, tokenizer = inference_policy(model, gguf_file)
    policy.to(fabric.device)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f"{out.name}.part{fabric.global_rank}")
    done = {r["key"] for path in [out, *out.parent.glob(f"{out.name}.part*")] for r in read_jsonl(path)}
    wanted = read_prompts(prompts, tokenizer, columns, max_prompt_length)[:max_prompts]
    # split before dropping the done ones: another process may already be writing its part
    mine = [p for p in wanted[fabric.global_rank :: fabric.world_size] if p.key not in done]
    mine.sort(key=lambda p: -len(p.tokens))
    settings = {**asdict(sampling), "model": model}
    chunk = max(1, sampling.batch_size // sampling.n) * 8  # prompts per write
    for start in range(0, len(mine), chunk):
        batch = mine[start : start + chunk]
        samples = sample_responses(
            policy, tokenizer, [p.tokens for p in batch], sampling, progress and fabric.is_global_zero
        )
        with part.open("a") as f:
            for p, responses in zip(batch, samples):
                f.write(
                    json.dumps(
                        {
                            "key": p.key,
                            "row": p.row,
                            "prompt": p.prompt,
                            "reference": p.reference,
                            "responses": [tokenizer.decode(s.tokens, skip_special_tokens=True) for s in responses],
                            "finish_reasons": [s.finish_reason for s in responses],
                            "response_tokens": [len(s.tokens) for s in responses],
                            "settings": settings,
                        }
                    )
                    + "\n"
                )
    fabric.barrier()
    if fabric.is_global_zero and list(out.parent.glob(f"{out.name}.part*")):
        _merge(out)
    fabric.barrier()
    return out


def _merge(out: Path) -> None:
    """The output and every process's part as one file ordered by source row, parts removed."""
    rows = {r["key"]: r for path in [out, *sorted(out.parent.glob(f"{out.name}.part*"))] for r in read_jsonl(path)}
    ordered = sorted(rows.values(), key=lambda r: r["row"])
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text("".join(json.dumps(r) + "\n" for r in ordered))
    temporary.replace(out)
    for path in out.parent.glob(f"{out.name}.part*"):
        path.unlink()
    reasons = Counter(f for r in ordered for f in r["finish_reasons"])
    if reasons["length"]:
        log.warning(
            "%s: %d of %d responses reached max_new_tokens without end-of-sequence (kept, finish_reason 'length')",
            out,
            reasons["length"],
            sum(reasons.values()),
        )
    print(f"wrote {len(ordered)} prompts to {out}", flush=True)


def judged_answers(
    policy: tuple[str | None, str | None],
    output: Path,
    prompts: str,
    judge: Judge,
    sampling: SamplingConfig = SamplingConfig(),
    columns: Columns = Columns(),
) -> dict[str, float]:
    """``Judge.held_out`` (``reward``, and ``accuracy`` for a verifier) of a policy's greedy answers to ``prompts``
    (``policy``: ``generate``'s model and gguf_file; ``sampling``: the answers' length), kept in ``output`` (a rerun
    reads them from there)."""
    greedy = SamplingConfig(**{**vars(sampling), "n": 1, "temperature": 0.0})
    path = generate(prompts, str(output), model=policy[0], gguf_file=policy[1], sampling=greedy, columns=columns)
    answered = read_jsonl(path)
    return judge.held_out(
        [r["prompt"] for r in answered], [r["responses"][0] for r in answered], [r["reference"] for r in answered]
    )


def pairs(generations: str, output: str, judge: Judge, batch_size: int = 256) -> dict:
    """Judge every response; per prompt the best becomes chosen and the worst rejected, for ``fit``.

    Prompts whose responses are all the same, or all score the same, give no preference and are dropped
    (counted). Each pair keeps both scores and both lengths in tokens.

    Args:
        generations: a file written by ``generate``.
        output: the JSONL file of pairs to write.
        judge: the judge (``class_path`` and ``init_args`` in YAML, e.g. ``simpo_lightning.generation.RuleJudge``).
        batch_size: responses per call of the judge.

    Returns:
        The summary: prompts, pairs kept, dropped (identical, tied), mean score and mean lengths.
    """
    rows = read_jsonl(Path(generations))
    if not rows:
        raise UserError(f"{generations}: no generations (run generate first)")
    for number, row in enumerate(rows, 1):  # another tool's file may lack what generate writes beside these
        responses = row.get("responses") if isinstance(row, dict) else None
        if "prompt" not in row or not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise DataError(f"{generations}:{number}: a row needs 'prompt' and 'responses' (a list of strings)")
    if min(len(r["responses"]) for r in rows) < 2:
        raise UserError(
            f"{generations}: pairs need at least 2 responses per prompt (generate with --sampling.n 2 or more)"
        )
    flat = [(i, k) for i, r in enumerate(rows) for k in range(len(r["responses"]))]
    scores: list[float] = []
    for start in range(0, len(flat), batch_size):
        chunk = flat[start : start + batch_size]
        scores += judge(
            [rows[i]["prompt"] for i, _ in chunk],
            [rows[i]["responses"][k] for i, k in chunk],
            [rows[i].get("reference") for i, _ in chunk],
        )
    by_prompt: dict[int, list[float]] = {}
    for (i, _), score in zip(flat, scores):
        by_prompt.setdefault(i, []).append(score)
    kept, counts = [], Counter()
    for i, row in enumerate(rows):
        responses, values, tokens = row["responses"], by_prompt[i], row.get("response_tokens")
        if len(set(responses)) == 1:
            counts["identical responses"] += 1
            continue
        best, worst = max(range(len(values)), key=values.__getitem__), min(range(len(values)), key=values.__getitem__)
        if values[best] == values[worst]:
            counts["tied scores"] += 1
            continue
        as_response = (
            (lambda text: [{"role": "assistant", "content": text}]) if isinstance(row["prompt"], list) else str
        )
        kept.append(
            {
                "prompt": row["prompt"],
                "chosen": as_response(responses[best]),
                "rejected": as_response(responses[worst]),
                "chosen_score": values[best],
                "rejected_score": values[worst],
                "reference": row.get("reference"),
                "chosen_tokens": tokens[best] if tokens else None,
                "rejected_tokens": tokens[worst] if tokens else None,
            }
        )
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in kept))
    summary = {
        "prompts": len(rows),
        "pairs": len(kept),
        "kept_share": len(kept) / len(rows),
        **dict(counts),
        "mean_score": sum(scores) / len(scores),
        "mean_tokens": _mean([t for r in rows for t in r.get("response_tokens") or []]),
        "mean_chosen_tokens": _mean([r["chosen_tokens"] for r in kept if r["chosen_tokens"] is not None]),
        "mean_rejected_tokens": _mean([r["rejected_tokens"] for r in kept if r["rejected_tokens"] is not None]),
    }
    print(f"wrote {len(kept)} pairs of {len(rows)} prompts to {out}: " + json.dumps(summary), flush=True)
    return summary


def _mean(values: list[float]) -> float | None:
    """The mean, or None for no values (token counts of a file that does not record them)."""
    return sum(values) / len(values) if values else None
