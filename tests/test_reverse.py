"""Reverse-order pruning (Lu et al.) and partial-layer fine-tuning: the rule, the surgery, which
parameters train, tied heads, and the commands."""

import copy
import dataclasses
import json

import pytest
import torch
from checks import assert_cached_equals_full, assert_layers_consistent
from transformers import AutoModelForCausalLM

from elmkit import cli
from elmkit.data.calibration import Calibration
from elmkit.data.synthetic import arithmetic_examples
from elmkit.methods import DEPTH, reverse
from elmkit.methods.reverse import ReverseConfig, ReversePlan
from elmkit.models import count_parameters, get_layers
from elmkit.train import FinetuneConfig, finetune, set_partial_trainable_

FT = FinetuneConfig(mode="partial", partial_layers=2, lr=1e-3, min_lr=1e-4, batch_size=8,
                    max_steps=6, save_every=3, max_len=96, seed=3, device="cpu")


class Interrupt(Exception):
    pass


def _ids(B=2, T=10, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _calib():
    ids = _ids(4, 12)
    return Calibration(ids, torch.ones_like(ids))


def _alpaca(path, n=32, seed=1):
    path.write_text(json.dumps([{"instruction": e.instruction, "input": "", "output": e.output}
                                for e in arithmetic_examples(n, seed=seed)]))
    return path


# --- the rule and the surgery -----------------------------------------------------------------


@pytest.mark.parametrize("cfg, drop", [(ReverseConfig(n_remove=2), (4, 5)),
                                       (ReverseConfig(n_remove=1), (5,)),
                                       (ReverseConfig(ratio=0.5), (3, 4, 5)),
                                       (ReverseConfig(n_remove=0), ())])
def test_plan_drops_exactly_the_last_n_layers(cfg, drop, make_model):
    model = make_model("qwen2", num_layers=6)
    p = reverse.plan(model, None, cfg)
    assert p == ReversePlan(drop) and list(p.drop) == sorted(p.drop)
    assert reverse.plan(model, _calib(), cfg) == p  # calibration data plays no part


def test_apply_cuts_n_layers_and_keeps_embeddings_norm_head(make_model, tmp_path):
    model = make_model("qwen2", num_layers=6)
    dense = copy.deepcopy(model)
    per_layer = count_parameters(get_layers(model)[0])
    p0 = count_parameters(model)
    p, stats = reverse.compress_(model, _calib(), ReverseConfig(n_remove=2), progress=False)
    assert p.drop == (4, 5) and stats == {}
    assert model.config.num_hidden_layers == 4
    assert count_parameters(model) == p0 - 2 * per_layer
    assert_layers_consistent(model)
    kept = dict(model.named_parameters())
    for name, w in dense.named_parameters():  # layers 0..3, embeddings, final norm and head unchanged
        if name.startswith(("model.layers.4.", "model.layers.5.")):
            assert name not in kept
        else:
            assert torch.equal(kept[name], w), name
    assert_cached_equals_full(model)
    model.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)


@torch.no_grad()
def test_logits_equal_a_manual_run_of_the_kept_layers(family, make_model):
    model = make_model(family, num_layers=5)
    dense = copy.deepcopy(model)
    reverse.compress_(model, None, ReverseConfig(n_remove=2), progress=False)
    ids = _ids(2, 9)
    pos = torch.arange(ids.shape[1])[None]  # (1, T)
    h = dense.model.embed_tokens(ids)  # (B, T, d)
    rope = dense.model.rotary_emb(h, pos)
    for layer in dense.model.layers[:3]:  # causal attention without padding: no mask needed
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
    want = dense.lm_head(dense.model.norm(h))  # (B, T, V)
    torch.testing.assert_close(model(ids).logits, want, atol=1e-6, rtol=0)


def test_bad_targets_and_plans_say_what_to_fix(make_model):
    model = make_model("qwen2", num_layers=4)
    with pytest.raises(ValueError, match="cannot remove 4 of 4 layers"):
        reverse.plan(model, None, ReverseConfig(n_remove=4))
    with pytest.raises(ValueError, match="cannot remove 5 of 4 layers"):
        reverse.plan(model, None, ReverseConfig(n_remove=5))
    with pytest.raises(ValueError, match="--n-remove must be >= 0"):
        ReverseConfig(n_remove=-1)
    with pytest.raises(ValueError, match="exactly one of --n-remove or --ratio"):
        ReverseConfig()
    with pytest.raises(ValueError, match="--ratio must be in"):
        ReverseConfig(ratio=1.0)
    with pytest.raises(ValueError, match="not the last 2"):  # a plan made on a deeper model
        reverse.apply_(model, ReversePlan((4, 5)))
    with pytest.raises(ValueError, match="not the last 1"):
        reverse.apply_(model, ReversePlan((1,)))
    assert model.config.num_hidden_layers == 4


