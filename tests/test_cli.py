import json
import sys
import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from elmkit import cli
from elmkit.data.synthetic import arithmetic_examples
from elmkit.eval import EvalConfig
from elmkit.train import FinetuneConfig


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("demo", "info", "finetune", "eval", "remove-layers", "elm", "search", "testbed"):
        assert name in out


def test_options_mirror_config_fields_with_their_docs(capsys):
    import dataclasses

    for command, cls in (("finetune", FinetuneConfig), ("eval", EvalConfig)):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in out, f.name
    assert "Optimizer steps; overrides epochs." in " ".join(
        cli.build_parser()._subparsers._group_actions[0].choices["finetune"].format_help().split())


def test_cli_builds_the_same_config_as_python():
    p = cli.build_parser()
    ns = p.parse_args(["finetune", "--model", "m", "--data", "d", "--out", "o", "--r", "8",
                       "--max-steps", "100", "--target-modules", "q_proj", "v_proj",
                       "--system", "none"])
    cfg = cli.config_from_args(FinetuneConfig, ns)
    assert cfg == FinetuneConfig(r=8, max_steps=100, target_modules=("q_proj", "v_proj"))


def test_eval_and_remove_layers_from_the_command_line(tiny_dir, tmp_path, capsys):
    data = tmp_path / "test.json"
    data.write_text(json.dumps([
        {"instruction": e.instruction, "input": "", "output": e.output}
        for e in arithmetic_examples(3, seed=7)]))
    rc = cli.main(["eval", "--model", str(tiny_dir), "--data", str(data), "--out",
                   str(tmp_path / "ev"), "--max-new-tokens", "4", "--device", "cpu"])
    assert rc == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 3
    rc = cli.main(["remove-layers", "--model", str(tiny_dir), "--layers", "1,2",
                   "--out", str(tmp_path / "rm")])
    assert rc == 0
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "rm" / "model")
    assert m.config.num_hidden_layers == 2
    assert json.loads((tmp_path / "rm" / "metrics.json").read_text())["layers_after"] == 2
    rc = cli.main(["info", "--model", str(tmp_path / "rm" / "model")])
    assert rc == 0 and '"num_hidden_layers": 2' in capsys.readouterr().out


def test_bad_inputs_end_in_one_clear_error(tmp_path, capsys):
    rc = cli.main(["info", "--model", str(tmp_path / "missing")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err

    (tmp_path / "empty").mkdir()
    assert cli.main(["info", "--model", str(tmp_path / "empty")]) == 2
    assert "no config.json" in capsys.readouterr().err

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert cli.main(["info", "--model", str(tmp_path / "broken")]) == 2
    assert "malformed JSON" in capsys.readouterr().err

    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert cli.main(["info", "--model", str(tmp_path / "gpt2")]) == 2
    err = capsys.readouterr().err
    assert "'gpt2' is not supported" in err and "qwen2" in err

    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "x", "--data", "y", "--out", "z", "--task", "chess"])


