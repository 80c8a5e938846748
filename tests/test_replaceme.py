import pytest
import torch
from checks import assert_cached_equals_full, assert_layers_consistent
from torch import nn
from transformers import AutoModelForCausalLM

from elmkit.data.calibration import Calibration
from elmkit.methods import replaceme
from elmkit.methods.replaceme import ReplaceMeConfig, ReplaceMePlan
from elmkit.models import count_parameters, get_layers


def _calib(n=8, T=24, seed=0):
    """Right-padded random byte sequences of varying length (pad id 256)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (n,), generator=g)
    lengths[0] = T
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return Calibration(ids.masked_fill(mask == 0, 256), mask)


def _logits(model, calib):
    with torch.no_grad():
        return model(calib.input_ids, attention_mask=calib.attention_mask, use_cache=False).logits


def _well_conditioned(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    return q * (0.5 + torch.rand(d, generator=g))  # singular values in [0.5, 1.5]


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, msg", [
    (dict(n_remove=2, ratio=0.25), "exactly one of --n-remove or --ratio"),
    (dict(n_remove=2, ridge=-1.0), "--ridge must be >= 0"),
    (dict(n_remove=2, epochs=0), "--epochs must be >= 1"),
    (dict(n_remove=2, lr=0.0), "--lr must be > 0"),
    (dict(n_remove=2, token_batch=0), "--token-batch must be >= 1"),
    (dict(n_remove=2, solver="adam"), "--solver must be lstsq or cosine"),
])
def test_bad_config_fails_clearly(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ReplaceMeConfig(**kw)


def test_too_many_layers_fails(make_model):
    with pytest.raises(ValueError, match="at most 5"):
        replaceme.plan(make_model("llama"), _calib(), ReplaceMeConfig(n_remove=6))


# ---------------------------------------------------------------------------------------------
# solvers on synthetic data
# ---------------------------------------------------------------------------------------------


def test_lstsq_recovers_a_planted_map():
    g = torch.Generator().manual_seed(0)
    d = 16
    X = torch.randn(600, d, generator=g, dtype=torch.float64)
    Z = torch.randn(600, d, generator=g, dtype=torch.float64)
    A = _well_conditioned(d).double()
    Y = Z + X @ A
    chunks = [(X[i:i + 128], (Y - Z)[i:i + 128]) for i in range(0, 600, 128)]  # accumulated over batches
    torch.testing.assert_close(replaceme.lstsq_transform(chunks), A, atol=1e-6, rtol=0)
    # ridge: exactly (X^T X + a I)^-1 X^T (Y - Z)
    ridged = replaceme.lstsq_transform(chunks, ridge=50.0)
    expected = torch.linalg.solve(X.T @ X + 50.0 * torch.eye(d, dtype=torch.float64), X.T @ (Y - Z))
    torch.testing.assert_close(ridged, expected, atol=1e-10, rtol=0)
    assert not torch.allclose(ridged, A, atol=1e-3)


def test_lstsq_with_fewer_tokens_than_dims_gives_the_minimum_norm_solution():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 16, generator=g, dtype=torch.float64)  # rank 6 < d = 16: X^T X singular
    R = X @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    with pytest.warns(UserWarning, match="singular"):
        T = replaceme.lstsq_transform([(X, R)])
    assert torch.isfinite(T).all()
    torch.testing.assert_close(X @ T, R, atol=1e-8, rtol=0)
    torch.testing.assert_close(T, torch.linalg.pinv(X) @ R, atol=1e-8, rtol=0)


@pytest.mark.parametrize("accurate", [False, True])
def test_cosine_solver_fits_a_planted_map(accurate):
    g = torch.Generator().manual_seed(0)
    d = 16
    X = torch.randn(2048, d, generator=g)
    Z = 0.3 * torch.randn(2048, d, generator=g)
    A = _well_conditioned(d, seed=1)
    Y = Z + X @ A
    target, z = (Y, Z) if accurate else (Y - Z, None)

    def loss(T):
        pred = X @ T + (Z if accurate else 0)
        return float((1 - torch.nn.functional.cosine_similarity(pred, target, dim=-1)).mean())

    kw = dict(epochs=40, lr=1e-2, token_batch=256, seed=3)
    T = replaceme.cosine_transform(X, target, z, **kw)
    assert loss(torch.eye(d)) > 0.5  # a random rotation: X and X A are far apart
    assert loss(T) < 1e-3
    torch.testing.assert_close(replaceme.cosine_transform(X, target, z, **kw), T, atol=0, rtol=0)
    assert not torch.equal(replaceme.cosine_transform(X, target, z, **{**kw, "seed": 4}), T)


# ---------------------------------------------------------------------------------------------
# on models
# ---------------------------------------------------------------------------------------------


def test_plan_is_deterministic_and_picks_the_closest_span(make_model, family):
    model, calib = make_model(family), _calib()
    cfg = ReplaceMeConfig(n_remove=2)
    p = replaceme.plan(model, calib, cfg)
    assert p == replaceme.plan(model, calib, cfg)
    assert p.n_remove == 2 and len(p.distances) == 6 - 2
    assert p.start == min(range(4), key=lambda l: p.distances[l])
    assert all(0 < d < 1 for d in p.distances)


def test_distance_uses_the_last_real_token_only(make_model):
    model, calib = make_model("qwen2"), _calib()
    # changing what sits at pad positions must not change the distances
    garbled = Calibration(calib.input_ids.masked_fill(calib.attention_mask == 0, 7), calib.attention_mask)
    torch.testing.assert_close(torch.tensor(replaceme.distances(model, calib, 2)),
                               torch.tensor(replaceme.distances(model, garbled, 2)), atol=1e-12, rtol=0)


def test_compress_removes_n_layers_and_stays_a_plain_model(make_model, family, tmp_path):
    model, calib = make_model(family), _calib()
    p0, per_layer = count_parameters(model), count_parameters(get_layers(model)[0])
    p, stats = replaceme.compress_(model, calib, ReplaceMeConfig(n_remove=2), progress=False)
    assert_layers_consistent(model)
    assert model.config.num_hidden_layers == 4
    assert count_parameters(model) == p0 - 2 * per_layer  # T lives in down_proj: no new parameters
    assert stats["solver"] == "lstsq" and stats["start"] == p.start
    assert stats["distance"] == p.distances[p.start] == min(p.distances)
    assert -1 <= stats["deletion_cosine"] <= 1 and -1 <= stats["fit_cosine"] <= 1
    assert_cached_equals_full(model)
    before = _logits(model, calib)
    model.save_pretrained(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert_layers_consistent(loaded)
    torch.testing.assert_close(_logits(loaded, calib), before, atol=0, rtol=0)


def test_cosine_solver_on_a_model_is_deterministic(make_model):
    model, calib = make_model("qwen2"), _calib()
    cfg = ReplaceMeConfig(n_remove=2, solver="cosine", epochs=2, token_batch=64, lr=1e-3, seed=5)
    p = replaceme.plan(model, calib, cfg)
    T = replaceme.fit(model, p, calib, cfg, progress=False)
    assert T.shape == (32, 32) and T.dtype == torch.float32
    assert not torch.equal(T, torch.eye(32))
    torch.testing.assert_close(replaceme.fit(model, p, calib, cfg, progress=False), T, atol=0, rtol=0)
    accurate = replaceme.fit(model, p, calib, ReplaceMeConfig(**{**cfg.__dict__, "accurate": True}),
                             progress=False)
    assert not torch.equal(accurate, T)


class _PlantedSpan(nn.Module):
    """A stand-in decoder layer whose output is h + X (A - I), X the MLP output of the layer below."""

    def __init__(self, seen: dict, A: torch.Tensor):
        super().__init__()
        self.seen, self.A = seen, A

    def forward(self, hidden_states, attention_mask=None, position_ids=None, use_cache=False,
                position_embeddings=None, **kw):
        x = self.seen["x"]  # (B, T, d)
        return hidden_states + x @ (self.A - torch.eye(self.A.shape[0]))


def test_a_linear_span_is_recovered_and_folded_exactly(make_model):
    model, calib = make_model("qwen2"), _calib(n=16, T=32)
    layers = get_layers(model)
    seen = {}
    layers[2].mlp.register_forward_hook(lambda m, args, out: seen.__setitem__("x", out))
    A = _well_conditioned(32, seed=2)
    layers[3] = _PlantedSpan(seen, A)  # output of layer 3 = Z + X A, Z = h_2 - X
    planted = _logits(model, calib)
    p0 = count_parameters(model)
    p = ReplaceMePlan(start=2, n_remove=1, distances=())
    T = replaceme.fit(model, p, calib, ReplaceMeConfig(n_remove=1), progress=False)
    torch.testing.assert_close(T, A, atol=1e-4, rtol=0)
    assert len(layers[2].mlp._forward_hooks) == 1  # fit removed its own hook
    torch.testing.assert_close(_logits(model, calib), planted, atol=0, rtol=0)  # fit changes nothing
    replaceme.apply_(model, p, T)
    assert model.config.num_hidden_layers == 5 and count_parameters(model) == p0
    torch.testing.assert_close(_logits(model, calib), planted, atol=1e-4, rtol=0)


def test_an_identity_span_is_picked_and_kept(make_model):
    model, calib = make_model("llama"), _calib()
    with torch.no_grad():
        for i in (3, 4):  # layers 3 and 4 add exactly zero: h_2 == h_4
            get_layers(model)[i].self_attn.o_proj.weight.zero_()
            get_layers(model)[i].mlp.down_proj.weight.zero_()
    dense = _logits(model, calib)
    cfg = ReplaceMeConfig(n_remove=2)
    p = replaceme.plan(model, calib, cfg)
    assert p.start == 2 and p.distances[2] < 1e-6
    assert min(d for l, d in enumerate(p.distances) if l != 2) > 1e-3
    T = replaceme.fit(model, p, calib, cfg, progress=False)
    torch.testing.assert_close(T, torch.eye(32), atol=1e-5, rtol=0)
    _, stats = replaceme.compress_(model, calib, cfg, progress=False)
    assert stats["start"] == 2 and stats["fit_cosine"] == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(_logits(model, calib), dense, atol=1e-5, rtol=0)


def test_fold_maps_the_mlp_output_through_T_with_a_bias(make_model):
    model = make_model("llama", mlp_bias=True)
    mlp = get_layers(model)[1].mlp
    with torch.no_grad():
        mlp.down_proj.bias.normal_()
        a = torch.randn(3, 7, 32)
        before = mlp(a)
        T = _well_conditioned(32, seed=4)
        replaceme.apply_(model, ReplaceMePlan(start=1, n_remove=2, distances=()), T)
        torch.testing.assert_close(mlp(a), before @ T, atol=1e-5, rtol=0)
    assert get_layers(model)[1].mlp is mlp and model.config.num_hidden_layers == 4
    with pytest.raises(ValueError, match="shape"):
        replaceme.apply_(model, ReplaceMePlan(start=0, n_remove=1, distances=()), torch.eye(3))
    with pytest.raises(ValueError, match="does not fit"):
        replaceme.apply_(model, ReplaceMePlan(start=2, n_remove=2, distances=()), torch.eye(32))


def test_zero_removal_leaves_the_model_unchanged(make_model):
    model, calib = make_model("qwen3"), _calib()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = _logits(model, calib)
    cfg = ReplaceMeConfig(ratio=0.05)  # round(0.05 * 6) = 0
    p, stats = replaceme.compress_(model, calib, cfg, progress=False)
    assert p.n_remove == 0 and stats["fit_cosine"] == 1.0
    assert model.config.num_hidden_layers == 6
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(_logits(model, calib), dense, atol=0, rtol=0)


def test_removing_all_but_one_layer(make_model):
    model, calib = make_model("mistral"), _calib()
    p, _ = replaceme.compress_(model, calib, ReplaceMeConfig(n_remove=5), progress=False)
    assert p.start == 0 and len(p.distances) == 1
    assert_layers_consistent(model)
    assert model.config.num_hidden_layers == 1
    assert_cached_equals_full(model)
