"""DarwinLM: OBS database (closed form, better than plain removal), level-switch mutation, seeded and
resumable search, stitching into a slim model, and the two contrasts (ZipLM-style, uniform)."""

import random

import pytest
import torch
from checks import assert_cached_equals_full

from elmkit.data.calibration import Calibration
from elmkit.methods import darwinlm as dl
from elmkit.methods.common import non_embedding_parameters
from elmkit.models import count_parameters, load_model, load_tokenizer
from elmkit.models.tiny import tiny_model
from elmkit.testbed import TINY_PATH
from elmkit.testbed.card import read_recipe
from elmkit.testbed.problems import make_split

# --- A. the OBS step ------------------------------------------------------------------------------


def _layer(d_out=6, d_in=16, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    # correlated inputs: the update has something to exploit
    X = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) @ torch.randn(d_in, n, generator=g,
                                                                                  dtype=torch.float64)
    return W, X, 2 * X @ X.T / n


def _full(W, kept, cols_kept, group):
    out = torch.zeros_like(W)
    cols = (torch.tensor(kept)[:, None] * group + torch.arange(group)).flatten()
    out[:, cols] = cols_kept
    return out


@pytest.mark.parametrize("group", [1, 4])
def test_obs_update_beats_plain_removal_and_matches_the_closed_form(group):
    W, X, H = _layer()
    n = X.shape[1]
    counts = [0, 1, 2, 3]
    snaps = dl.obs_prune(W, H, group, counts, rel_damp=0.0)
    assert snaps[0][0] == list(range(16 // group)) and torch.equal(snaps[0][1], W)
    for c, (kept, cols_kept, predicted) in zip(counts[1:], snaps[1:]):
        assert len(kept) == 16 // group - c
        What = _full(W, kept, cols_kept, group)
        err = ((W - What) @ X).pow(2).sum() / n
        plain = W.clone()
        gone = [j for j in range(16) if j // group not in kept]
        plain[:, gone] = 0
        err_plain = ((W - plain) @ X).pow(2).sum() / n
        assert err < err_plain
        torch.testing.assert_close(err, torch.tensor(predicted, dtype=torch.float64), rtol=1e-8, atol=1e-10)


def test_obs_closed_form_holds_for_the_damped_hessian():
    W, _, H = _layer(seed=1)
    damp = 0.1
    Hd = H + damp * H.diagonal().mean() * torch.eye(16, dtype=H.dtype)
    kept, cols_kept, predicted = dl.obs_prune(W, H, 4, [2], rel_damp=damp)[0]
    dW = W - _full(W, kept, cols_kept, 4)
    want = torch.tensor(predicted, dtype=torch.float64)
    torch.testing.assert_close(0.5 * torch.trace(dW @ Hd @ dW.T), want)


def test_obs_removes_a_dead_group_first_and_the_whole_matrix_last():
    W, _, H = _layer(seed=2)
    W[:, 8:12] = 0  # group 2 contributes nothing
    snaps = dl.obs_prune(W, H, 4, [1, 4], rel_damp=0.01)
    assert 2 not in snaps[0][0] and snaps[0][2] == pytest.approx(0.0, abs=1e-12)
    assert snaps[1][0] == [] and snaps[1][1].shape == (6, 0)
    with pytest.raises(ValueError, match="groups of 5"):
        dl.obs_prune(W, H, 5, [1])


def test_uniform_mode_ranks_by_the_diagonal_score_without_update():
    W, _, H = _layer(seed=3)
    kept, cols_kept, _ = dl.obs_prune(W, H, 1, [5], second_order=False)[0]
    score = W.pow(2).sum(0) * (H.diagonal() + 0.01 * H.diagonal().mean())  # damped diagonal
    assert kept == sorted(torch.argsort(score, descending=True)[:11].tolist())
    torch.testing.assert_close(cols_kept, W[:, kept])  # no update


# --- B. the search ------------------------------------------------------------------------------


def test_level_switch_mutation_keeps_each_kinds_sum_and_range():
    rng = random.Random(0)
    for _ in range(300):
        n, top = rng.randint(2, 8), rng.randint(1, 10)
        levels = {k: [rng.randint(0, top) for _ in range(n)] for k in dl.KINDS}
        child = dl.mutate(levels, top, rng)
        for k in dl.KINDS:
            assert sum(child[k]) == sum(levels[k])
            assert all(0 <= l <= top for l in child[k])
    a = dl.mutate({"attn": [3] * 6, "mlp": [3] * 6}, 10, random.Random(7))
    assert a == dl.mutate({"attn": [3] * 6, "mlp": [3] * 6}, 10, random.Random(7))


def test_spread_and_ladder():
    assert sum(dl.spread(33, 12, 10)) == 33 and set(dl.spread(33, 12, 10)) == {2, 3}
    assert dl.ladder(4, 11) == [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4]
    with pytest.raises(ValueError, match="does not fit"):
        dl.spread(13, 2, 6)


def _calib(n=8, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Calibration(torch.randint(0, 256, (n, T), generator=g), torch.ones(n, T, dtype=torch.long))


SMALL = dict(levels=5, generations=3, offspring=4, survivors=(2, 1), fitness_tokens=(30, 60),
             train_tokens=(24, 48), train_batch_size=2, lr=1e-3)


def _model(family="qwen2", layers=3):
    torch.manual_seed(0)
    return tiny_model(family, num_layers=layers, hidden_size=32).eval()


def test_seeded_search_is_deterministic_and_resumes(tmp_path):
    m, calib = _model(), _calib()
    cfg = dl.DarwinLMConfig(ratio=0.3, **SMALL)
    a, _, sa = dl.plan(m, calib, cfg, progress=False)
    b, _, sb = dl.plan(m, calib, cfg, progress=False)
    assert a == b and sa["history"] == sb["history"]
    # two generations, then the same search extended to three, continues from the saved state
    dl.plan(m, calib, dl.DarwinLMConfig(ratio=0.3, **{**SMALL, "generations": 2}), folder=tmp_path,
            progress=False)
    assert (tmp_path / "levels.txt").read_text().startswith("model.layers.0.self_attn.o_proj: ")
    c, _, sc = dl.plan(m, calib, cfg, folder=tmp_path, progress=False)
    assert c == a and sc["history"] == sa["history"]
    assert sum(a.attn_levels) == sum(dl.level_sums(m, cfg).values()) // 2


def test_fitness_never_rises_on_the_tiny_testbed():
    """One stage, no fine-tuning, the whole calibration scored: elitism makes the parent's KL
    non-increasing over generations."""
    tok = load_tokenizer(TINY_PATH)
    r = read_recipe(TINY_PATH)
    calib = Calibration.from_examples(tok, make_split("validation", 16, r["problems"], r["seed"]))
    m = load_model(TINY_PATH, dtype="float32", device="cpu")
    cfg = dl.DarwinLMConfig(ratio=0.25, generations=6, offspring=4, survivors=(1,), fitness_tokens=(10**9,),
                            train_tokens=(0,))
    p, _, stats = dl.plan(m, calib, cfg, progress=False)
    h = stats["history"]
    assert len(h) == 6 and all(b <= a + 1e-12 for a, b in zip(h, h[1:]))
    start, _, _ = dl.plan(m, calib, dl.DarwinLMConfig(ratio=0.25, mode="ziplm"), progress=False)
    assert p.fitness <= start.fitness + 1e-9


# --- C. stitching ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("mode", ["ziplm", "uniform"])
def test_stitched_slim_model_is_the_zero_filled_model(family, mode, tmp_path):
    m, calib = _model(family, layers=4), _calib()
    cfg = dl.DarwinLMConfig(ratio=0.3, mode=mode, levels=5)
    p, db, _ = dl.plan(m, calib, cfg, folder=tmp_path, progress=False)
    slim = dl.apply_(m, p, db)
    ref = _model(family, layers=4)
    dl.load_levels_(ref, db, {"attn": list(p.attn_levels), "mlp": list(p.mlp_levels)})
    ids = calib.input_ids[:2]
    with torch.no_grad():
        torch.testing.assert_close(slim(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)
    c = m.config
    hd = c.hidden_size // c.num_attention_heads
    group = c.num_attention_heads // c.num_key_value_heads
    heads = sum(c.num_attention_heads - p.attn_counts[l] for l in p.attn_levels)
    kv = sum(len({h // group for h in db.entries[i]["attn"][l][0]}) for i, l in enumerate(p.attn_levels))
    ch = sum(c.intermediate_size - p.mlp_counts[l] for l in p.mlp_levels)
    bias = (hd if family == "qwen2" else 0)
    per_q, per_kv = 2 * hd * c.hidden_size + bias, 2 * (hd * c.hidden_size + bias)
    other = count_parameters(m) - c.num_hidden_layers * (c.num_attention_heads * per_q
                                                         + c.num_key_value_heads * per_kv
                                                         + 3 * c.intermediate_size * c.hidden_size)
    assert count_parameters(slim) == other + heads * per_q + kv * per_kv + 3 * ch * c.hidden_size
    removed = 1 - (count_parameters(slim) - (count_parameters(m) - non_embedding_parameters(m))) \
        / non_embedding_parameters(m)
    assert 0.1 < removed < 0.5
    assert_cached_equals_full(slim)
    # the database is reloaded, not recomputed, and gives the same model
    p2, db2, _ = dl.plan(m, calib, cfg, folder=tmp_path, progress=False)
    assert p2 == p and all(torch.equal(a[1], b[1]) for e, f in zip(db.entries, db2.entries)
                           for k in dl.KINDS for a, b in zip(e[k], f[k]))


def test_compress_post_trains_the_slim_model(tmp_path):
    m, calib = _model(), _calib()
    cfg = dl.DarwinLMConfig(ratio=0.3, mode="ziplm", levels=5, post_train_steps=3, post_train_lr=1e-2,
                            train_batch_size=2)
    slim, p, stats = dl.compress_(m, calib, cfg, progress=False)
    bare = dl.apply_(m, p, dl.plan(m, calib, cfg, progress=False)[1])
    ids = calib.input_ids[:2]
    with torch.no_grad():
        assert not torch.allclose(slim(ids).logits, bare(ids).logits)
    assert stats["fitness"] == p.fitness > 0


def test_bad_configs_say_what_to_fix():
    with pytest.raises(ValueError, match="one entry per stage"):
        dl.DarwinLMConfig(survivors=(8, 1), fitness_tokens=(10,), train_tokens=(0,))
    with pytest.raises(ValueError, match="end with 1"):
        dl.DarwinLMConfig(survivors=(2,), fitness_tokens=(10,), train_tokens=(0,))
    with pytest.raises(ValueError, match="--mode"):
        dl.DarwinLMConfig(mode="random")
    with pytest.raises(ValueError, match="--ratio"):
        dl.DarwinLMConfig(ratio=1.0)
    assert dl.DarwinLMConfig(survivors="4,1", fitness_tokens="5,6", train_tokens="0,0").survivors == (4, 1)
