"""FLAP: statistics, the global threshold, bias compensation, and the slim model it leaves."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from elmkit.data.calibration import Calibration
from elmkit.methods import flap
from elmkit.models import count_parameters, get_layers
from elmkit.models.tiny import tiny_model


def _calib(n=8, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[-1, T // 2:] = 0
    return Calibration(ids, mask)


def _nonembed(model):
    return sum(count_parameters(l.self_attn) + count_parameters(l.mlp) for l in get_layers(model))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_flap_removes_about_the_ratio_and_runs(family, tmp_path):
    torch.manual_seed(0)
    m = tiny_model(family, num_layers=4, hidden_size=32).eval()
    calib = _calib()
    p = flap.plan(m, calib, flap.FLAPConfig(ratio=0.3))
    assert p == flap.plan(m, calib, flap.FLAPConfig(ratio=0.3))  # deterministic
    assert 0.25 <= p.removed_fraction <= 0.35
    s = flap.apply_(m, p)
    assert _nonembed(s) < _nonembed(m)
    ids = calib.input_ids[:2]
    with torch.no_grad():
        seq = s.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
        assert seq.shape[1] == 9
        s.save_pretrained(tmp_path / "f")
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "f")
        torch.testing.assert_close(back(ids).logits, s(ids).logits, atol=0, rtol=0)


def test_bias_compensation_lowers_the_reconstruction_error():
    torch.manual_seed(0)
    m = tiny_model("llama", num_layers=2, hidden_size=32).eval()
    calib = _calib(n=16)
    stats = flap.channel_stats(m, calib)
    down = get_layers(m)[0].mlp.down_proj
    xs = []
    h = down.register_forward_pre_hook(lambda mod, a: xs.append(a[0][calib.attention_mask.bool()]))
    with torch.no_grad():
        m(calib.input_ids, attention_mask=calib.attention_mask)
    h.remove()
    x = xs[0].double()  # (tokens, m)
    w = down.weight.double()
    removed = list(range(0, w.shape[1], 2))
    kept = [j for j in range(w.shape[1]) if j not in removed]
    full = x @ w.T
    no_comp = x[:, kept] @ w[:, kept].T
    b = flap.compensation(down.weight, stats[0]["mlp"][0], removed).double()
    err_no, err_b = (full - no_comp).pow(2).sum(), (full - no_comp - b).pow(2).sum()
    assert err_b < err_no
    # and it is the best constant: the mean residual
    torch.testing.assert_close(b, (full - no_comp).mean(0), atol=1e-6, rtol=1e-6)


def test_a_layer_losing_all_heads_keeps_its_constant_bias():
    torch.manual_seed(0)
    m = tiny_model("qwen2", num_layers=2, hidden_size=32).eval()
    p = flap.plan(m, _calib(), flap.FLAPConfig(ratio=0.2))
    layers = list(copy.deepcopy(p.layers))
    layers[0] = {"q_heads": [], "kv_heads": [], "channels": layers[0]["channels"]}
    s = flap.apply_(m, flap.FLAPPlan(tuple(layers), p.attn_mean, p.mlp_mean, p.removed_fraction))
    bias = get_layers(s)[0].self_attn.bias
    assert bias is not None and bias.abs().sum() > 0
    with torch.no_grad():
        s(_calib().input_ids[:1], use_cache=True)


def test_bad_config():
    with pytest.raises(ValueError, match="--ratio"):
        flap.FLAPConfig(ratio=1.0)
