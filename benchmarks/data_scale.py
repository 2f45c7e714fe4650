"""Preference data at UltraFeedback's scale: the tokenised Arrow store against the previous in-memory path.

    python benchmarks/data_scale.py                     # 60,000 pairs (about 200 MB of JSONL), about 10 minutes
    python benchmarks/data_scale.py --pairs 2000        # a quick look

The file is made by ``make_pairs`` (deterministic: unique prompts, responses of a few hundred tokens),
tokenised with SmolLM2's tokenizer at ``max_length`` 2048 and ``max_prompt_length`` 512. Each measurement
runs in a fresh process. "old" is the path this project had until 2026-11-30, reproduced here: every
process reads and parses the whole file, encodes every row into Python lists, and pickles them to a
cache file that a later setup loads (after reading and parsing the file again). "new" is
``PreferenceDataModule``: ``prepare_data`` tokenises into memory-mapped Arrow files once (``num_proc``
processes), ``setup`` maps them.

Printed: tokens per second of the first setup (``num_proc`` 1 and 2 for new), seconds of the second
setup (cache hit), and per process, after setup and after one full pass over the training dataloader
(batches of 8, collated): anonymous resident memory (RssAnon: what the process itself allocated) and
proportional set size (PSS: its resident memory, pages shared with other processes divided among
them), also with 2 processes started together; with bytes per token of the set.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = """the of and to in is that for it as was with be by on not he this are or his from at which but have an they
you were her she there one all we their has been if more when will would who so no time can out up about into than
them some could these two may first then do any like my now over such our man me even most made after also did
many before must through back years where much your way well down should because each just those people how too
little state good very make world still own see men work long get here between both life being under never day
same another know while last might us great old year off come since against go came right used take three states
himself few house use during without again place american around however home small found mrs thought went say
part once general high upon school every don does got united left number course war until always away something
fact though water less public put think almost hand enough far took head yet government system better set told
nothing night end why called didn eyes find going look asked later knew point next program city business give
group toward young days let room president side social given present several order national possible rather
second face per among form important often things looked early white case john become large big need four within
felt along children saw best church ever least power development light thing seemed family interest want members
mind country area others done turned although open god service problem certain kind different thus began door
help means sense whole matter perhaps itself york times law human line above name example action company hands
local show whether five history gave today either act feet across taken past quite anything seen having death
experience body word half really field am car words already themselves information tell together college shall
money period held keep sure probably free seems political real behind cannot miss question air office making
brought whose special major heard problems ago became federal moment study available known result street economic
boy position reason change south board individual job society areas west close turn love community true court
force full seem am front""".split()


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def make_pairs(path: Path, pairs: int, seed: int = 0) -> None:
    """A deterministic file of ``pairs`` standard rows: a unique prompt of about 100 words, responses of
    about 250 words each."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(pairs):
            prompt = f"Request {i}: " + " ".join(sentence(rng, rng.randint(8, 16)) for _ in range(rng.randint(5, 10)))
            chosen, rejected = (
                " ".join(sentence(rng, rng.randint(8, 16)) for _ in range(rng.randint(15, 25))) for _ in range(2)
            )
            f.write(json.dumps({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}) + "\n")


