import copy

import pytest
import torch
from checks import assert_cached_equals_full, assert_layers_consistent
from transformers import AutoModelForCausalLM

from elmkit.data.calibration import Calibration
from elmkit.methods import streamline
from elmkit.methods.streamline import StreamlineConfig, StreamlinePlan
from elmkit.models import count_parameters, get_layers, layer_inputs


def _calib(n=6, T=12, seed=0) -> Calibration:
    """Random byte sequences, right-padded to different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    for b in range(n):
        mask[b, T - b % 4:] = 0  # rows lose 0..3 tokens at the end
    ids[mask == 0] = 256
    return Calibration(ids, mask)


def _cfg(**kw):
    kw.setdefault("n_remove", 2)
    kw.setdefault("steps", 3)
    kw.setdefault("train_batch_size", 4)
    return StreamlineConfig(**kw)


@pytest.mark.parametrize("replacement", ["layer", "ffn"])
def test_compress_drops_n_layers_keeps_cache_and_save_exact(make_model, family, replacement, tmp_path):
    model = make_model(family)
    p0, per_layer = count_parameters(model), count_parameters(get_layers(model)[0])
    p, stats = streamline.compress_(model, _calib(), _cfg(replacement=replacement), train=_calib(seed=1),
                                    progress=False)
    assert p.span == 3 and len(p.scores) == 4 and p.scores[p.start] == max(p.scores)
    assert stats["steps"] == 3 and len(stats["loss_curve"]) == 3
    assert_layers_consistent(model)
    assert model.config.num_hidden_layers == 4
    assert count_parameters(model) == p0 - 2 * per_layer
    assert_cached_equals_full(model)
    ids = _calib().input_ids[:2]
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert_layers_consistent(loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, atol=0, rtol=0)


def test_planted_identity_span_is_found(make_model):
    for fam in ("qwen2", "llama"):
        model = make_model(fam)
        with torch.no_grad():
            for i in (2, 3):  # both residual branches add zero: layers 2..3 are the identity
                get_layers(model)[i].self_attn.o_proj.weight.zero_()
                get_layers(model)[i].mlp.down_proj.weight.zero_()
        p = streamline.plan(model, _calib(), StreamlineConfig(n_remove=1))
        assert p.start == 2 and p.span == 2 and len(p.scores) == 5
        assert abs(p.scores[2] - 1.0) < 1e-6
        assert all(s < p.scores[2] for j, s in enumerate(p.scores) if j != 2)


def test_plan_and_fit_are_deterministic(make_model):
    model, calib, train = make_model("qwen2"), _calib(), _calib(n=8, seed=1)
    cfg = _cfg(train_batch_size=3, steps=4)  # 8 sequences in batches of 3: the order matters
    p = streamline.plan(model, calib, cfg)
    assert streamline.plan(model, calib, cfg) == p
    a, sa = streamline.fit(model, p, train, cfg, progress=False)
    b, sb = streamline.fit(model, p, train, cfg, progress=False)
    assert sa["loss_curve"] == sb["loss_curve"]
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), n
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), get_layers(model)[p.start].parameters()))


def test_mse_training_reduces_the_loss_and_leaves_the_model_dense(make_model):
    model = make_model("llama")
    dense = copy.deepcopy(model.state_dict())
    cfg = _cfg(steps=20, lr=3e-3, min_lr=1e-3, train_batch_size=8)  # one batch: the same every step
    p = streamline.plan(model, _calib(), cfg)
    layer, stats = streamline.fit(model, p, _calib(n=8, seed=1), cfg, progress=False)
    assert stats["final_loss"] < 0.7 * stats["first_loss"]
    assert stats["loss_curve"][-1] < stats["loss_curve"][0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, dense[k]), k
    assert all(q.requires_grad for q in model.parameters())  # flags restored


def test_lm_loss_trains_only_the_replacement(make_model):
    model = make_model("qwen2")
    dense = copy.deepcopy(model)
    cfg = _cfg(loss="lm", steps=4, lr=1e-3, n_remove=1)
    p, stats = streamline.compress_(model, _calib(), cfg, train=_calib(n=8, seed=1), progress=False)
    assert stats["steps"] == 4 and all(torch.isfinite(torch.tensor(stats["loss_curve"])))
    old, new = get_layers(dense), get_layers(model)
    assert len(new) == len(old) - 1
    kept = list(range(p.start)) + list(range(p.start + p.span, len(old)))  # old indices, in order
    for i_new, i_old in zip([i for i in range(len(new)) if i != p.start], kept, strict=True):
        for x, y in zip(new[i_new].parameters(), old[i_old].parameters()):
            assert torch.equal(x, y)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(model.get_parameter(name), dense.get_parameter(name))
    assert any(not torch.equal(x, y) for x, y in zip(new[p.start].parameters(), old[p.start].parameters()))


def test_ffn_replacement_ignores_attention(make_model):
    model = make_model("qwen3")
    cfg = _cfg(replacement="ffn", steps=3, lr=1e-3)
    p = streamline.plan(model, _calib(), cfg)
    layer, _ = streamline.fit(model, p, _calib(n=8, seed=1), cfg, progress=False)
    src = get_layers(model)[p.start]
    assert torch.count_nonzero(layer.self_attn.o_proj.weight) == 0
    assert torch.equal(layer.self_attn.q_proj.weight, src.self_attn.q_proj.weight)  # frozen
    assert not torch.equal(layer.mlp.up_proj.weight, src.mlp.up_proj.weight)  # trained
    ids, mask = _calib().input_ids[:3], _calib().attention_mask[:3]
    with torch.no_grad():
        ctx = layer_inputs(model, ids, mask)
        h = torch.randn_like(ctx.hidden)
        kw = dict(position_ids=ctx.position_ids, position_embeddings=ctx.position_embeddings)
        out = layer(h, attention_mask=ctx.masks["full_attention"], **kw)
        torch.testing.assert_close(out, h + layer.mlp(layer.post_attention_layernorm(h)), atol=1e-6, rtol=0)
        layer.self_attn.q_proj.weight.normal_()  # other attention weights and no mask: same output
        assert torch.equal(layer(h, attention_mask=None, **kw), out)


def test_untrained_apply_and_n_zero(make_model):
    model = make_model("llama")
    dense = copy.deepcopy(model)
    ids = _calib().input_ids[:2]
    p, stats = streamline.compress_(model, _calib(), StreamlineConfig(n_remove=0), train=_calib(seed=1))
    assert p.span == 1 and len(p.scores) == 6 and stats == {}
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense(ids).logits)
    # steps=0: the untrained copy of layer j* replaces the span
    p, stats = streamline.compress_(model, _calib(), _cfg(steps=0), train=_calib(seed=1))
    assert stats == {} and model.config.num_hidden_layers == 4
    assert all(torch.equal(x, y) for x, y in
               zip(get_layers(model)[p.start].parameters(), get_layers(dense)[p.start].parameters()))


def test_ratio_and_bad_configs():
    model_layers = 6
    assert StreamlineConfig(ratio=0.34).count(model_layers, at_most=model_layers - 1) == 2
    with pytest.raises(ValueError, match="exactly one of --n-remove or --ratio"):
        StreamlineConfig(n_remove=1, ratio=0.2)
    with pytest.raises(ValueError, match="--steps must be >= 0"):
        StreamlineConfig(n_remove=1, steps=-1)
    with pytest.raises(ValueError, match="--min-lr"):
        StreamlineConfig(n_remove=1, lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="--replacement"):
        StreamlineConfig(n_remove=1, replacement="mlp")
    with pytest.raises(ValueError, match="--loss"):
        StreamlineConfig(n_remove=1, loss="kl")
    with pytest.raises(ValueError, match="--train-batch-size"):
        StreamlineConfig(n_remove=1, train_batch_size=0)


def test_too_many_layers_is_refused(make_model):
    model = make_model("qwen2")
    with pytest.raises(ValueError, match="cannot remove 6 of 6 layers"):
        streamline.plan(model, _calib(), StreamlineConfig(n_remove=6))
    p = streamline.plan(model, _calib(), StreamlineConfig(n_remove=5))  # one layer left
    assert p == StreamlinePlan(0, 6, p.scores) and len(p.scores) == 1
