"""The DDP path of ELM training on 2 CPU processes (gloo, through torchrun): the same loss curve as
one process on the same global batch, and a run killed after a checkpoint resumes to bitwise the
same block as an uninterrupted one (benchmarks/multi_gpu.py --cpu)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_processes_match_one_and_resume_exactly(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "multi_gpu.py"), "--cpu", "--shape", "tiny",
                        "--steps", "6", "--batch-size", "4", "--save-every", "2", "--kill-at", "4",
                        "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    one, ddp = res["runs"]["single"], res["runs"]["ddp"]
    assert (one["processes"], ddp["processes"], ddp["parallel"]) == (1, 2, "ddp")
    assert len(one["loss"]) == len(ddp["loss"]) == 6
    assert ddp["max_rel_loss_diff_vs_single"] < 1e-5  # fp32: only the summation order differs
    assert res["resume"]["bitwise_equal"] and res["resume"]["history_equal"]
    assert res["resume"]["block_tensors"] > 0
    # every rank but 0 wrote nothing: one set of files, from rank 0
    assert (tmp_path / "work" / "ddp" / "model" / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "work" / "ddp_kill" / "checkpoints").iterdir()) == \
        ["step_000002", "step_000004"]


def test_batch_must_split_over_processes(monkeypatch):
    from elmkit.train import dist
    from elmkit.train.elm import ElmTrainConfig, train_elm

    monkeypatch.setitem(dist._STATE, "dist", dist.Dist(rank=0, world=3))
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        train_elm(_Tiny(), _Tiny(), None, [], "/nonexistent/x", ElmTrainConfig(batch_size=4))


class _Tiny:
    config = type("C", (), {"start": 0, "span": 2})()
