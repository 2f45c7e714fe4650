"""The built-in verifiable task: small sums and differences with one correct number.

"What is 7 + 5? Answer with the number only." for a and b from 1 to 9, and "What is 23 - 4? ..." for a from 10 to
30 and b from 1 to 9: 270 problems, every fifth held out (``val``). The untrained SmolLM2-135M-Instruct answers
with greedy decoding about half of the sums and a seventh of the differences right ("9 + 8 = 17", "25 - 2 = 15"):
room to improve, and correct samples to learn from. ``answer`` reads the number an answer gives (the last one on
its first line, so "7 + 5 = 12" gives 12); ``generation.judges.NumberJudge`` scores it against the reference.
Rows carry a pair too (the right number against a near miss) for the offline methods.
"""

import re

VERSION = 1  # bump when the generated rows change (it keys the tokenisation cache)
INSTRUCTION = "Answer with the number only."


def problems(split: str = "train") -> list[tuple[str, int]]:
    """``(question, answer)`` of ``split`` (``train`` or ``val``: every fifth problem)."""
    if split not in ("train", "val"):
        raise ValueError(f"the arithmetic task has splits 'train' and 'val', not {split!r}")
    every = [(f"What is {a} + {b}?", a + b) for a in range(1, 10) for b in range(1, 10)]
    every += [(f"What is {a} - {b}?", a - b) for a in range(10, 31) for b in range(1, 10)]
    return [p for i, p in enumerate(every) if (i % 5 == 4) == (split == "val")]


def rows(split: str = "train") -> list[dict]:
    """Conversational rows: the question as the prompt, its number as the ``reference``, and a pair (the number
    against the number one off)."""
    out = []
    for i, (question, answer) in enumerate(problems(split)):
        miss = answer + (1 if i % 2 else -1)
        out.append(
            {
                "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
                "chosen": [{"role": "assistant", "content": str(answer)}],
                "rejected": [{"role": "assistant", "content": str(miss)}],
                "reference": str(answer),
            }
        )
    return out


def answer(text: str) -> int | None:
    """The number an answer gives: the last integer on its first non-empty line, None if there is none."""
    line = next((part for part in text.strip().splitlines() if part.strip()), "")
    numbers = re.findall(r"-?\d+", line.replace(",", ""))
    return int(numbers[-1]) if numbers else None


def bare(text: str) -> bool:
    """Whether the answer is the number alone (a final full stop allowed)."""
    return re.fullmatch(r"\s*-?\d+\.?\s*", text) is not None
