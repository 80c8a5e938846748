"""LLM-Pruner: dependency groups, Taylor importance, protected layers, the slim model it leaves."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from elmkit.data.calibration import Calibration
from elmkit.methods import llm_pruner as lp
from elmkit.models import count_parameters, get_layers
from elmkit.models.tiny import tiny_model


def _calib(n=6, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, T), generator=g)
    return Calibration(ids, torch.ones(n, T, dtype=torch.long))


def _model(family="qwen2", layers=4):
    torch.manual_seed(0)
    return tiny_model(family, num_layers=layers, hidden_size=32).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_dead_groups_are_pruned_first(family):
    m = _model(family)
    c = m.config
    hd, group = c.hidden_size // c.num_attention_heads, c.num_attention_heads // c.num_key_value_heads
    layer = get_layers(m)[1]
    with torch.no_grad():  # KV head 1 and its query heads, and MLP channel 5, contribute nothing
        layer.self_attn.k_proj.weight[hd:2 * hd] = 0
        layer.self_attn.v_proj.weight[hd:2 * hd] = 0
        for h in range(group, 2 * group):
            layer.self_attn.q_proj.weight[h * hd:(h + 1) * hd] = 0
            layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            if lin.bias is not None:
                lin.bias.zero_()
        layer.mlp.gate_proj.weight[5] = 0
        layer.mlp.up_proj.weight[5] = 0
        layer.mlp.down_proj.weight[:, 5] = 0
    cfg = lp.LLMPrunerConfig(ratio=0.5, layer_start=1, layer_end=3)
    p = lp.plan(m, _calib(), cfg)
    assert p.attn_scores[1][1] == 0.0 and p.mlp_scores[1][5] == 0.0
    assert p.layers[1]["kv_heads"] == [0] and 5 not in p.layers[1]["channels"]
    assert p.attn_scores[0] is None and p.layers[0]["channels"] == list(range(c.intermediate_size))
    assert p == lp.plan(m, _calib(), cfg)  # deterministic


def test_parameters_drop_as_planned_and_the_model_runs(tmp_path):
    m = _model("llama", layers=6)
    c = m.config
    with pytest.raises(ValueError, match=r"pruned layers \[4, 4\)"):  # the default range is empty here
        lp.plan(m, _calib(), lp.LLMPrunerConfig(ratio=0.5))
    p = lp.plan(m, _calib(), lp.LLMPrunerConfig(ratio=0.5, layer_start=1, layer_end=5))
    s = lp.apply_(m, p)
    hd = c.hidden_size // c.num_attention_heads
    per_kv_group = 2 * hd * c.hidden_size * (c.num_attention_heads // c.num_key_value_heads) \
        + 2 * hd * c.hidden_size
    per_channel = 3 * c.hidden_size
    want = count_parameters(m) - 4 * (1 * per_kv_group + (c.intermediate_size // 2) * per_channel)
    assert count_parameters(s) == want
    ids = _calib().input_ids[:2]
    with torch.no_grad():
        assert s.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape[1] == 7
        s.save_pretrained(tmp_path / "p")
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "p")(ids).logits,
                                   s(ids).logits, atol=0, rtol=0)


def test_bad_config():
    with pytest.raises(ValueError, match="--ratio"):
        lp.LLMPrunerConfig(ratio=1.5)
    with pytest.raises(ValueError, match="--layer-end"):
        lp.LLMPrunerConfig(layer_start=3, layer_end=2)
