"""benchmarks/real_model.py --smoke: the plumbing of the real-model benchmark on the tiny testbed."""

import json
from pathlib import Path

import pytest
from checks import run_benchmark

from elmkit.data.corpora import c4_head


def _run(tmp_path: Path, *extra: str) -> str:
    return run_benchmark("real_model.py", "--smoke", "--model", "testbed:tiny", "--data",
                         str(tmp_path / "data"), "--run", str(tmp_path / "run"), "--out",
                         str(tmp_path / "out"), *extra)


@pytest.mark.slow
def test_recipe_stage_stops_resumes_and_reports(tmp_path):
    docs = c4_head()  # the shipped C4 slice stands in for the shared samples
    (tmp_path / "data" / "calibration").mkdir(parents=True)
    for i, part in ((1, docs[:200]), (2, docs[200:])):
        (tmp_path / "data" / "calibration" / f"redpajama_c4_sample{i}.jsonl").write_text(
            "".join(json.dumps({"text": t}) + "\n" for t in part))
    recipe = tmp_path / "out" / "recipe"

    assert "stopped at the time budget" in _run(tmp_path, "--budget-s", "0")
    assert (recipe / "reference.json").is_file() and not list(recipe.glob("unit_*.json"))

    assert '"recipe": "done"' in _run(tmp_path)
    units = sorted(p.name for p in recipe.glob("unit_*.json"))
    assert len(units) == 6  # 3 losses x 2 learning rates
    data = json.loads((recipe / "recipe.json").read_text())
    assert all(len(u["curve"]) == 2 and all(c["ppl"] > 0 for c in u["curve"]) for u in data["units"])
    assert "| relative |" in (recipe / "recipe.md").read_text() and (recipe / "recipe.png").is_file()

    before = {p.name: p.read_text() for p in recipe.glob("unit_*.json")}
    out = _run(tmp_path)  # everything saved: nothing is trained again
    assert '"recipe": "done"' in out and " lr " not in out
    assert before == {p.name: p.read_text() for p in recipe.glob("unit_*.json")}
    (recipe / "recipe.md").unlink()
    _run(tmp_path, "--report-only")
    assert (recipe / "recipe.md").is_file()
