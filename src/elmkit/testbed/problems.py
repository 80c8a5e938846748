"""Seeded multi-step arithmetic word problems with chain-of-thought answers (GSM8K style).

A problem starts from a quantity and applies 1-5 changes, one sentence each: buying/finding more
(+), giving away/selling (-), doubling/tripling (*), keeping half/a third/a quarter (/). The
answer walks through one equation per step and ends in ``The answer is: N``::

    Q: Mia has 23 pens. She buys 5 more. The pens triple. How many pens does Mia have now?
    A: Buying 5: 23 + 5 = 28.
       Tripling: 28 * 3 = 84.
       The answer is: 84

The text is terse on purpose: byte-level tokens make every character cost compute.

Difficulty is the number of steps and the number of digits of the quantities added or removed.
Every intermediate value stays in [1, max_value] and every division is exact.

Splits are disjoint by construction: a problem belongs to test, validation or train according to a
hash of its question text, so no question can ever appear in two splits, however many problems are
drawn. The records are ELM/Alpaca ``{instruction, input, output}`` dicts, so the same readers and
scorers apply as for real data.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

from ..data.formats import Example

NAMES = (("Mia", "She"), ("Leo", "He"), ("Ava", "She"), ("Noah", "He"), ("Zoe", "She"),
         ("Liam", "He"), ("Emma", "She"), ("Omar", "He"), ("Ivy", "She"), ("Kai", "He"),
         ("Nora", "She"), ("Eli", "He"), ("Ruby", "She"), ("Sam", "He"), ("Lena", "She"),
         ("Max", "He"))
ITEMS = ("apples", "pens", "marbles", "stickers", "cookies", "books", "coins", "shells", "cards",
         "stamps", "beads", "eggs")
SPLITS = ("train", "validation", "test")

# (question sentence, answer line); {p} pronoun, {n} amount, {a} before, {r} result
_ADD = (("{p} buys {n} more.", "Buying {n}: {a} + {n} = {r}."),
        ("{p} finds {n} more.", "Finding {n}: {a} + {n} = {r}."),
        ("{p} gets {n} more.", "Getting {n}: {a} + {n} = {r}."))
_SUB = (("{p} gives {n} away.", "Giving {n} away: {a} - {n} = {r}."),
        ("{p} sells {n}.", "Selling {n}: {a} - {n} = {r}."),
        ("{p} loses {n}.", "Losing {n}: {a} - {n} = {r}."))
_MUL = {2: ("The {items} double.", "Doubling: {a} * 2 = {r}."),
        3: ("The {items} triple.", "Tripling: {a} * 3 = {r}."),
        4: ("The {items} quadruple.", "Quadrupling: {a} * 4 = {r}.")}
_DIV = {2: ("{p} keeps half.", "Keeping half: {a} / 2 = {r}."),
        3: ("{p} keeps a third.", "Keeping a third: {a} / 3 = {r}."),
        4: ("{p} keeps a quarter.", "Keeping a quarter: {a} / 4 = {r}.")}


@dataclass(frozen=True)
class ProblemConfig:
    """Difficulty of the generated problems."""

    min_steps: int = 1
    """Fewest changes applied to the starting quantity."""
    max_steps: int = 3
    """Most changes applied to the starting quantity (at most 5)."""
    digits: int = 1
    """Digits of the amounts bought or given away (1 -> 1..9, 2 -> 1..99)."""
    start_digits: int = 2
    """Digits of the starting quantity."""
    max_factor: int = 4
    """Largest multiplier / divisor (2..max_factor, at most 4)."""
    max_value: int = 999
    """Every intermediate quantity stays in [1, max_value]."""

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps <= 5:
            raise ValueError("need 1 <= --min-steps <= --max-steps <= 5")
        if not 1 <= self.digits <= 4 or not 1 <= self.start_digits <= 4:
            raise ValueError("--digits and --start-digits must be in 1..4")
        if not 2 <= self.max_factor <= 4:
            raise ValueError("--max-factor must be in 2..4")
        if self.max_value < 10 ** self.start_digits - 1:
            raise ValueError("--max-value must be at least the largest starting quantity")


def split_of(question: str) -> str:
    """The split a question belongs to: 1% test, 1% validation, 98% train (by hash)."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 100
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def make_problem(rng: random.Random, cfg: ProblemConfig) -> Example:
    """One problem drawn with ``rng``."""
    name, pron = rng.choice(NAMES)
    items = rng.choice(ITEMS)
    steps = rng.randint(cfg.min_steps, cfg.max_steps)
    value = rng.randint(2, 10 ** cfg.start_digits - 1)
    question = [f"{name} has {value} {items}."]
    answer = []
    for _ in range(steps):
        op, n, r = _draw_op(rng, value, cfg)
        if op == "+":
            q, a = rng.choice(_ADD)
        elif op == "-":
            q, a = rng.choice(_SUB)
        elif op == "*":
            q, a = _MUL[n]
        else:
            q, a = _DIV[n]
        question.append(q.format(p=pron, n=n, items=items))
        answer.append(a.format(n=n, a=value, r=r))
        value = r
    question.append(f"How many {items} does {name} have now?")
    answer.append(f"The answer is: {value}")
    return Example(" ".join(question), "", "\n".join(answer), str(value))


def _draw_op(rng: random.Random, value: int, cfg: ProblemConfig) -> tuple[str, int, int]:
    """A feasible change (op, amount, result) that keeps the value in [1, max_value]."""
    hi = 10 ** cfg.digits - 1
    ops = []
    if value + 1 <= cfg.max_value:
        ops.append("+")
    if value > 1:
        ops.append("-")
    if value * 2 <= cfg.max_value:
        ops.append("*")
    if any(value % k == 0 for k in range(2, cfg.max_factor + 1)):
        ops.append("/")
    op = rng.choice(ops)
    if op == "+":
        n = rng.randint(1, min(hi, cfg.max_value - value))
        return op, n, value + n
    if op == "-":
        n = rng.randint(1, min(hi, value - 1))
        return op, n, value - n
    if op == "*":
        k = rng.randint(2, max(2, min(cfg.max_factor, cfg.max_value // value)))
        return op, k, value * k
    k = rng.choice([k for k in range(2, cfg.max_factor + 1) if value % k == 0])
    return op, k, value // k


def stream(split: str, cfg: ProblemConfig, seed: int) -> Iterator[Example]:
    """Endless problems of one split, deterministic for (split, cfg, seed)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    # Each split draws from its own RNG stream, so the test set does not change with the
    # amount of training data requested.
    rng = random.Random(f"{seed}:{split}")
    seen: set[str] = set()
    misses = 0
    while True:
        ex = make_problem(rng, cfg)
        if split_of(ex.instruction) == split and ex.instruction not in seen:
            seen.add(ex.instruction)
            misses = 0
            yield ex
        else:
            misses += 1
            if misses > 50_000:  # the split has (almost) no unseen problems left
                raise ValueError(
                    f"the {split} split of {cfg} ran out of distinct problems after "
                    f"{len(seen)}; ask for fewer or make the problems harder")


def make_split(split: str, n: int, cfg: ProblemConfig = ProblemConfig(), seed: int = 0) -> list[Example]:
    """``n`` distinct problems of ``split``."""
    if n < 1:
        raise ValueError("n must be at least 1")
    it = stream(split, cfg, seed)
    return [next(it) for _ in range(n)]


def to_records(examples: list[Example]) -> list[dict[str, str]]:
    """ELM/Alpaca JSON records."""
    return [{"instruction": e.instruction, "input": e.input, "output": e.output} for e in examples]
