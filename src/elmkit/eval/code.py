"""Code generation tasks: HumanEval (Chen et al., 2021) and MBPP (Austin et al., 2021).

A problem becomes a prompt, the model's completion is cut at the usual stop sequences (or the code
is taken out of a fenced block when the model answers in chat style), and the candidate program —
prompt + completion + the task's tests — runs in the sandbox (``elmkit.eval.sandbox``): it passes
when it exits with status 0. With n samples per problem of which c pass, pass@k is the unbiased
estimator of Chen et al.:

    pass@k = E_problems[ 1 - C(n - c, k) / C(n, k) ]

Prompts:
* HumanEval: the problem's ``prompt`` (signature + docstring) as is, completed by the model.
* MBPP: "You are an expert Python programmer, and here is your task: {text} Your code should pass
  these tests:\\n\\n{asserts}\\n", the format of the paper; with ``shots`` > 0, tasks 2, 3, 4 of the
  file precede it as worked examples between [BEGIN] and [DONE], as in the paper's prompt.
The standard MBPP test split is task_id 11-510.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..data.formats import DataFormatError, decode_utf8

HUMANEVAL_STOPS = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\n```", "\nassert ")
MBPP_STOPS = ("\nassert ", '\n"""', "\nif __name__", "\nprint(", "\n```", "[DONE]")
MBPP_SPLITS = {"test": (11, 510), "validation": (511, 600), "train": (601, 974), "prompt": (1, 10)}


@dataclass(frozen=True)
class CodeProblem:
    """One code task, ready to prompt and to test."""

    task_id: str
    """HumanEval/0, mbpp/11, ..."""
    prompt: str
    """What the model continues."""
    entry_point: str
    """Name of the function under test."""
    reference: str
    """The dataset's solution, written as a completion of ``prompt``."""
    test: str
    """Code run after the candidate; raises (or exits non-zero) when the candidate is wrong."""
    setup: str = ""
    """Code run between the candidate and the test (MBPP's test_setup_code)."""


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    with opener(path, "rb") as f:
        text = decode_utf8(f.read(), path)
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}, line {i}: not JSON ({e.msg})") from None
    return rows


