"""How far bfloat16 autocast moves the SimPO loss and its inputs from float32, on real pairs.

    python benchmarks/bf16_accuracy.py            # SmolLM2-135M-Instruct, 48 HH-RLHF pairs (or demo pairs)

Scores the same pairs with the same weights in float32 and under ``torch.autocast(bfloat16)`` (the
``bf16-mixed`` setting: bfloat16 matrix products, float32 log-softmax, sums and loss) and prints the
differences of the average log-probs (SimPO's reward before β), the per-pair losses and the share of
pairs whose preference (reward accuracy) flips.
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simpo_lightning.data import Columns, PairEncoder, PreferenceCollator, Truncation
from simpo_lightning.methods.preference import SimPOModule
from simpo_lightning.models.loading import PolicyConfig
from simpo_lightning.scoring.sequences import score_pair_batch

from vs_trl import prepare


@torch.no_grad()
def main() -> None:
    model, data = prepare(Path(tempfile.mkdtemp(prefix="bf16-")), tiny=False, n_pairs=48, max_length=512)
    module = SimPOModule(policy=PolicyConfig(name_or_path=model), lora=None)
    module.configure_model()
    module.model.eval()
    encode = PairEncoder(module.tokenizer, Columns(), Truncation(512, None), "standard")
    pairs = [encode(json.loads(line)) for line in data.read_text().splitlines()]
    collate = PreferenceCollator(module.tokenizer.pad_token_id)
    results = {}
    for name, enabled in (("float32", False), ("bf16", True)):
        logps, losses = [], []
        for start in range(0, len(pairs), 4):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                batch = collate(pairs[start : start + 4])
                chosen, rejected = score_pair_batch(module.model, batch, module.chunk).halves()
                loss, metrics = module.step(batch)
            logps.append(torch.stack([chosen.mean_logps, rejected.mean_logps], 1).float())
            losses.append(metrics["loss"].float())
        results[name] = torch.cat(logps), torch.cat(losses)
    (lp32, loss32), (lp16, loss16) = results["float32"], results["bf16"]
    flips = ((lp32[:, 0] > lp32[:, 1]) != (lp16[:, 0] > lp16[:, 1])).float().mean()
    print(f"{len(pairs)} pairs, SimPO β=2, γ/β=0.5, SmolLM2-135M-Instruct")
    print(
        f"average log-prob: float32 mean {lp32.mean():.4f}; |bf16 - float32| mean {(lp16 - lp32).abs().mean():.4f}, "
        f"max {(lp16 - lp32).abs().max():.4f}"
    )
    print(
        f"per-pair loss: float32 mean {loss32.mean():.4f}; |bf16 - float32| mean {(loss16 - loss32).abs().mean():.4f}, "
        f"max {(loss16 - loss32).abs().max():.4f}; "
        f"batch-mean loss relative difference {(loss16.mean() / loss32.mean() - 1).abs():.2%}"
    )
    print(f"pairs whose preference flips: {flips:.1%}")


if __name__ == "__main__":
    main()
