"""benchmarks/results_table.py end to end on the tiny testbed (its --smoke mode): a run stopped by
its time budget resumes, every method gets a row at both ratios, every start is enumerated, and
RESULTS.md is written from the JSON alone."""

import json
import sys
from pathlib import Path

import pytest
from checks import run_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, *extra: str) -> str:
    return run_benchmark("results_table.py", "--smoke", "--run", str(tmp_path / "run"),
                         "--out", str(tmp_path / "out"), *extra)


@pytest.mark.slow
def test_smoke_stops_resumes_and_reports(tmp_path):
    out = _run(tmp_path, "--budget-s", "0")
    assert "stopped at the time budget" in out
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "m7" not in data and not data.get("compare_done", {}).get("m7")  # nothing ran past the budget

    # the resumed run gets an unlimited budget: whether the smoke run fits the default 540 s
    # depends on how busy the machine is, and this test is about stopping and resuming
    out = _run(tmp_path, "--budget-s", "1e9")
    assert "stopped" not in out
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package
    import results_table as rt

    for name in ("m7", "m12"):
        assert [r["method"] for r in data[name]["rows"]] == ["dense", *rt.METHODS]
        assert data["compare_done"][name] == list(rt.METHODS)
    en = data["enumeration"]
    n = data["base_metrics"]["config"]["layers"]
    assert en["span"] == data[en["ratio"]]["removed"] + 1
    assert sorted(int(s) for s in en["accuracy"]) == list(range(n - en["span"] + 1))
    assert len(data["placement"][en["ratio"]]["elm"]["theta"]) == n - en["span"] + 1
    assert {r["kv_mode"] for r in data["kv"]["rows"]} == {"one_step", "per_iter"}

    md = (tmp_path / "out" / "RESULTS.md").read_text()
    for title in {r["title"] for r in data["m7"]["rows"]}:
        assert md.count(f"| {title} |") == 2  # one row per ratio
    assert "## The seeds' headline claims, checked here" in md
    for png in ("retention.png", "gppo_theta.png"):
        assert (tmp_path / "out" / png).stat().st_size > 0

    # a finished run is all cached: a third run measures nothing and writes the same report
    before = json.loads((tmp_path / "out" / "results.json").read_text())["gpu_s"]
    _run(tmp_path, "--budget-s", "1e9")
    assert json.loads((tmp_path / "out" / "results.json").read_text())["gpu_s"] == before
    assert (tmp_path / "out" / "RESULTS.md").read_text() == md
