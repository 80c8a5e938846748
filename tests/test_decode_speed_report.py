"""benchmarks/decode_speed.py's report, rebuilt on a CPU from the committed JSON: it is the committed
report, its table holds one run's rows (an older version's rows are counted, not mixed in), and the
greedy check is stated per shape."""

import shutil
from pathlib import Path

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


def test_one_runs_rows_and_the_greedy_check(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is not a package
    import decode_speed as ds

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
    assert "2 rows measured by an earlier version" in md
    assert "123.0" not in md  # the older fast-ops row is not in the table
    assert md.count("| qwen2.5-1.5b |") == 3
    assert "qwen2.5-1.5b: 1 of 2 fast rows give model.generate's first 32 greedy tokens" in md
    assert "positions 7 (fast-math)" in md
    assert "fast / hf-eager = 10.0x" in md