def test_registered_as_a_depth_method():
    spec = DEPTH["reverse"]
    assert spec.module is reverse and spec.title == "Reverse-order (Lu et al.)"
    assert spec.command and not spec.trains
    assert dataclasses.replace(spec.base, n_remove=3).n_remove == 3


# --- partial-layer fine-tuning ----------------------------------------------------------------


def test_partial_trainable_selects_norm_head_and_last_layers(make_model):
    model = make_model("llama", num_layers=5)
    names = set(set_partial_trainable_(model, 2))
    assert names == {n for n, _ in model.named_parameters()
                     if n.startswith(("model.layers.3.", "model.layers.4.", "model.norm.", "lm_head."))}
    assert any(".self_attn." in n for n in names) and any("layernorm" in n for n in names)
    assert not model.model.embed_tokens.weight.requires_grad
    assert set(set_partial_trainable_(model, 0)) == {"model.norm.weight", "lm_head.weight"}
    assert len(set_partial_trainable_(model, 5)) == sum(1 for _ in model.parameters()) - 1
    with pytest.raises(ValueError, match="--partial-layers 6 is outside 0..5"):
        set_partial_trainable_(model, 6)


def test_partial_finetune_changes_only_the_allowed_parameters(tiny_dir, tmp_path):
    data = arithmetic_examples(64, seed=1)
    m = finetune(tiny_dir, data, tmp_path / "run", FT, progress=False)
    assert m["mode"] == "partial" and m["steps"] == 6 and "lora_scale" not in m
    assert m["trained"] == {"layers": [2, 3], "final_norm": True, "lm_head": True, "embedding": False}
    assert m["final_loss"] < m["first_loss"], m["loss_curve"]
    assert not (tmp_path / "run" / "adapter").exists()
    before = AutoModelForCausalLM.from_pretrained(tiny_dir)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")  # a stock folder
    allowed = ("model.layers.2.", "model.layers.3.", "model.norm.", "lm_head.")
    changed, trainable = set(), 0
    for (name, w0), (name1, w1) in zip(before.named_parameters(), after.named_parameters()):
        assert name == name1
        if name.startswith(allowed):
            trainable += w0.numel()
            changed |= {name} if not torch.equal(w0, w1) else set()
        else:
            assert torch.equal(w0, w1), f"{name} is frozen but changed"
    assert trainable == m["trainable_params"]
    for prefix in allowed:  # every allowed part moved
        assert any(n.startswith(prefix) for n in changed), prefix
    assert _data_loss(after, data) < _data_loss(before, data) - 0.1


@torch.no_grad()
def _data_loss(model, data):
    from elmkit.data import byte_tokenizer, encode, pad_batch

    tok = byte_tokenizer()
    batch = pad_batch([encode(tok, ex, 96) for ex in data], tok.pad_token_id)
    return model.eval()(**batch).loss.item()


