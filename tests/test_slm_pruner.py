"""SLM + LLM-Pruner (depth + width): layer and parameter bookkeeping of the two plans, the slim model
it leaves (save/load, cache), determinism, the merged model's layer range, config errors."""

import copy

import pytest
import torch
from checks import assert_cached_equals_full, assert_layers_consistent
from transformers import AutoModelForCausalLM

from elmkit.data.calibration import Calibration
from elmkit.methods import slm_pruner as sp
from elmkit.methods.llm_pruner import LLMPrunerConfig
from elmkit.methods.slm import SLMConfig
from elmkit.models import count_parameters, get_layers
from elmkit.models.tiny import tiny_model


def _calib(n=6, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, T), generator=g)
    return Calibration(ids, torch.ones(n, T, dtype=torch.long))


def _model(family="qwen2", layers=8):
    return tiny_model(family, seed=0, num_layers=layers, hidden_size=32).eval()


def _cfg(k=2, ratio=0.5, layer_start=1, layer_end=None):
    pruner = LLMPrunerConfig(ratio=ratio, layer_start=layer_start, layer_end=layer_end)
    return sp.SLMPrunerConfig(slm=SLMConfig(n_remove=k, bisect_steps=6), pruner=pruner)


def _predicted_parameters(dense, p: sp.SLMPrunerPlan) -> int:
    """Dense count, minus the layers SLM merges away, minus what LLM-Pruner cuts per merged layer."""
    c = dense.config
    d, hd = c.hidden_size, c.hidden_size // c.num_attention_heads
    qkv_bias = int(c.model_type == "qwen2")  # Qwen2's q/k/v projections carry biases
    per_q = 2 * hd * d + qkv_bias * hd  # q rows (+ bias) and o_proj columns of one query head
    per_kv = 2 * (hd * d + qkv_bias * hd)  # k and v rows (+ biases) of one KV head
    per_channel = 3 * d  # gate and up rows, down column
    merged_away = sum(hi - lo for lo, hi in p.slm.merges)
    total = count_parameters(dense) - merged_away * count_parameters(get_layers(dense)[0])
    for keep in p.pruner.layers:
        total -= (c.num_attention_heads - len(keep["q_heads"])) * per_q
        total -= (c.num_key_value_heads - len(keep["kv_heads"])) * per_kv
        total -= (c.intermediate_size - len(keep["channels"])) * per_channel
    return total


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_layers_and_parameters_drop_as_planned(family, tmp_path):
    dense = _model(family)
    calib, cfg = _calib(), _cfg(k=2)
    p = sp.plan(dense, calib, cfg)
    assert dense.config.num_hidden_layers == 8 and p.n_layers == 8  # plan works on a copy
    assert sum(hi - lo for lo, hi in p.slm.merges) == 2
    assert len(p.pruner.layers) == 6

    s = sp.apply_(copy.deepcopy(dense), p)
    assert type(s).__name__ == "SlimForCausalLM" and s.config.model_type == "slim"
    assert s.config.num_hidden_layers == len(get_layers(s)) == 6
    assert_layers_consistent(s)
    want = _predicted_parameters(dense, p)
    assert count_parameters(s) == want
    assert want < count_parameters(dense) - 2 * count_parameters(get_layers(dense)[0])  # width cut too

    assert_cached_equals_full(s)
    ids = calib.input_ids[:2]
    s.save_pretrained(tmp_path / "s")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, s(ids).logits, atol=0, rtol=0)


def test_plan_is_deterministic_and_compress_matches_plan_then_apply():
    dense, calib, cfg = _model("qwen2"), _calib(), _cfg(k=2)
    p = sp.plan(dense, calib, cfg)
    assert p == sp.plan(dense, calib, cfg)
    s_ref = sp.apply_(copy.deepcopy(dense), p)

    work = copy.deepcopy(dense)
    s, p2, stats = sp.compress_(work, calib, cfg, progress=False)
    assert p2 == p
    assert work.config.num_hidden_layers == 6  # compress_ leaves its input merged (documented)
    assert stats["dense_layers"] == 8 and stats["merged_layers"] == 6
    ids = calib.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(s(ids).logits, s_ref(ids).logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="already been applied"):  # merging twice would be wrong
        sp.apply_(work, p)


def test_default_pruned_range_ends_two_before_the_merged_models_end():
    dense = _model("llama", layers=8)
    p = sp.plan(dense, _calib(), sp.SLMPrunerConfig(slm=SLMConfig(ratio=0.125, bisect_steps=6)))
    # SLM: 1 of 8 layers; LLM-Pruner's default [4, N' - 2) uses the merged N' = 7, not the dense 8
    assert len(p.pruner.layers) == 7
    assert [i for i, s in enumerate(p.pruner.attn_scores) if s is not None] == [4]
    assert [i for i, s in enumerate(p.pruner.mlp_scores) if s is not None] == [4]


def test_defaults_and_bad_configs():
    cfg = sp.SLMPrunerConfig()
    assert cfg.slm.ratio == 0.125 and cfg.pruner.ratio == 0.2 and cfg.pruner.layer_end is None
    with pytest.raises(ValueError, match="must be an SLMConfig"):
        sp.SLMPrunerConfig(slm={"ratio": 0.125})
    with pytest.raises(ValueError, match="must be an LLMPrunerConfig"):
        sp.SLMPrunerConfig(pruner=SLMConfig(ratio=0.1))
    with pytest.raises(ValueError, match="--n-remove"):  # SLM needs a target or a threshold
        sp.SLMPrunerConfig(slm=SLMConfig())
    dense = _model("qwen2")
    # layer_end 8 fits the dense model but not the 6 layers left after merging: refused before the sweep
    with pytest.raises(ValueError, match=r"layers \[1, 8\) are not inside the 6 layers left after SLM"):
        sp.plan(dense, _calib(), _cfg(k=2, layer_end=8))
    with pytest.raises(ValueError, match="cannot remove 7 of 8 layers"):
        sp.plan(dense, _calib(), _cfg(k=7))
