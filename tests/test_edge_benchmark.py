"""benchmarks/edge_gguf.py's report stage: rebuilt from the committed JSON alone (no model, no
llama.cpp), it gives the committed report, and clear errors where it cannot run."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from checks import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "edge_gguf"


@pytest.mark.skipif(not (RESULTS / "results.json").is_file(), reason="the CPU benchmark has not been run")
def test_report_from_the_committed_json_is_the_committed_report(tmp_path):
    out = tmp_path / "edge_gguf"
    shutil.copytree(RESULTS, out)
    (out / "report.md").unlink()
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nkept\n")
    run_benchmark("edge_gguf.py", "--stages", "report", "--out", str(out), "--benchmarks-md", str(md))
    assert (out / "report.md").read_text() == (RESULTS / "report.md").read_text()
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n")
    assert "<!-- edge-cpu:start -->" in text and "| llama.cpp | dense |" in text
    assert "](benchmarks/results/edge_gguf/edge_speed.png)" in text
    committed = (ROOT / "BENCHMARKS.md").read_text()
    assert text[text.index("<!-- edge-cpu:start -->"):] in committed  # BENCHMARKS.md is up to date


def test_bad_stages_and_a_missing_results_file_fail_in_one_line(tmp_path):
    script = str(ROOT / "benchmarks" / "edge_gguf.py")
    for args, want in ((["--stages", "build,bench"], "unknown --stages ['bench']"),
                       (["--stages", "report", "--out", str(tmp_path)], "results.json is missing")):
        r = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 1 and want in r.stderr and "Traceback" not in r.stderr, r.stderr
