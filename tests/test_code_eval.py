"""HumanEval / MBPP: prompts, post-processing, pass@k, canonical solutions in the sandbox."""

import json
import math

import pytest

from elmkit import cli
from elmkit.eval import bubblewrap
from elmkit.eval.code import (
    CodeProblem,
    build_program,
    extract_completion,
    pass_at_k,
    read_humaneval,
    read_mbpp,
)
from elmkit.eval.sandbox import SandboxConfig, run_many

# These tests check scoring, not isolation (test_sandbox*.py do): where the kernel layer cannot run
# (no bwrap, no user namespaces) they use the weak sandbox rather than stop at the refusal.
WEAK = bubblewrap.unavailable() is not None
FAST = SandboxConfig(timeout_s=10.0, allow_weak=WEAK)
# Correctness, not speed: canonical solutions get ample headroom, and one that still times out (the
# machine was busy, e.g. MBPP 123 sums amicable numbers below 10,000) runs once more, alone. Timeouts
# themselves are tested by the hostile programs in test_sandbox.py.
AMPLE = SandboxConfig(timeout_s=60.0, allow_weak=WEAK)


def run_for_correctness(programs: list[str]) -> list:
    res = run_many(programs, AMPLE, 2, False)
    again = [i for i, r in enumerate(res) if r.status == "timeout"]
    for i, r in zip(again, run_many([programs[i] for i in again], AMPLE, 1, False)):
        res[i] = r
    return res


@pytest.mark.parametrize("n,c,k", [(5, 2, 1), (5, 2, 2), (10, 0, 3), (10, 10, 1), (20, 3, 5), (7, 5, 3)])
def test_pass_at_k_matches_the_closed_form(n, c, k):
    want = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_hand_counts():
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    with pytest.raises(ValueError, match="at least 3 samples"):
        pass_at_k(2, 1, 3)


PROBLEM = CodeProblem("T/0", 'def add(a, b):\n    """Sum."""\n', "add", "    return a + b\n",
                      "def check(f):\n    assert f(2, 3) == 5\n\ncheck(add)\n")


def test_extract_completion_cuts_at_stops_and_reads_fences():
    raw = "    return a + b\n\ndef other():\n    pass\nprint(add(1, 2))"
    assert extract_completion("humaneval", PROBLEM, raw) == "    return a + b\n"
    chat = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    got = extract_completion("humaneval", PROBLEM, chat)
    assert got.startswith("def add(a, b):") and "Done" not in got
    assert extract_completion("mbpp", PROBLEM, "def add(a, b):\n    return a+b\nassert add(1,1)==2\n") \
        == "def add(a, b):\n    return a+b\n"


def test_programs_pass_and_fail_as_they_should():
    ok = build_program("humaneval", PROBLEM, "    return a + b\n")
    full = build_program("humaneval", PROBLEM, "def add(a, b):\n    return b + a\n")
    wrong = build_program("humaneval", PROBLEM, "    return a - b\n")
    res = run_many([ok, full, wrong], AMPLE, workers=2, progress=False)
    assert [r.passed for r in res] == [True, True, False]
    assert "AssertionError" in res[2].detail


def _humaneval_file(tmp_path, n=2):
    rows = [{"task_id": f"Toy/{i}", "prompt": f'def f{i}(x):\n    """Return x + {i}."""\n',
             "canonical_solution": f"    return x + {i}\n", "entry_point": f"f{i}",
             "test": f"def check(c):\n    assert c(1) == {1 + i}\n"} for i in range(n)]
    p = tmp_path / "he.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_eval_command_runs_humaneval_end_to_end(tiny_dir, tmp_path):
    data = _humaneval_file(tmp_path)
    assert read_humaneval(data)[1].test.endswith("check(f1)\n")
    rc = cli.main(["eval", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "e"),
                   "--task", "humaneval", "--max-new-tokens", "8", "--samples", "2", "--temperature", "0.8",
                   "--pass-k", "1", "2", "--sandbox.timeout-s", "5",
                   *(["--sandbox.allow-weak", "true"] if WEAK else [])])
    assert rc == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["problems"] == 2 and m["samples"] == 2 and 0 <= m["pass@1"] <= m["pass@2"] <= 1
    lines = (tmp_path / "e" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(l)["status"] in ("passed", "failed", "timeout") for l in lines)


def test_humaneval_canonical_solutions_all_pass_and_wrong_ones_fail(shared_data):
    problems = read_humaneval(shared_data / "humaneval" / "HumanEval.jsonl.gz")
    assert len(problems) == 164
    res = run_for_correctness([build_program("humaneval", p, p.reference) for p in problems])
    failed = [(p.task_id, r.detail) for p, r in zip(problems, res) if not r.passed]
    assert failed == []
    wrong = run_many([build_program("humaneval", p, "    return None\n") for p in problems[:20]], FAST, 2,
                     False)
    assert not any(r.passed for r in wrong)


def test_mbpp_reference_solutions_all_pass_and_wrong_ones_fail(shared_data):
    problems = read_mbpp(shared_data / "mbpp" / "mbpp.jsonl", "test")
    assert len(problems) == 500 and problems[0].task_id == "mbpp/11" and problems[-1].task_id == "mbpp/510"
    res = run_for_correctness([build_program("mbpp", p, p.reference) for p in problems])
    failed = [(p.task_id, r.detail) for p, r in zip(problems, res) if not r.passed]
    assert failed == []
    wrong = [build_program("mbpp", p, f"def {p.entry_point}(*args):\n    return None\n")
             for p in problems[:20]]
    assert not any(r.passed for r in run_many(wrong, FAST, 2, False))
    shot = read_mbpp(shared_data / "mbpp" / "mbpp.jsonl", "test", shots=3)[0]
    assert shot.prompt.count("[BEGIN]") == 4 and shot.prompt.count("[DONE]") == 3
    assert "Your code should pass these tests" in shot.prompt and shot.prompt.endswith("[BEGIN]\n")


@pytest.mark.parametrize("cheat", ["import sys\nsys.exit(0)\n", "raise SystemExit(0)\n",
                                   "import os\nos._exit(0)\n", "exit(0)\n"])
def test_exiting_before_the_tests_does_not_pass(cheat):
    res = run_many([build_program("humaneval", PROBLEM, "    return a - b\n" + cheat)], FAST, 1, False)
    assert not res[0].passed
