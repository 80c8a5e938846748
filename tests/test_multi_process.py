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


def _torchrun(tmp_path: Path, code: str) -> None:
    """Run ``code`` on 2 CPU processes (gloo); it writes its results under tmp_path."""
    script = tmp_path / "job.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29600 + os.getpid() % 1000), str(script), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]


DARWIN = """
import json, sys, torch
from elmkit.data.calibration import Calibration
from elmkit.methods import darwinlm as dl
from elmkit.models.tiny import tiny_model
from elmkit.train import dist
g = torch.Generator().manual_seed(0)
calib = Calibration(torch.randint(0, 256, (8, 12), generator=g), torch.ones(8, 12, dtype=torch.long))
torch.manual_seed(0)
m = tiny_model("qwen2", num_layers=3, hidden_size=32).eval()
cfg = dl.DarwinLMConfig(ratio=0.3, levels=5, generations=3, offspring=4, survivors=(2, 1),
                        fitness_tokens=(30, 60), train_tokens=(24, 48), train_batch_size=2, lr=1e-3)
p, _, stats = dl.plan(m, calib, cfg, folder=sys.argv[1] + "/darwin", progress=False)
json.dump({"attn": p.attn_levels, "mlp": p.mlp_levels, "history": stats["history"]},
          open(f"{sys.argv[1]}/rank{dist.current().rank}.json", "w"))
"""


@pytest.mark.slow
def test_darwinlm_search_on_two_processes_selects_as_one(tmp_path):
    _torchrun(tmp_path, DARWIN)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # every rank made the same selection
    # the same search in this (one) process: offspring scored on two ranks select the same levels
    exec_globals: dict = {}
    one = tmp_path / "one"
    one.mkdir()
    exec(compile(DARWIN.replace("sys.argv[1]", repr(str(one))), "darwin", "exec"), exec_globals)
    assert json.loads((one / "rank0.json").read_text()) == r0


GPPO = """
import json, sys, torch
from pathlib import Path
from elmkit.data import byte_tokenizer
from elmkit.data.synthetic import arithmetic_examples
from elmkit.methods import gppo
from elmkit.models.tiny import tiny_model
from elmkit.train import dist
thetas = []
cfg = gppo.GppoConfig(span=2, steps=4, group_size=2, batch_size=2, seed=0)
plan = gppo.plan(tiny_model("qwen2", seed=0, num_layers=6, hidden_size=32), byte_tokenizer(),
                 arithmetic_examples(32), cfg, progress=False, thetas=thetas,
                 ckpt_dir=Path(sys.argv[1]) / "ckpt")
out = open(f"{sys.argv[1]}/rank{dist.current().rank}.json", "w")
json.dump({"theta": list(plan.theta), "thetas": thetas}, out)
"""


@pytest.mark.slow
def test_gppo_pools_one_group_and_keeps_theta_identical(tmp_path):
    _torchrun(tmp_path, GPPO)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1 and len(r0["thetas"]) == 2  # 4 steps, groups of 2: two updates, the same everywhere
    assert any(abs(t) > 0 for t in r0["theta"])
    state = json.loads((tmp_path / "ckpt" / "step_000004" / "state.json").read_text())
    assert state["processes"] == 2 and len(state["policy_gen"]) == len(state["data_gen"]) == 2
    _torchrun(tmp_path, GPPO)  # finished: a re-run resumes at the end and returns the same theta
    assert json.loads((tmp_path / "rank0.json").read_text())["theta"] == r0["theta"]


LORA = """
import sys
from elmkit.data.synthetic import arithmetic_examples
from elmkit.train.lora import FinetuneConfig, finetune
finetune(sys.argv[1] + "/tiny", arithmetic_examples(16), sys.argv[1] + "/" + sys.argv[2],
         FinetuneConfig(max_steps=3, batch_size=4, lr=1e-3, save_every=2, dropout=0.0),
         progress=False)  # no dropout: its masks depend on how the batch is split
"""


@pytest.mark.slow
def test_lora_on_two_processes_trains_the_adapter_one_process_trains(tmp_path, tiny_dir):
    import torch
    from safetensors.torch import load_file

    assert tiny_dir == tmp_path / "tiny"  # the scripts read it there
    _torchrun(tmp_path, LORA.replace("sys.argv[2]", "'two'"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    script = tmp_path / "one.py"
    script.write_text(LORA.replace("sys.argv[2]", "'one'"))
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (load_file(str(tmp_path / k / "adapter" / "adapter_model.safetensors"))
                for k in ("one", "two"))
    assert one.keys() == two.keys() and len(one) > 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)  # summation order only
    m1, m2 = (json.loads((tmp_path / k / "metrics.json").read_text()) for k in ("one", "two"))
    assert m2["loss_curve"] == pytest.approx(m1["loss_curve"], rel=1e-5)


KEPT_LORA = """
import sys, torch
from elmkit.data import byte_tokenizer
from elmkit.data.synthetic import arithmetic_examples
from elmkit.methods import elm as E
from elmkit.models.tiny import tiny_model
from elmkit.train import dist
from elmkit.train.elm import ElmTrainConfig, SpanTeacher, train_elm
dist.current()  # made earlier by someone else (GPPO does), without DDP's unused-parameter search
dense = tiny_model("qwen2", seed=0, num_layers=4, hidden_size=32)
teacher = SpanTeacher(dense, 1, 2, own_lower=True)
elm = E.apply_(dense, E.plan(dense, start=1, span=2))
train_elm(elm, teacher, byte_tokenizer(), arithmetic_examples(16), sys.argv[1] + "/elm",
          ElmTrainConfig(steps=4, batch_size=4, max_len=64, kept_lora_r=2), progress=False)
"""


@pytest.mark.slow
def test_kept_lora_on_two_processes_while_its_upper_layers_idle(tmp_path):
    _torchrun(tmp_path, KEPT_LORA)  # lambda_ce = 0 for the first half: LoRA above the block unused
    assert (tmp_path / "elm" / "model" / "config.json").is_file()
