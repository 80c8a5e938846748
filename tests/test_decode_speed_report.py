"""benchmarks/decode_speed.py's report, rebuilt on a CPU from the committed JSON: it is the committed
report, its table holds one run's rows (an older version's rows are counted, not mixed in), and the
greedy check is stated per shape."""

import json
import shutil
from pathlib import Path

import pytest
from checks import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "decode_speed"


def _row(path, version, **kw):
    return {"shape": "qwen2.5-1.5b", "path": path, "batch": 1, "prompt": 512, "new_tokens": 8,
            "ms_per_token": 2.0, "tokens_per_s": 500.0, "roofline_pct": 40.0, "roofline_tokens_per_s": 1250.0,
            "version": version, **kw}


def test_report_from_the_committed_json_is_the_committed_report(tmp_path):
    out = tmp_path / "decode_speed"
    shutil.copytree(RESULTS, out)
    (out / "report.md").unlink()
    run_benchmark("decode_speed.py", "--report-only", "--out", str(out))
    assert (out / "report.md").read_text() == (RESULTS / "report.md").read_text()


@pytest.fixture
def ds(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # benchmarks/ is not a package
    import decode_speed

    return decode_speed


def test_one_runs_rows_and_the_greedy_check(tmp_path, ds):
    env = {"device": "GPU", "torch": "t", "cuda": "c", "transformers": "x"}
    old = [_row("fast-ops", None, tokens_per_s=123.0), _row("hf-eager", None)]
    assert ds.current_rows({"rows": old}) == old  # nothing newer: the older rows are the table
    new = [_row("hf-eager", ds.VERSION, tokens_per_s=50.0),
           _row("fast", ds.VERSION, greedy_equal=True, greedy_first_diff=None),
           _row("fast-math", ds.VERSION, greedy_equal=False, greedy_first_diff=7)]
    data = {"env": env, "bandwidth_tb_s": 3.0, "rows": old + new}
    assert ds.current_rows(data) == new
    (tmp_path / "results.json").write_text(json.dumps(data))
    ds.report(tmp_path, data)
    md = (tmp_path / "report.md").read_text()
    assert "2 rows measured earlier (qwen2.5-1.5b; batch 1; prompt 512;" in md
    assert "123.0" not in md  # the older fast-ops row is not in the table
    assert md.count("| qwen2.5-1.5b |") == 3
    assert "qwen2.5-1.5b: 1 of 2 fast rows give model.generate's first 32 greedy tokens" in md
    assert "positions 7 (fast-math)" in md
    assert "fast / hf-eager = 10.0x" in md


def test_older_rows_are_migrated_and_another_machines_rows_named(tmp_path, ds):
    data = {"env": {"device": "GPU A"}, "rows": [
        _row("fast", None), _row("elm-fixed", None), _row("fast", ds.VERSION), _row("hf-eager", ds.VERSION)]}
    js = tmp_path / "results.json"
    js.write_text(json.dumps(data))
    rows = ds.load(js)["rows"]
    assert [r["path"] for r in rows[:2]] == ["fast-ops", "elm-fixed"]
    assert rows[1]["step"] == "fast-ops"  # the first version's ELM rows ran the step now called fast-ops
    assert ds._label(rows[1]) == "elm-fixed (fast-ops)"
    assert [r.get("device") for r in rows] == [None, None, "GPU A", "GPU A"]


def test_step_targets(ds):
    fast = _row("fast", ds.VERSION, ms_per_token=2.0, roofline_pct=55.0)
    fixed = _row("elm-fixed", ds.VERSION, ms_per_token=2.02, block_launches=8.0)
    adaptive = _row("elm-anderson", ds.VERSION, ms_per_token=1.99, block_launches=4.0)
    got = dict(ds.step_targets([fast, fixed, adaptive]))
    assert len(got) == 3
    (roof, ok_roof), (fix, ok_fix), (ada, ok_ada) = got.items()
    assert "55.0%" in roof and ok_roof
    assert "1.010x" in fix and "within 2% of 1" in fix and ok_fix
    assert "0.995x" in ada and not ok_ada  # faster, but not beyond one run's noise
    adaptive["ms_per_token"] = 1.8
    assert dict(ds.step_targets([fast, adaptive])).popitem()[1]
    assert "different runs" not in fix  # one run: nothing to add
    fixed["run"] = "2026-01-02 10:00 UTC"  # ELM timed again alone
    (text, _), = [t for t in ds.step_targets([fast, fixed]) if "fixed" in t[0]]
    assert "timed in different runs, unstamped and 2026-01-02 10:00 UTC: rerun both together" in text


def test_rows_of_several_runs_are_named(tmp_path, ds):
    env = {"device": "GPU", "torch": "t", "cuda": "c", "transformers": "x"}
    one = [_row("hf-eager", ds.VERSION, run="2026-01-01 10:00 UTC"), _row("fast", ds.VERSION)]
    assert ds._runs_text(one[:1]) == []  # one run: nothing to say
    data = {"env": env, "bandwidth_tb_s": 3.0, "rows": one}
    ds.report(tmp_path, data)
    md = (tmp_path / "report.md").read_text()
    assert ("Rows of more than one run" in md and "2026-01-01 10:00 UTC: qwen2.5-1.5b hf-eager" in md
            and "an earlier run (rows saved before runs were stamped): qwen2.5-1.5b fast" in md)


def test_version_2_steps_are_renamed_to_what_they_ran(tmp_path, ds):
    """v2's default step ran SDPA (v3: fast-sdpa); its fast-triton is what v3's default runs."""
    rows = [_row("fast", 2), _row("fast-triton", 2), _row("fast-ops", 2),
            _row("elm-fixed", 2, step="fast"), _row("elm-fixed", 2, step="fast-triton")]
    js = tmp_path / "results.json"
    js.write_text(json.dumps({"env": {"device": "GPU"}, "rows": rows}))
    got = ds.load(js)["rows"]
    assert [ds._label(r) for r in got] == ["fast-sdpa", "fast", "fast-ops", "elm-fixed (fast-sdpa)",
                                           "elm-fixed"]
    assert {r["version"] for r in got} == {ds.VERSION}
    assert [r["attention"] for r in got] == ["sdpa", "triton", "sdpa", "sdpa", "triton"]


def test_elm_targets_compare_rows_of_one_step(ds):
    """An ELM row is set against the dense row of the step it ran: the default's where both exist."""
    sdpa = _row("fast-sdpa", ds.VERSION, ms_per_token=2.0)
    fast = _row("fast", ds.VERSION, ms_per_token=1.6, roofline_pct=45.0)
    adaptive = _row("elm-anderson", ds.VERSION, ms_per_token=1.8, block_launches=4.0, step="fast-sdpa")
    assert ds.elm_pair([sdpa, fast, adaptive], "qwen2.5-1.5b", "elm-anderson") == (sdpa, adaptive)
    (text, met), = [t for t in ds.step_targets([sdpa, fast, adaptive]) if "adaptive" in t[0]]
    assert "(both on the fast-sdpa step): 0.900x" in text and met
    fixed_default = _row("elm-fixed", ds.VERSION, ms_per_token=1.62, block_launches=8.0, step="fast")
    fixed_sdpa = _row("elm-fixed", ds.VERSION, ms_per_token=2.5, block_launches=8.0, step="fast-sdpa")
    rows = [sdpa, fast, fixed_sdpa, fixed_default]
    assert ds.elm_pair(rows, "qwen2.5-1.5b", "elm-fixed") == (fast, fixed_default)
    assert ds.elm_pair([fixed_default], "qwen2.5-1.5b", "elm-fixed") == (None, None)


def test_elm_rows_pair_only_with_a_dense_row_of_the_same_attention(ds):
    dense = _row("fast", ds.VERSION, attention="sdpa")  # "auto" resolved to SDPA on that machine
    elm = _row("elm-fixed", ds.VERSION, block_launches=8.0, step="fast", attention="triton")
    assert ds.elm_pair([dense, elm], "qwen2.5-1.5b", "elm-fixed") == (None, None)
    elm["attention"] = "sdpa"
    assert ds.elm_pair([dense, elm], "qwen2.5-1.5b", "elm-fixed") == (dense, elm)