def memory() -> dict[str, float]:
    """RssAnon and PSS of this process, in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    rollup = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return {"anon": int(status["RssAnon"].split()[0]) * 1024, "pss": int(rollup["Pss"].split()[0]) * 1024}


def worker(spec: dict) -> dict:
    """One measurement in this process: set up (old or new), then optionally a full pass."""
    import torch

    from simpo_lightning.data import (
        Columns,
        PairEncoder,
        PreferenceCollator,
        PreferenceDataModule,
        Truncation,
        encode_rows,
    )
    from simpo_lightning.data.sources import read_source
    from simpo_lightning.models.loading import PolicyConfig, load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(PolicyConfig())
    truncation = Truncation(max_length=2048, max_prompt_length=512)
    before = memory()  # the process with torch, transformers and the tokenizer loaded
    start = time.perf_counter()
    if spec["path"] == "old":
        rows, _ = read_source(spec["data"])  # every setup read and parsed the whole file
        cache = Path(spec["cache"]) / "old.pt"
        if cache.is_file():
            pairs = torch.load(cache)[0]
        else:
            pairs, skipped = encode_rows(
                rows, PairEncoder(tokenizer, Columns(), truncation, "auto"), spec["data"], "reference"
            )
            torch.save((pairs, dict(skipped)), cache)
        del rows
        train = pairs
    else:
        data = PreferenceDataModule(
            train_data=spec["data"],
            truncation=truncation,
            cache_dir=spec["cache"],
            num_proc=spec["num_proc"],
            batch_size=8,
            tokenizer=tokenizer,
        )
        data.prepare_data()
        data.setup()
        train = data.splits["train"]
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "before": before, "after_setup": memory()}
    if spec.get("full_pass"):
        loader = torch.utils.data.DataLoader(
            train, batch_size=8, collate_fn=PreferenceCollator(tokenizer.pad_token_id, True)
        )
        for _ in loader:
            pass
        result["after_pass"] = memory()
    result["tokens"] = (
        sum(len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in train) if spec.get("count") else None
    )
    return result


def run(specs: list[dict]) -> list[dict]:
    """Each spec in its own process, all started together."""
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(s)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        for s in specs
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        line = next((line for line in out.splitlines() if line.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"a worker failed:\n{out[-3000:]}")
        results.append(json.loads(line[len("RESULT ") :]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="data-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "pairs.jsonl"
    if not data.is_file():
        make_pairs(data, args.pairs)
    print(f"{args.pairs} pairs, {data.stat().st_size / 2**20:.0f} MiB of JSONL in {workdir}", flush=True)
    caches = {name: workdir / f"cache-{name}" for name in ("old", "new1", "new2")}
    for folder in caches.values():
        folder.mkdir(exist_ok=True)
    common = {"data": str(data)}
    first = {
        "old": run([{**common, "path": "old", "cache": str(caches["old"]), "count": True}])[0],
        "new, num_proc 1": run([{**common, "path": "new", "cache": str(caches["new1"]), "num_proc": 1}])[0],
        "new, num_proc 2": run([{**common, "path": "new", "cache": str(caches["new2"]), "num_proc": 2}])[0],
    }
    tokens = first["old"]["tokens"]
    print(f"{tokens} tokens of training pairs", flush=True)
    lines = ["| path | first setup s | tokens/s | ×old |", "|---|---|---|---|"]
    for name, r in first.items():
        rate = tokens / r["seconds"]
        lines.append(f"| {name} | {r['seconds']:.1f} | {rate:,.0f} | {rate / (tokens / first['old']['seconds']):.2f} |")
    print("\n".join(lines), flush=True)

    lines = [
        "",
        "Memory of the data: growth over the process before set-up (torch, transformers and the tokenizer "
        "loaded; about 375 MiB here).",
        "",
        "| path | processes | second setup s | RssAnon growth after setup | after a full pass | bytes/token | "
        "PSS growth after the pass |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, cache in (("old", caches["old"]), ("new", caches["new2"])):
        spec = {**common, "path": name, "cache": str(cache), "num_proc": 1, "full_pass": True}
        for processes in (1, 2):
            for i, r in enumerate(run([spec] * processes)):
                setup, after = (r[k]["anon"] - r["before"]["anon"] for k in ("after_setup", "after_pass"))
                pss = r["after_pass"]["pss"] - r["before"]["pss"]
                lines.append(
                    f"| {name} | {processes} (#{i + 1}) | {r['seconds']:.1f} | {setup / 2**20:.0f} MiB | "
                    f"{after / 2**20:.0f} MiB | {after / tokens:.1f} | {pss / 2**20:.0f} MiB |"
                )
                print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