def test_partial_finetune_resumes_to_identical_weights(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    data = arithmetic_examples(32, seed=2)
    full = finetune(tiny_dir, data, tmp_path / "a", FT, progress=False)

    def stop_at_4(step, loss):
        if step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(tiny_dir, data, tmp_path / "b", FT, on_step=stop_at_4, progress=False)
    saved = load_file(str(tmp_path / "b/checkpoints/step_000003/weights.safetensors"))
    assert not any(k.startswith(("model.embed_tokens", "model.layers.0.", "model.layers.1."))
                   for k in saved)
    assert finetune(tiny_dir, data, tmp_path / "b", FT, progress=False)["loss_curve"] == full["loss_curve"]
    wa = load_file(str(tmp_path / "a/model/model.safetensors"))
    wb = load_file(str(tmp_path / "b/model/model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="different settings"):
        finetune(tiny_dir, data, tmp_path / "b", dataclasses.replace(FT, partial_layers=1),
                 progress=False)


def test_partial_config_and_model_checks(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="--mode"):
        FinetuneConfig(mode="qlora")
    with pytest.raises(ValueError, match="--partial-layers"):
        FinetuneConfig(partial_layers=-1)
    with pytest.raises(ValueError, match="--tied-head"):
        FinetuneConfig(tied_head="maybe")
    with pytest.raises(ValueError, match="--partial-layers 5 is outside 0..4"):  # tiny_dir has 4
        finetune(tiny_dir, arithmetic_examples(8), tmp_path / "r",
                 dataclasses.replace(FT, partial_layers=5), progress=False)


def test_lora_runs_keep_their_settings_fingerprint(tiny_dir, tmp_path):
    from elmkit.train.common import fingerprint

    cfg = FinetuneConfig(r=2, alpha=2, max_steps=1, batch_size=8, max_len=64, device="cpu")
    data = arithmetic_examples(8)
    finetune(tiny_dir, data, tmp_path / "r", cfg, progress=False)
    state = json.loads((tmp_path / "r/checkpoints/step_000001/state.json").read_text())
    before = {k: v for k, v in dataclasses.asdict(cfg).items()  # the settings before partial mode
              if k not in ("mode", "partial_layers", "tied_head")}
    old = fingerprint({"model": str(tiny_dir), "data": "<8 examples>", **before},
                      ignore=("save_every", "keep_checkpoints", "device"))
    assert state["fingerprint"] == old  # older LoRA checkpoints still resume
    finetune(tiny_dir, data, tmp_path / "r", dataclasses.replace(cfg, partial_layers=1), progress=False)


# --- tied LM head -----------------------------------------------------------------------------


@pytest.fixture
def tied_dir(tmp_path, tokenizer, make_model):
    d = tmp_path / "tied"
    model = make_model("llama", num_layers=4, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


def test_tied_head_is_refused_unless_the_user_chooses(make_model):
    model = make_model("llama", num_layers=4, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="--tied-head train .* or\\s+--tied-head freeze"):
        set_partial_trainable_(model, 2)
    freeze = set(set_partial_trainable_(model, 2, "freeze"))
    assert "model.embed_tokens.weight" not in freeze and not model.lm_head.weight.requires_grad
    assert "model.norm.weight" in freeze and any(n.startswith("model.layers.3.") for n in freeze)
    train = set(set_partial_trainable_(model, 2, "train"))
    assert train == freeze | {"model.embed_tokens.weight"}  # the shared matrix, under its first name


@pytest.mark.parametrize("tied_head", ["freeze", "train"])
def test_tied_model_fine_tunes_as_chosen_and_stays_tied(tied_head, tied_dir, tmp_path):
    data = arithmetic_examples(32, seed=1)
    cfg = dataclasses.replace(FT, max_steps=3, tied_head=tied_head)
    m = finetune(tied_dir, data, tmp_path / "run", cfg, progress=False)
    assert m["trained"]["lm_head"] is m["trained"]["embedding"] is (tied_head == "train")
    before = AutoModelForCausalLM.from_pretrained(tied_dir)
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert after.lm_head.weight is after.model.embed_tokens.weight
    same = torch.equal(before.model.embed_tokens.weight, after.model.embed_tokens.weight)
    assert same is (tied_head == "freeze")
    up = [(l0.mlp.up_proj.weight, l1.mlp.up_proj.weight)
          for l0, l1 in zip(before.model.layers, after.model.layers)]
    assert torch.equal(*up[1]) and not torch.equal(*up[3])  # layer 1 frozen, layer 3 trained


# --- the commands -----------------------------------------------------------------------------


def test_cli_compress_reverse_then_partial_finetune(tiny_dir, tmp_path, capsys):
    data = _alpaca(tmp_path / "train.json")
    rc = cli.main(["compress", "reverse", "--model", str(tiny_dir), "--data", str(data),
                   "--out", str(tmp_path / "rev"), "--n-remove", "1", "--calib.samples", "4"])
    assert rc == 0
    assert json.loads((tmp_path / "rev" / "plan.json").read_text()) == {"drop": [3]}
    m = json.loads((tmp_path / "rev" / "metrics.json").read_text())
    assert m["layers_before"] == 4 and m["layers_after"] == 3
    rc = cli.main(["finetune", "--model", str(tmp_path / "rev" / "model"), "--data", str(data),
                   "--out", str(tmp_path / "ft"), "--mode", "partial", "--partial-layers", "2",
                   "--max-steps", "2", "--batch-size", "8", "--max-len", "96", "--device", "cpu"])
    assert rc == 0
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert m["mode"] == "partial" and m["trained"]["layers"] == [1, 2]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ft" / "model").config.num_hidden_layers == 3
    rc = cli.main(["finetune", "--model", str(tiny_dir), "--data", str(data), "--out",
                   str(tmp_path / "bad"), "--mode", "partial", "--partial-layers", "9", "--max-steps", "1"])
    assert rc == 2 and "--partial-layers 9 is outside 0..4" in capsys.readouterr().err


def test_cli_options_and_help(tied_dir, tmp_path, capsys):
    ns = cli.build_parser().parse_args(["finetune", "--model", "m", "--data", "d", "--out", "o",
                                        "--mode", "partial", "--partial-layers", "1",
                                        "--tied-head", "freeze"])
    assert cli.config_from_args(FinetuneConfig, ns) == FinetuneConfig(mode="partial", partial_layers=1,
                                                                      tied_head="freeze")
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--model", "m", "--data", "d", "--out", "o", "--tied-head", "maybe"])
    capsys.readouterr()
    rc = cli.main(["finetune", "--model", str(tied_dir), "--data", str(_alpaca(tmp_path / "t.json", 8)),
                   "--out", str(tmp_path / "ft"), "--mode", "partial", "--max-steps", "1"])
    assert rc == 2 and "ties its LM head" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compress", "reverse", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "delete the last n decoder layers" in out and "--n-remove" in out and "--mode partial" in out
    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    assert "reverse" in capsys.readouterr().out
