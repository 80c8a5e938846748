"""The slim format: per-layer widths, exact slicing, save/load (also with remote code only), cache."""

import json
import os
import random

import pytest
import torch
from checks import assert_cached_equals_full, assert_loads_with_remote_code_only
from transformers import AutoModelForCausalLM

from elmkit.models import LayerKeep, count_parameters, full_keep, get_layers, to_slim
from elmkit.models.tiny import tiny_model


def _ids(B=2, T=9, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _random_keep(model, seed=0) -> list[LayerKeep]:
    """Random widths per layer; layer 1 loses its attention, layer 2 its MLP; FLAP-style biases."""
    g = random.Random(seed)
    c = model.config
    group = c.num_attention_heads // c.num_key_value_heads
    keep = []
    for i in range(c.num_hidden_layers):
        kv = sorted(g.sample(range(c.num_key_value_heads), g.randint(1, c.num_key_value_heads)))
        q = sorted(h for h in range(c.num_attention_heads) if h // group in kv and g.random() < 0.7) or \
            [kv[0] * group]
        ch = sorted(g.sample(range(c.intermediate_size), g.randint(1, c.intermediate_size)))
        k = LayerKeep(q, kv, ch, o_bias=torch.randn(c.hidden_size) * 0.1 if i % 2 else None,
                      down_bias=torch.randn(c.hidden_size) * 0.1 if i % 2 == 0 else None)
        if i == 1:
            k = LayerKeep([], [], ch)
        if i == 2:
            k = LayerKeep(q, kv, [])
        keep.append(k)
    return keep


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_keeping_everything_is_a_structural_no_op(family):
    torch.manual_seed(0)
    m = tiny_model(family, num_layers=3, hidden_size=32).eval()
    s = to_slim(m, full_keep(m))
    ids, mask = _ids(), torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        torch.testing.assert_close(s(ids, attention_mask=mask).logits, m(ids, attention_mask=mask).logits,
                                   atol=0, rtol=0)
    assert count_parameters(s) == count_parameters(m)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_removed_heads_and_channels_equal_zeroed_outputs(family):
    """Slicing heads/channels out == zeroing their o_proj/down_proj columns in the dense model."""
    torch.manual_seed(0)
    m = tiny_model(family, num_layers=4, hidden_size=32).eval()
    keep = [LayerKeep(k.q_heads, k.kv_heads, k.channels) for k in _random_keep(m, seed=3)]  # no biases
    s = to_slim(m, keep)
    c, hd = m.config, m.config.hidden_size // m.config.num_attention_heads
    with torch.no_grad():
        for layer, k in zip(get_layers(m), keep):
            gone = [h for h in range(c.num_attention_heads) if h not in k.q_heads]
            for h in gone:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            drop = [j for j in range(c.intermediate_size) if j not in k.channels]
            layer.mlp.down_proj.weight[:, drop] = 0
        ids = _ids()
        torch.testing.assert_close(s(ids).logits, m(ids).logits, atol=1e-5, rtol=0)
    # parameters: exactly the kept slices
    got = count_parameters(s)
    want = count_parameters(m)
    for k in keep:
        n_q, n_kv = len(k.q_heads), len(k.kv_heads)
        want -= (c.num_attention_heads - n_q) * 2 * hd * c.hidden_size
        want -= (c.num_key_value_heads - n_kv) * 2 * hd * c.hidden_size
        want -= (c.intermediate_size - len(k.channels)) * 3 * c.hidden_size
        if family == "qwen2":  # q/k/v biases
            want -= (c.num_attention_heads - n_q) * hd + (c.num_key_value_heads - n_kv) * 2 * hd
        if family == "qwen3" and n_q == 0:  # a removed attention branch takes its q_norm/k_norm along
            want -= 2 * hd
    assert got == want


def test_random_widths_round_trip_with_and_without_elmkit(tmp_path):
    torch.manual_seed(0)
    m = tiny_model("qwen2", num_layers=4, hidden_size=32).eval()
    s = to_slim(m, _random_keep(m))
    ids = _ids()
    with torch.no_grad():
        want = s(ids).logits
    s.save_pretrained(tmp_path / "slim")
    files = set(os.listdir(tmp_path / "slim"))
    assert {"model.safetensors", "config.json", "modeling_slim.py", "configuration_slim.py"} <= files
    cfg = json.loads((tmp_path / "slim" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_slim.SlimForCausalLM"
    assert cfg["slim_layers"][1]["q_to_kv"] == [] and cfg["slim_layers"][2]["intermediate_size"] == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, atol=0, rtol=0)

    assert_loads_with_remote_code_only(tmp_path / "slim", ids, want, tmp_path)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_with_the_cache_equals_full_forward(family):
    torch.manual_seed(0)
    m = tiny_model(family, num_layers=4, hidden_size=32).eval()
    s = to_slim(m, _random_keep(m, seed=1))
    assert_cached_equals_full(s)  # also through the layer without attention


def test_bad_keeps_give_clear_errors():
    m = tiny_model("llama", num_layers=2, hidden_size=32)
    keep = full_keep(m)
    with pytest.raises(ValueError, match="read KV heads \\[1\\], which are not kept"):
        to_slim(m, [LayerKeep([0, 3], [0], range(8)), keep[1]])
    with pytest.raises(ValueError, match="1 entries for 2 layers"):
        to_slim(m, keep[:1])
