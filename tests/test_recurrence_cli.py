"""`elmkit recurrence`: the CLI face of compress_recurrence (retrofitted recurrence + its training)."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import elmkit
from elmkit import RecurrenceCompressConfig, cli
from elmkit.io import read_json
from elmkit.models import load_model
from elmkit.train.recurrence import RecurrenceTrainConfig


class Stop(BaseException):
    """Stands for a killed process."""


def _texts(tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"{a} plus {b} makes {a + b}. " * 4}) + "\n"
                            for a in range(8) for b in range(2)))
    return data


def _error(capsys) -> str:
    """The command's one error line; the rest of stderr is progress bars, never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1, err
    return lines[0]


def test_help_lists_the_command_and_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "recurrence" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["recurrence", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(RecurrenceCompressConfig):  # the layout's fields are inherited
        if f.name != "train":
            assert "--" + f.name.replace("_", "-") in out, f.name
    for f in dataclasses.fields(RecurrenceTrainConfig):
        assert "--train." + f.name.replace("_", "-") in out, f.name
    assert "r_bar: core iterations at eval, and the mean depth drawn in training." in out
    assert "Retrofit recurrence into a dense model" in out  # the function's docstring
    with pytest.raises(SystemExit) as e:
        cli.main(["compress", "recurrence", "--help"])
    assert e.value.code == 0


def test_cli_builds_the_same_config_as_python():
    ns = cli.build_parser().parse_args([
        "recurrence", "--model", "m", "--data", "d", "--out", "o", "--n-remove", "3", "--core-len", "2",
        "--budget", "compute", "--train.steps", "5", "--train.curriculum", "1-sqrt"])
    assert cli.config_from_args(RecurrenceCompressConfig, ns) == RecurrenceCompressConfig(
        n_remove=3, core_len=2, budget="compute",
        train=RecurrenceTrainConfig(steps=5, curriculum="1-sqrt"))


def test_command_writes_the_planned_model_and_a_repeat_does_not_retrain(tmp_path, capsys):
    assert cli.main(["testbed", "data", "--out", str(tmp_path / "d"), "--n-train", "40"]) == 0
    cmd = ["recurrence", "--model", "testbed:tiny", "--data", str(tmp_path / "d" / "train.json"),
           "--out", str(tmp_path / "r"), "--n-remove", "3", "--core-len", "2", "--mean-recurrence", "2",
           "--train.steps", "3", "--train.batch-size", "4"]
    assert cli.main(cmd) == 0
    run = tmp_path / "r"
    plan = read_json(run / "plan.json")  # 3 of 12 layers deleted where ELM's span would lie
    assert (plan["prelude"], plan["deleted"], plan["core"]) == ([0, 1, 2, 3], [4, 5, 6], [7, 8])
    assert plan["coda"] == [9, 10, 11] and plan["layer_evals"] == 4 + 2 * 2 + 3
    m = read_json(run / "metrics.json")
    assert m["steps"] == 3 and m["dense_layers"] == 12 and m["recurrent_layers"] == 9
    assert m["params_recurrent"] == plan["params_after"]
    assert read_json(run / "config.json")["command"] == "recurrence"
    assert (run / "history.json").is_file() and (run / "loss.png").is_file()
    ids = torch.tensor([[5, 17, 40, 3, 9]])
    logits = []
    for model in (load_model(run / "model", dtype="float32", device="cpu"),
                  AutoModelForCausalLM.from_pretrained(run / "model").eval()):
        assert model.config.model_type == "recurrent" and model.config.mean_recurrence == 2
        assert model.config.num_hidden_layers == len(model.model.layers) == 9
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(*logits)

    weights = run / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(cmd + ["--train.save-every", "50"]) == 0  # how often it saves changes nothing
    assert "not training it again" in capsys.readouterr().err
    assert weights.stat().st_mtime_ns == stamp and read_json(run / "metrics.json") == m


def test_interrupted_run_resumes_from_its_checkpoint(tiny_dir, tmp_path, monkeypatch):
    """Killed after the step-2 checkpoint, the repeated command trains steps 3-4 only and ends where
    the same run through the Python API ends."""
    import elmkit.train.recurrence as T

    data = _texts(tmp_path)
    cfg = RecurrenceCompressConfig(prelude=1, core_start=2, core_len=1, coda=1, mean_recurrence=2,
                                   train=RecurrenceTrainConfig(steps=4, batch_size=2, max_len=32,
                                                               lr=1e-3, save_every=2))
    elmkit.compress(tiny_dir, data, tmp_path / "a", "recurrence", cfg)
    cmd = ["recurrence", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "b"),
           "--prelude", "1", "--core-start", "2", "--core-len", "1", "--coda", "1",
           "--mean-recurrence", "2", "--train.steps", "4", "--train.batch-size", "2",
           "--train.max-len", "32", "--train.lr", "1e-3", "--train.save-every", "2"]
    save = T.save_checkpoint

    def save_then_die(*args, **kw):
        save(*args, **kw)
        raise Stop

    monkeypatch.setattr(T, "save_checkpoint", save_then_die)
    with pytest.raises(Stop):
        cli.main(cmd)
    assert not (tmp_path / "b" / "model").exists()
    monkeypatch.setattr(T, "save_checkpoint", save)
    calls = []
    loss = T.recurrent_loss
    monkeypatch.setattr(T, "recurrent_loss", lambda *a, **kw: calls.append(1) or loss(*a, **kw))
    assert cli.main(cmd) == 0
    assert len(calls) == 2  # steps 3 and 4: resumed, not restarted
    assert read_json(tmp_path / "a" / "history.json") == read_json(tmp_path / "b" / "history.json")
    wa = load_file(str(tmp_path / "a" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_json(tmp_path / "b" / "plan.json")["deleted"] == [1]
    assert load_model(tmp_path / "b" / "model", device="cpu").config.num_hidden_layers == 3


def test_bad_values_end_in_one_clear_error(tiny_dir, tmp_path, capsys):
    data = _texts(tmp_path)
    base = ["recurrence", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "r"),
            "--train.steps", "1", "--train.max-len", "32"]
    for extra, message in (
        (["--mean-recurrence", "0"], "--mean-recurrence (r_bar) must be >= 1, got 0"),
        (["--train.steps", "0"], "--steps, --batch-size and --save-every must be >= 1"),
        (["--n-remove", "1", "--core-start", "2"], "--n-remove places the prelude and the core itself"),
        (["--prelude", "2", "--core-len", "4"], "the core [2, 6) goes beyond the 4 layers"),
        (["--prelude", "1", "--core-len", "2", "--coda", "2"], "--coda 2 does not match the layout"),
        (["--n-remove", "4", "--core-len", "1"], "cannot delete 4 of 4 layers"),
    ):
        assert cli.main(base + extra) == 2, extra
        line = _error(capsys)
        assert line.startswith("elmkit recurrence: error: ") and message in line, (extra, line)
    with pytest.raises(SystemExit) as e:  # argparse's own check of a choice
        cli.main(base + ["--budget", "flops"])
    assert e.value.code == 2 and "invalid choice: 'flops'" in capsys.readouterr().err
    assert cli.main(base + ["--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in _error(capsys)
    with pytest.raises(ValueError, match="takes a RecurrenceCompressConfig"):
        elmkit.compress_recurrence(tiny_dir, data, tmp_path / "r", RecurrenceTrainConfig())


def test_python_m_elmkit_exits_with_the_error_status(tmp_path):
    """A real process: the exit status is non-zero and stderr is the one line, no traceback."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "elmkit", "recurrence", "--model", "testbed:tiny",
                        "--data", "x", "--out", str(tmp_path / "r"), "--mean-recurrence", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip() == "elmkit recurrence: error: --mean-recurrence (r_bar) must be >= 1, got 0"
