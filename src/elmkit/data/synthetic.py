"""A small seeded arithmetic task for smoke runs and tests (no files needed).

``What is 23 + 58?`` -> ``23 + 58 = 81.\\nThe answer is: 81``. The richer multi-step word
problems of the testbed live in ``elmkit.testbed``.
"""

from __future__ import annotations

import random

from .formats import Example


def arithmetic_examples(n: int, seed: int = 0, max_operand: int = 99) -> list[Example]:
    """``n`` distinct addition/subtraction questions with worked answers."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        if (a, op, b) in seen:
            if len(seen) >= 2 * (max_operand + 1) ** 2:
                raise ValueError(f"cannot draw {n} distinct questions with max_operand={max_operand}")
            continue
        seen.add((a, op, b))
        c = a + b if op == "+" else a - b
        out.append(Example(f"What is {a} {op} {b}?", "", f"{a} {op} {b} = {c}.\nThe answer is: {c}", str(c)))
    return out
