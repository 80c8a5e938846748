"""`elmkit compress <method>` for every depth method, and `elmkit compare` end to end."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from checks import deci_logits
from transformers import AutoModelForCausalLM

from elmkit import cli
from elmkit.compare import CompareConfig, compare
from elmkit.data.calibration import CalibConfig
from elmkit.export import ExportConfig, export
from elmkit.methods import DEPTH
from elmkit.models import count_parameters, get_layers, load_model
from elmkit.testbed import TINY_PATH
from elmkit.train import FinetuneConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    assert cli.main(["testbed", "data", "--out", str(d), "--n-train", "32"]) == 0
    return d


@pytest.mark.parametrize("name", [n for n, s in DEPTH.items() if s.command])
def test_compress_command_per_method(name, data, tmp_path):
    out = tmp_path / name
    extra = ["--steps", "2", "--train-batch-size", "4"] if name == "streamline" else []
    rc = cli.main(["compress", name, "--model", "testbed:tiny", "--data", str(data / "train.json"),
                   "--out", str(out), "--n-remove", "2", "--calib.samples", "6", *extra])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    dense = load_model(TINY_PATH, dtype="float32", device="cpu")
    per_layer = count_parameters(get_layers(dense)[0])
    assert m["layers_before"] == 12 and m["layers_after"] == 10
    assert m["params_after"] == m["params_before"] - 2 * per_layer
    assert (out / "plan.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"] == f"compress {name}" and cfg["calib"]["samples"] == 6
    model = AutoModelForCausalLM.from_pretrained(out / "model")  # a stock HF folder
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 10
    assert count_parameters(model) == m["params_after"]


def test_compress_command_reports_bad_input(data, tmp_path, capsys):
    assert cli.main(["compress", "sleb", "--model", "testbed:tiny", "--data", str(data / "train.json"),
                     "--out", str(tmp_path / "a"), "--n-remove", "11"]) == 2
    assert "cannot remove 11 of 12 layers" in capsys.readouterr().err
    assert cli.main(["compress", "slm", "--model", "testbed:tiny", "--data", str(data / "train.json"),
                     "--out", str(tmp_path / "b"), "--calib.source", str(tmp_path / "missing.txt"),
                     "--n-remove", "1"]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err


def test_compare_runs_all_and_reruns_only_what_changed(tmp_path):
    cfg = CompareConfig(methods=("elm", "slm", "shortgpt", "streamline"), remove=0.25, heal="lora",
                        train_steps=2, train_batch_size=4, n_train=16, n_test=4, max_new_tokens=96,
                        eval_batch_size=4, calib=CalibConfig(samples=4),
                        lora=FinetuneConfig(max_steps=2, batch_size=4))
    res = compare("testbed:tiny", tmp_path / "c", cfg=cfg)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "elm", "slm", "shortgpt", "streamline"]
    assert res["removed"] == 3 and all(r["layers"] == 9 for m, r in rows.items() if m != "dense")
    dense_p = rows["dense"]["params"]
    per_layer = count_parameters(get_layers(load_model(TINY_PATH, dtype="float32", device="cpu"))[0])
    for m in ("slm", "shortgpt", "streamline"):
        assert rows[m]["params"] == dense_p - 3 * per_layer
    assert rows["elm"]["params"] > rows["slm"]["params"]  # the block's input projection (2d -> d)
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and r["kv_ratio"] == pytest.approx(r["layers"] / 12)
    assert rows["slm"]["heal_s"] > 0 and (tmp_path / "c" / "slm" / "heal" / "model").is_dir()
    report = (tmp_path / "c" / "report.md").read_text()
    assert "| SLM | 9 |" in report and (tmp_path / "c" / "accuracy.png").stat().st_size > 0
    assert json.loads((tmp_path / "c" / "elm" / "plan.json").read_text())["span"] == 4

    # a re-run finds every method done and reproduces the table without recomputing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*/row.json")}
    again = compare("testbed:tiny", tmp_path / "c", cfg=cfg)
    assert again["rows"] == res["rows"]
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*/row.json")}
    # a setting of one method re-runs that method only
    third = compare("testbed:tiny", tmp_path / "c", cfg=dataclasses.replace(cfg, elm_lr=5e-4))
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*/row.json")}
    assert [p.parent.name for p in after if after[p] != before[p]] == ["elm"]
    others = [r for r in third["rows"] if r["method"] != "elm"]
    assert others == [r for r in res["rows"] if r["method"] != "elm"]


def test_compare_config_and_data_errors(tmp_path, tiny_dir):
    with pytest.raises(ValueError, match="unknown --methods"):
        CompareConfig(methods=("elm,prune",))
    assert CompareConfig(methods=("elm,slm", "sleb")).methods == ("elm", "slm", "sleb")
    with pytest.raises(ValueError, match="--remove"):
        CompareConfig(remove=1.0)
    with pytest.raises(ValueError, match="--data .* are required"):
        compare(tiny_dir, tmp_path / "x", cfg=CompareConfig(methods=("shortgpt",)))
    with pytest.raises(ValueError, match="--test is required"):
        compare(tiny_dir, tmp_path / "x", data=tmp_path / "d.json", cfg=CompareConfig(methods=("shortgpt",)))


def test_compare_cli_parses_methods_and_nested_budgets():
    ns = cli.build_parser().parse_args(["compare", "--model", "m", "--out", "o", "--methods", "elm,slm",
                                        "--heal", "lora", "--lora.max-steps", "7", "--calib.samples", "9"])
    cfg = cli.config_from_args(CompareConfig, ns)
    assert cfg.methods == ("elm", "slm") and cfg.heal == "lora"
    assert cfg.lora.max_steps == 7 and cfg.lora.lr == CompareConfig().lora.lr  # default kept
    assert cfg.calib.samples == 9
    torch.manual_seed(0)


# --- width methods ------------------------------------------------------------------------------

WIDTH_CMD = {"flap": ["--ratio", "0.3"], "llm-pruner": ["--ratio", "0.5"],
             "slm-pruner": ["--slm.ratio", "0.1", "--pruner.ratio", "0.5"],
             "darwinlm": ["--ratio", "0.25", "--generations", "1", "--offspring", "2", "--survivors", "1",
                          "--fitness-tokens", "50", "--train-tokens", "40", "--train-batch-size", "2"]}


@pytest.mark.parametrize("name", list(WIDTH_CMD))
def test_compress_command_per_width_method(name, data, tmp_path):
    out = tmp_path / name
    rc = cli.main(["compress", name, "--model", "testbed:tiny", "--data", str(data / "train.json"),
                   "--out", str(out), "--calib.samples", "6", *WIDTH_CMD[name]])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0.05 < m["removed_non_embedding"] < 0.6 and m["params_after"] < m["params_before"]
    model = AutoModelForCausalLM.from_pretrained(out / "model", trust_remote_code=True)
    assert model.config.model_type == "slim" and count_parameters(model) == m["params_after"]
    assert model.config.num_hidden_layers == (11 if name == "slm-pruner" else 12)
    # the output runs in llama.cpp: exported as deci, a second implementation of that graph gives its logits
    gguf_file = export(out / "model", tmp_path / f"{name}.gguf", ExportConfig(type="f32"), progress=False)
    ids = [3, 40, 41, 200, 7, 9, 100]
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(deci_logits(Path(gguf_file["out"]), ids), want, atol=2e-4, rtol=1e-4)
    if name == "darwinlm":  # database, levels and plot beside the model; a re-run reuses them
        search = out / "search"
        assert (search / "levels.txt").is_file() and (search / "search.png").is_file()
        assert len(list((search / "database").glob("layer_*.safetensors"))) == 12


def test_compare_width_methods_hit_the_parameter_target(tmp_path):
    from elmkit.methods.darwinlm import DarwinLMConfig

    cfg = CompareConfig(methods=("flap", "llm-pruner", "slm-pruner", "ziplm", "uniform"), remove=0.25,
                        n_test=4, max_new_tokens=96, eval_batch_size=4, calib=CalibConfig(samples=8),
                        darwinlm=DarwinLMConfig(levels=11))
    assert CompareConfig(methods="width").methods == ("flap", "llm-pruner", "slm-pruner", "darwinlm", "ziplm",
                                                      "uniform")
    assert "darwinlm" in CompareConfig(methods=("all",)).methods and CompareConfig().methods[0] == "elm"
    res = compare("testbed:tiny", tmp_path / "w", cfg=cfg)
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["dense"]["removed"] == 0
    for name in cfg.methods:
        assert 0.2 < rows[name]["removed"] < 0.3, (name, rows[name]["removed"])
        assert 0 <= rows[name]["accuracy"] <= 1
    assert rows["slm-pruner"]["layers"] < 12 and rows["flap"]["layers"] == 12
    assert rows["ziplm"]["params"] == rows["uniform"]["params"]  # the same widths, other columns
    report = (tmp_path / "w" / "report.md").read_text()
    assert "| ZipLM (one-shot) | 12 |" in report and "width methods remove 25%" in report


def test_compare_heal_both_and_cosine_start(tmp_path):
    """--heal both measures each model before and after healing; elm-cosine places the block by the
    cosine criterion; KV at 4K is the cache of 4,096 tokens in 16-bit."""
    cfg = CompareConfig(methods=("elm-cosine", "shortgpt"), remove=0.25, heal="both",
                        train_steps=2, train_batch_size=4, n_train=16, n_test=4, max_new_tokens=96,
                        eval_batch_size=4, calib=CalibConfig(samples=4),
                        lora=FinetuneConfig(max_steps=2, batch_size=4))
    res = compare("testbed:tiny", tmp_path / "c", cfg=cfg)
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == ["dense", "elm-cosine", "shortgpt"]
    dense = load_model(TINY_PATH, dtype="float32", device="cpu")
    c = dense.config
    head_dim = c.hidden_size // c.num_attention_heads
    assert rows["dense"]["kv_bytes_4k"] == 12 * 2 * c.num_key_value_heads * head_dim * 4096 * 2
    for m in ("elm-cosine", "shortgpt"):
        assert 0 <= rows[m]["healed_accuracy"] <= 1 and rows[m]["heal_s"] > 0
        assert rows[m]["kv_bytes_4k"] == rows["dense"]["kv_bytes_4k"] * 9 // 12
    assert "healed_accuracy" not in rows["dense"]
    cos = json.loads((tmp_path / "c" / "elm-cosine" / "cosine.json").read_text())
    assert len(cos["similarity"]) == 12 - 4 + 1
    assert cos["start"] == max(range(9), key=lambda a: cos["similarity"][a])
    assert json.loads((tmp_path / "c" / "elm-cosine" / "plan.json").read_text())["start"] == cos["start"]
    report = (tmp_path / "c" / "report.md").read_text()
    assert "healed accuracy" in report and "| ELM (cosine start) | 9 |" in report


def test_cosine_start_finds_an_identity_span(make_model):
    """Layers whose attention and MLP outputs are zero pass the state through: cosine 1 there."""
    import torch

    from elmkit.data.calibration import Calibration
    from elmkit.methods import elm as E

    model = make_model("qwen2", num_layers=6)
    with torch.no_grad():
        for layer in get_layers(model)[3:5]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    ids = torch.randint(1, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    calib = Calibration(ids, torch.ones_like(ids))
    start, sims = E.cosine_start(model, calib, 2)
    assert start == 3 and sims[3] == pytest.approx(1.0) and len(sims) == 5
    with pytest.raises(ValueError, match="span M = 6"):
        E.cosine_start(model, calib, 6)