def test_bad_data_file_is_reported_by_the_command(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a"}]')
    rc = cli.main(["finetune", "--model", str(tiny_dir), "--data", str(bad), "--out",
                   str(tmp_path / "ft"), "--max-steps", "1"])
    assert rc == 2
    assert "record 0: missing field 'output'" in capsys.readouterr().err


def test_remove_layers_rejects_bad_indices(tiny_dir, tmp_path, capsys):
    assert cli.main(["remove-layers", "--model", str(tiny_dir), "--layers", "1,x",
                     "--out", str(tmp_path / "r")]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert cli.main(["remove-layers", "--model", str(tiny_dir), "--layers", "9",
                     "--out", str(tmp_path / "r")]) == 2
    assert "layers 0..3" in capsys.readouterr().err
    torch.manual_seed(0)


def test_elm_command_compresses_trains_and_saves(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert cli.main(["testbed", "data", "--out", str(tmp_path / "d"), "--n-train", "40"]) == 0
    rc = cli.main(["elm", "--model", "testbed:tiny", "--data", str(tmp_path / "d" / "train.json"),
                   "--out", str(tmp_path / "elm"), "--span", "3", "--start", "4",
                   "--train.steps", "3", "--train.batch-size", "4", "--solver", "anderson"])
    assert rc == 0
    m = json.loads((tmp_path / "elm" / "metrics.json").read_text())
    assert m["dense_layers"] == 12 and m["elm_layers"] == 10 and m["steps"] == 3
    assert json.loads((tmp_path / "elm" / "config.json").read_text())["command"] == "elm"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "elm" / "model")
    assert model.config.model_type == "elm" and model.config.solver == "anderson"
    assert cli.main(["elm", "--model", "testbed:tiny", "--data", str(tmp_path / "d" / "train.json"),
                     "--out", str(tmp_path / "bad"), "--span", "12"]) == 2
    assert "must be smaller than the 12" in capsys.readouterr().err


def test_search_command_writes_policy_history_and_report(tmp_path):
    assert cli.main(["testbed", "data", "--out", str(tmp_path / "d"), "--n-train", "40"]) == 0
    rc = cli.main(["search", "--model", "testbed:tiny", "--data", str(tmp_path / "d" / "train.json"),
                   "--out", str(tmp_path / "s"), "--steps", "8", "--group-size", "4",
                   "--batch-size", "2"])
    assert rc == 0
    g = json.loads((tmp_path / "s" / "gppo.json").read_text())
    assert len(g["theta"]) == 12 - 3 + 1 and len(g["theta_history"]) == 2
    assert g["start"] == max(range(10), key=lambda i: g["theta"][i])
    assert sum(c["samples"] for c in g["candidates"].values()) == 8
    assert abs(sum(g["pi"]) - 1) < 1e-5
    assert (tmp_path / "s" / "pi.png").is_file() and "Chosen start layer" in (
        tmp_path / "s" / "report.md").read_text()


def test_compress_elm_with_start_auto_runs_gppo_first(tmp_path, capsys):
    assert cli.main(["testbed", "data", "--out", str(tmp_path / "d"), "--n-train", "40"]) == 0
    rc = cli.main(["compress", "elm", "--model", "testbed:tiny",
                   "--data", str(tmp_path / "d" / "train.json"), "--out", str(tmp_path / "c"),
                   "--start", "auto", "--search-steps", "8", "--train.steps", "2",
                   "--train.batch-size", "4"])
    assert rc == 0
    g = json.loads((tmp_path / "c" / "gppo.json").read_text())
    plan = json.loads((tmp_path / "c" / "plan.json").read_text())
    assert plan["start"] == g["start"] == max(range(10), key=lambda i: g["theta"][i])
    with pytest.raises(SystemExit):  # argparse: not a compress sub-command
        cli.main(["compress", "prune", "--model", "testbed:tiny", "--data", "x",
                  "--out", str(tmp_path / "e")])
    assert "invalid choice: 'prune'" in capsys.readouterr().err
    from elmkit import compress

    with pytest.raises(ValueError, match="unknown --method 'prune'"):
        compress("testbed:tiny", "x", tmp_path / "e", method="prune")
    assert cli.main(["elm", "--model", "testbed:tiny", "--data", "x", "--out", str(tmp_path / "f"),
                     "--start", "middle"]) == 2
    assert "--start must be a layer index or 'auto'" in capsys.readouterr().err


def test_cli_hides_third_party_deprecations_but_not_ours(monkeypatch):
    monkeypatch.setattr(sys, "warnoptions", [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli.quiet_third_party()
        for module in ("transformers.utils.deprecation", "peft.tuners", "torch.jit._script", "elmkit.api"):
            warnings.warn_explicit(f"from {module}", FutureWarning, "x.py", 1, module=module)
        warnings.warn_explicit("a real problem", UserWarning, "x.py", 1, module="transformers.x")
    assert [str(w.message) for w in seen] == ["from elmkit.api", "a real problem"]
    monkeypatch.setattr(sys, "warnoptions", ["default"])  # -W / PYTHONWARNINGS: the user decides
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cli.quiet_third_party()
        warnings.warn_explicit("shown", FutureWarning, "x.py", 1, module="transformers.x")
    assert len(seen) == 1


def test_plain_text_data_trains_an_elm_with_gppo_and_a_lora(tmp_path):
    """`--data` may be plain-text JSONL for the trainers (every token a target): GPPO's search, the
    block's SJFB training and the LoRA fine-tune; evaluation still asks for instruction data."""
    from elmkit.io import read_json

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"{a} plus {b} makes {a + b}. " * 4}) + "\n"
                            for a in range(8) for b in range(2)))
    assert cli.main(["elm", "--model", "testbed:tiny", "--data", str(data), "--out", str(tmp_path / "elm"),
                     "--start", "auto", "--search-steps", "2", "--train.steps", "2",
                     "--train.batch-size", "2", "--train.max-len", "32", "--train.distill-loss",
                     "relative"]) == 0
    m = read_json(tmp_path / "elm" / "metrics.json")
    assert m["steps"] == 2 and (tmp_path / "elm" / "gppo.json").is_file()
    assert (tmp_path / "elm" / "model" / "config.json").is_file()
    assert cli.main(["finetune", "--model", "testbed:tiny", "--data", str(data), "--out",
                     str(tmp_path / "lora"), "--max-steps", "2", "--batch-size", "2", "--max-len", "32"]) == 0
    assert read_json(tmp_path / "lora" / "metrics.json")["steps"] == 2
    ev = ["eval", "--model", "testbed:tiny", "--data", str(data), "--out", str(tmp_path / "ev")]
    assert cli.main(ev) == 2


def test_a_line_that_is_not_utf8_names_its_file_and_line(tiny_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(b'{"text": "fine"}\n{"text": "caf\xc5"}\n')
    rc = cli.main(["finetune", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                   "--max-steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{data}, line 2: not UTF-8 text (byte 0xc5 at column 14)" in err
    assert "Traceback" not in err


def test_compress_refuses_to_remove_nothing(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    rc = cli.main(["compress", "shortgpt", "--model", str(tiny_dir), "--data", "x", "--out", str(out),
                   "--n-remove", "0"])
    assert rc == 2 and "--n-remove 0 removes nothing" in capsys.readouterr().err
    assert not (out / "model").exists()
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i} of some plain text"}) + "\n" for i in range(8)))
    rc = cli.main(["compress", "shortgpt", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
                   "--ratio", "0.01", "--calib.samples", "4"])
    assert rc == 2 and "rounds to 0 layers" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_unless_the_traceback_is_asked_for(monkeypatch, capsys):
    import elmkit

    def broken(model):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(elmkit, "info", broken)
    monkeypatch.delenv("ELMKIT_TRACEBACK", raising=False)
    assert cli.main(["info", "--model", "testbed:tiny"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("elmkit info: error: RuntimeError: disk on fire")
    assert "Traceback" not in err
    monkeypatch.setenv("ELMKIT_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["info", "--model", "testbed:tiny"])
