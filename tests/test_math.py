import json
import random

import pytest

from elmkit.eval.math import (
    extract_gsm8k,
    extract_math,
    gsm8k_equal,
    last_boxed,
    math_equal,
    score_gsm8k,
    score_math,
)


def _gsm8k(shared_data):
    rows = [json.loads(l) for l in open(shared_data / "gsm8k/test.jsonl", encoding="utf-8")]
    golds = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]
    responses = [r["answer"].rsplit("####", 1)[0].rstrip() + f"\nThe answer is: {g}"
                 for r, g in zip(rows, golds)]
    return responses, golds


def test_gsm8k_references_score_100_percent(shared_data):
    responses, golds = _gsm8k(shared_data)
    assert len(golds) == 1319
    assert all(score_gsm8k(r, g)[1] for r, g in zip(responses, golds))


def test_gsm8k_shuffled_pairs_score_near_zero(shared_data):
    responses, golds = _gsm8k(shared_data)
    shuffled = golds[:]
    random.Random(0).shuffle(shuffled)
    acc = sum(score_gsm8k(r, g)[1] for r, g in zip(responses, shuffled)) / len(golds)
    assert acc < 0.05


def test_math_boxed_answers_score_100_percent(shared_data):
    rows = [json.loads(l) for l in open(shared_data / "math/MATH_test_answers.jsonl", encoding="utf-8")]
    assert len(rows) == 5000
    wrong = [r["answer"] for r in rows
             if not score_math(f"Thus the answer is $\\boxed{{{r['answer']}}}$.", r["answer"])[1]]
    assert wrong == []


def test_math_shuffled_pairs_score_low(shared_data):
    rows = [json.loads(l) for l in open(shared_data / "math/MATH_test_answers.jsonl", encoding="utf-8")]
    golds = [r["answer"] for r in rows]
    shuffled = golds[:]
    random.Random(0).shuffle(shuffled)
    acc = sum(score_math(f"\\boxed{{{a}}}", b)[1] for a, b in zip(golds, shuffled)) / len(golds)
    assert acc < 0.05


@pytest.mark.parametrize("text,expected", [
    ("so 3 + 4 = 7.\nThe answer is: 7", "7"),
    ("The answer is: $1,234.50.", "1234.5"),
    ("The answer is 18 dollars", "18"),
    ("the answer is: -3", "-3"),
    ("She has 5 left.\n#### 5", "5"),
    ("First 12, then 30 apples in total.", "30"),  # last-number fallback
    ("The answer is: 4. Then I counted 9 more.", "4"),  # first number after the marker
    ("no digits here", None),
])
def test_gsm8k_extraction(text, expected):
    assert extract_gsm8k(text) == expected


def test_gsm8k_comparison_is_numeric():
    assert gsm8k_equal("1000", "1,000") and gsm8k_equal("18.0", "18")
    assert not gsm8k_equal("17", "18") and not gsm8k_equal(None, "1")


@pytest.mark.parametrize("a,b", [
    ("0.5", "\\frac12"), ("\\dfrac{3}{4}", "0.75"), ("\\tfrac{1}{2}", "\\frac{1}{2}"),
    ("\\left( 1, 2 \\right)", "(1,2)"), ("90^\\circ", "90"), ("90^{\\circ}", "90"),
    ("10\\text{ cm}", "10"), ("x = 5", "5"), ("3/4", "\\frac{3}{4}"), ("\\$5", "5"),
    ("\\text{odd}", "odd"), ("-\\frac{1}{2}", "-0.5"), ("\\sqrt2", "\\sqrt{2}"), (".5", "0.5"),
    ("5.", "5"), ("50\\%", "50"), ("\\frac{1}2", "\\frac{1}{2}"),
])
def test_math_equivalences(a, b):
    assert math_equal(a, b)


@pytest.mark.parametrize("a,b", [("1", "2"), ("\\frac{1}{3}", "0.33"), ("(1,2)", "(2,1)"),
                                 ("\\sqrt{2}", "\\sqrt{3}"), ("x^2", "x^3")])
def test_math_non_equivalences(a, b):
    assert not math_equal(a, b)


def test_math_extraction():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert last_boxed("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert last_boxed("\\fbox{7}") == "7"
    assert last_boxed("\\boxed 5$") == "5"
    assert extract_math("no box. The answer is: $\\frac{1}{2}$.\n") == "\\frac{1}{2}"
    assert extract_math("nothing") is None
    assert not score_math("nothing", "1")[1]


def test_review_cases():
    assert math_equal("-1/2", "-\\frac{1}{2}") and math_equal("\\frac{-3}{4}", "-0.75")
    assert not math_equal("\\frac{-3}{4}", "0.75")
    assert math_equal("\\sqrt 2", "\\sqrt{2}")
    assert extract_gsm8k("The answer is:\n- 15") == "15"  # a bullet, not a minus sign
    assert extract_gsm8k("The answer is \u22125") == "-5"  # unicode minus
    assert extract_gsm8k("it loops " + "1" * 400) is None  # too large to be a number: wrong, no crash
    assert gsm8k_equal("18", "18 dollars")
