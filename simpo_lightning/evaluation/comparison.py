"""Comparing a candidate's answers with a baseline's, prompt by prompt: the judge's outcome of each prompt, the
win rate with a bootstrap interval, the length-controlled win rate, and length and repetition statistics.
``evaluate`` reports them after training, ``monitor.GenerationMonitor`` during it."""

import torch

from simpo_lightning.generation.judges import Judge, PairwiseJudge


def judge_outcomes(
    judge: Judge | PairwiseJudge, keys: list[str], mine: dict, base: dict, cache: dict[str, list[float]]
) -> tuple[torch.Tensor, list[dict]]:
    """Per prompt the outcome (1 the candidate wins, 0 it loses, the mean over samples) and the judge's numbers."""
    n = min(len(mine[k]["responses"]) for k in keys)
    flat = [(k, j) for k in keys for j in range(n)]
    prompts = [mine[k]["prompt"] for k, _ in flat]
    ours = [mine[k]["responses"][j] for k, j in flat]
    theirs = [base[k]["responses"][j] for k, j in flat]
    if isinstance(judge, PairwiseJudge):
        first = torch.tensor(judge(prompts, ours, theirs), dtype=torch.float64)  # candidate shown first
        second = torch.tensor(judge(prompts, theirs, ours), dtype=torch.float64)  # and second
        outcome = (first + 1 - second) / 2
        numbers = [{"p_candidate_first": a, "p_baseline_first": b} for a, b in zip(first.tolist(), second.tolist())]
    else:
        references = [mine[k]["reference"] for k, _ in flat]
        missing = [k for k in keys if k not in cache]
        if missing:
            texts = [
                (mine[k]["prompt"], base[k]["responses"][j], mine[k]["reference"]) for k in missing for j in range(n)
            ]
            scores = judge([t[0] for t in texts], [t[1] for t in texts], [t[2] for t in texts])
            for i, k in enumerate(missing):
                cache[k] = scores[i * n : (i + 1) * n]
        a = torch.tensor(judge(prompts, ours, references), dtype=torch.float64)
        b = torch.tensor([cache[k][j] for k, j in flat], dtype=torch.float64)
        outcome = (a > b).double() + 0.5 * (a == b).double()
        numbers = [{"candidate_score": x, "baseline_score": y} for x, y in zip(a.tolist(), b.tolist())]
    per_prompt = outcome.view(len(keys), n).mean(1)
    grouped = [{k: [d[k] for d in numbers[i * n : (i + 1) * n]] for k in numbers[0]} for i in range(len(keys))]
    return per_prompt, grouped


def win_rate(outcomes: torch.Tensor, resamples: int = 2000, seed: int = 0) -> dict:
    """The mean outcome and its 95% bootstrap interval (prompts resampled with replacement, seeded)."""
    outcomes = outcomes.double()
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(len(outcomes), (resamples, len(outcomes)), generator=generator)
    means = outcomes[index].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"win_rate": outcomes.mean().item(), "win_rate_low": low, "win_rate_high": high}


def length_controlled_win_rate(
    outcomes: torch.Tensor, length_difference: torch.Tensor, min_prompts: int = 10
) -> tuple[float | None, str]:
    """σ(a) of the logistic regression outcome ~ σ(a + b·tanh(Δ / sd(Δ))), soft targets, by Newton's method:
    the win rate at equal length. None and the reason where it cannot be fitted, and where no answer pair
    is on the other side of equal length (a is then an extrapolation that the data does not constrain)."""
    y, delta = outcomes.double(), length_difference.double()
    if len(y) < min_prompts:
        return None, f"{len(y)} prompts, fewer than {min_prompts}: no length-controlled win rate"
    spread = delta.std()
    if spread == 0:
        return None, "every answer pair has the same length difference: no length-controlled win rate"
    if y.min() == y.max():
        return y[0].item(), "every prompt has the same outcome: the length-controlled win rate equals it"
    if delta.min() > 0 or delta.max() < 0:
        side = "longer" if delta.min() > 0 else "shorter"
        return None, (
            f"every candidate answer is {side} than the baseline's: equal length is outside the data, "
            "so no length-controlled win rate (it would be an extrapolation)"
        )
    features = torch.stack([torch.ones_like(delta), torch.tanh(delta / spread)], dim=1)
    theta = torch.zeros(2, dtype=torch.float64)
    for _ in range(100):
        p = torch.sigmoid(features @ theta)
        gradient = features.T @ (p - y) / len(y)
        hessian = features.T @ (features * (p * (1 - p))[:, None]) / len(y)
        theta = theta - torch.linalg.solve(hessian, gradient)
        if gradient.abs().max() < 1e-12:
            break
    if not torch.isfinite(theta).all() or theta.abs().max() > 30 or gradient.abs().max() > 1e-8:
        return None, "length separates the outcomes (the regression does not converge): no length-controlled win rate"
    how = f"logistic regression on tanh(Δchars / {spread:.0f}): intercept {theta[0]:.3f}, slope {theta[1]:.3f}"
    return torch.sigmoid(theta[0]).item(), how


def response_stats(rows: list[dict]) -> dict:
    """Lengths (characters and tokens), the share that hit max_new_tokens, and repetition of generated rows."""
    texts = [t for r in rows for t in r["responses"]]
    chars = torch.tensor([len(t) for t in texts], dtype=torch.float64)
    tokens = [t for r in rows for t in r.get("response_tokens", [])]
    finish = [f for r in rows for f in r.get("finish_reasons", [])]
    return {
        "mean_chars": chars.mean().item(),
        "median_chars": chars.median().item(),
        "mean_tokens": sum(tokens) / len(tokens) if tokens else None,
        "hit_max_new_tokens": finish.count("length") / len(finish) if finish else 0.0,
        **repetition(texts),
    }


def repetition(texts: list[str]) -> dict:
    """``repeated_4gram``: the share of texts in which some word 4-gram occurs twice or more; ``distinct_2``:
    distinct word bigrams over all word bigrams of the texts (1 where there are none). Words: lower-cased,
    split at white space."""
    repeated, bigrams = 0, []
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
        repeated += len(set(grams)) < len(grams)
        bigrams += [tuple(words[i : i + 2]) for i in range(len(words) - 1)]
    return {
        "repeated_4gram": repeated / len(texts) if texts else 0.0,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 1.0,
    }