def _need(path, i: int, rec: dict, keys: tuple[str, ...], fmt: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        raise DataFormatError(f"{path}, record {i}: missing {missing} (the {fmt} format needs "
                              f"{', '.join(keys)})")


def read_humaneval(path: str | Path) -> list[CodeProblem]:
    """HumanEval.jsonl(.gz): task_id, prompt, canonical_solution, test, entry_point."""
    out = []
    for i, r in enumerate(_jsonl(Path(path)), 1):
        _need(path, i, r, ("task_id", "prompt", "canonical_solution", "test", "entry_point"), "humaneval")
        out.append(CodeProblem(r["task_id"], r["prompt"], r["entry_point"], r["canonical_solution"],
                               f"{r['test']}\n\ncheck({r['entry_point']})\n"))
    return out


def read_mbpp(path: str | Path, split: str = "test", shots: int = 0) -> list[CodeProblem]:
    """mbpp.jsonl: text, code, task_id, test_list, test_setup_code; ``split`` by task_id ranges."""
    if split not in MBPP_SPLITS and split != "all":
        raise ValueError(f"MBPP split must be one of {', '.join(MBPP_SPLITS)} or all, got {split!r}")
    if not 0 <= shots <= 3:
        raise ValueError("MBPP shots must be 0..3 (tasks 2, 3, 4 are the paper's examples)")
    rows = _jsonl(Path(path))
    for i, r in enumerate(rows, 1):
        _need(path, i, r, ("task_id", "text", "code", "test_list"), "mbpp")
    by_id = {r["task_id"]: r for r in rows}
    head = ""
    if shots:
        missing = [t for t in (2, 3, 4)[:shots] if t not in by_id]
        if missing:
            raise DataFormatError(f"{path} lacks the prompt tasks {missing} needed for {shots} shots")
        head = "".join(_mbpp_prompt(by_id[t]) + "[BEGIN]\n" + _clean(by_id[t]["code"]) + "\n[DONE]\n"
                       for t in (2, 3, 4)[:shots])
    lo, hi = MBPP_SPLITS.get(split, (1, 10 ** 9))
    out = []
    for r in rows:
        if not lo <= r["task_id"] <= hi:
            continue
        prompt = head + _mbpp_prompt(r) + ("[BEGIN]\n" if shots else "")
        m = re.search(r"^def\s+(\w+)\s*\(", _clean(r["code"]), re.M)
        out.append(CodeProblem(f"mbpp/{r['task_id']}", prompt, m.group(1) if m else "",
                               _clean(r["code"]), "\n".join(r["test_list"]) + "\n",
                               r.get("test_setup_code") or ""))
    return out


def _mbpp_prompt(r: dict) -> str:
    tests = "\n".join(r["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {r['text']} "
            f"Your code should pass these tests:\n\n{tests}\n")


def _clean(code: str) -> str:
    return code.replace("\r\n", "\n")


def read_problems(task: str, path: str | Path, shots: int = 0) -> list[CodeProblem]:
    if task == "humaneval":
        return read_humaneval(path)
    if task == "mbpp":
        return read_mbpp(path, "test", shots)
    raise ValueError(f"unknown code task {task!r}; choose humaneval or mbpp")


# ---------------------------------------------------------------------------------------------
# completions -> programs
# ---------------------------------------------------------------------------------------------


_FENCE = re.compile(r"```(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.S)


def extract_completion(task: str, problem: CodeProblem, text: str) -> str:
    """The code part of a model's output.

    A fenced block (chat-style answer) is taken out first. A completion that redefines the whole
    function is kept whole up to the first top-level test/print; a plain continuation is cut at
    the first stop sequence.
    """
    m = _FENCE.search(text)
    if m:
        text = m.group(1)
    full = bool(problem.entry_point) and re.search(rf"^def\s+{re.escape(problem.entry_point)}\s*\(",
                                                     text, re.M)
    if task == "mbpp" or full:
        stops = MBPP_STOPS if task == "mbpp" else ("\nif __name__", "\nprint(", "\n```", "\nassert ")
    else:
        stops = HUMANEVAL_STOPS
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut].rstrip() + "\n"


# The candidate runs inside exec() so that exiting early (sys.exit(0), raise SystemExit, os._exit(0))
# cannot end the program with status 0 before the tests have run.
_RUN_CANDIDATE = """import builtins as _b, os as _o, sys as _s

def _no_exit(*args, **kwargs):
    raise RuntimeError("the candidate tried to exit before the tests ran")

_o._exit = _s.exit = _b.exit = _b.quit = _no_exit
try:
    exec(compile({src!r}, "candidate.py", "exec"), globals())
except SystemExit:
    raise RuntimeError("the candidate tried to exit before the tests ran") from None
"""


def build_program(task: str, problem: CodeProblem, completion: str) -> str:
    """The program the sandbox runs for one candidate: the candidate, then the task's tests."""
    if task == "humaneval":
        redefines = re.search(rf"^def\s+{re.escape(problem.entry_point)}\s*\(", completion, re.M)
        # a full function (chat-style answer): keep the prompt's imports, let the new def replace the stub
        candidate = problem.prompt + "    pass\n\n" + completion if redefines else problem.prompt + completion
        return _RUN_CANDIDATE.format(src=candidate) + "\n" + problem.test
    # MBPP's setup code builds test inputs from the candidate's own classes (task 367), so it follows
    return _RUN_CANDIDATE.format(src=completion) + "\n" + problem.setup + "\n" + problem.test


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


# ---------------------------------------------------------------------------------------------
# the whole evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_code(model, tokenizer, problems: list[CodeProblem], task: str, samples: int = 1,
                  temperature: float = 0.0, top_p: float = 0.95, pass_k: tuple[int, ...] = (1,),
                  max_new_tokens: int = 512, batch_size: int = 8, sandbox=None, workers: int = 2,
                  seed: int = 0, progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate ``samples`` completions per problem, run them in the sandbox, score pass@k.

    Returns (metrics, one record per completion). Prompts are raw text (no chat template): the
    completion style both tasks were designed for.
    """
    from .generate import generate
    from .sandbox import SandboxConfig, check_available, run_many

    bad = [k for k in pass_k if k > samples]
    if bad:
        raise ValueError(f"pass@{bad[0]} needs --samples >= {bad[0]}, got {samples}")
    sandbox = sandbox or SandboxConfig()
    check_available(sandbox)  # refuse before generating, not after
    prompts = [tokenizer(p.prompt, add_special_tokens=False)["input_ids"] for p in problems]
    outs = generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, samples,
                    temperature, top_p, seed)
    records, programs = [], []
    for p, group in zip(problems, outs):
        for j, toks in enumerate(group):
            text = tokenizer.decode(toks, skip_special_tokens=True)
            completion = extract_completion(task, p, text)
            programs.append(build_program(task, p, completion))
            records.append({"task_id": p.task_id, "sample": j, "output": text, "completion": completion})
    results = run_many(programs, sandbox, workers, progress)
    for rec, res in zip(records, results):
        rec.update(status=res.status, passed=res.passed, detail=res.detail[-500:])
    passed = {p.task_id: 0 for p in problems}
    for rec in records:
        passed[rec["task_id"]] += rec["passed"]
    metrics = {"task": task, "problems": len(problems), "samples": samples, "temperature": temperature}
    for k in pass_k:
        metrics[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in passed.values()) / len(problems)
    metrics["status_counts"] = {s: sum(r["status"] == s for r in records)
                                for s in ("passed", "failed", "timeout", "error")}
    return metrics, records
