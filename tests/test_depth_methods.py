"""ShortGPT, Shortened-LLaMA (PPL / Taylor+), SLEB, SLM and LaCo: shared invariants and known answers."""

import copy

import pytest
import torch
from checks import assert_cached_equals_full
from transformers import AutoModelForCausalLM

from elmkit.data.calibration import CalibConfig, Calibration
from elmkit.methods import common, laco, shortened, shortgpt, sleb, slm
from elmkit.models import count_parameters, get_layers, load_model, load_tokenizer
from elmkit.testbed import TINY_PATH
from elmkit.testbed.card import read_recipe
from elmkit.testbed.problems import make_split

METHODS = {
    "shortgpt": (shortgpt, lambda k: shortgpt.ShortGPTConfig(n_remove=k)),
    "shortened-ppl": (shortened, lambda k: shortened.ShortenedConfig(n_remove=k, protect_first=1,
                                                                      protect_last=1)),
    "shortened-taylor": (shortened, lambda k: shortened.ShortenedConfig(
        n_remove=k, criterion="taylor", protect_first=1, protect_last=1)),
    "sleb": (sleb, lambda k: sleb.SLEBConfig(n_remove=k)),
    "slm": (slm, lambda k: slm.SLMConfig(n_remove=k, bisect_steps=6)),
    "laco": (laco, lambda k: laco.LaCoConfig(n_remove=k, bisect_steps=6)),
}


def _calib(n=6, T=12, seed=0, pad_last=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    if pad_last:
        mask[-1, T // 2:] = 0  # one right-padded row
        ids[-1, T // 2:] = 256
    return Calibration(ids, mask)


@pytest.mark.parametrize("name", list(METHODS))
def test_method_invariants(name, make_model, tmp_path):
    mod, make_cfg = METHODS[name]
    model = make_model("qwen2", num_layers=6)
    per_layer = count_parameters(get_layers(model)[0])
    p0, k = count_parameters(model), 2
    calib = _calib()
    p1 = mod.plan(copy.deepcopy(model), calib, make_cfg(k), progress=False)
    p2 = mod.plan(copy.deepcopy(model), calib, make_cfg(k), progress=False)
    assert p1 == p2  # deterministic
    mod.apply_(model, p1)
    assert model.config.num_hidden_layers == 4
    assert count_parameters(model) == p0 - k * per_layer
    assert [l.self_attn.layer_idx for l in get_layers(model)] == [0, 1, 2, 3]
    assert_cached_equals_full(model)
    model.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    ids = calib.input_ids[:2]
    torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["shortgpt", "sleb", "slm"])
def test_methods_run_on_every_family(name, family, make_model):
    mod, make_cfg = METHODS[name]
    model = make_model(family, num_layers=5)
    mod.compress_(model, _calib(n=3), make_cfg(1), progress=False)
    assert model.config.num_hidden_layers == 4
    assert_cached_equals_full(model)


# --- known answers on the trained tiny testbed model ------------------------------------------


@pytest.fixture(scope="module")
def testbed():
    tok = load_tokenizer(TINY_PATH)
    recipe = read_recipe(TINY_PATH)
    ex = make_split("validation", 8, recipe["problems"], recipe["seed"])
    return tok, Calibration.from_examples(tok, ex)


def _with_identity(layer: int):
    model = load_model(TINY_PATH, dtype="float32", device="cpu")
    with torch.no_grad():
        get_layers(model)[layer].self_attn.o_proj.weight.zero_()
        get_layers(model)[layer].mlp.down_proj.weight.zero_()
    return model


@pytest.mark.parametrize("name", ["shortgpt", "shortened-ppl", "shortened-taylor", "sleb"])
def test_identity_layer_is_removed_first(name, testbed):
    _, calib = testbed
    mod, make_cfg = METHODS[name]
    model = _with_identity(6)
    p = mod.plan(model, calib, make_cfg(1), progress=False)
    assert p.drop == (6,)
    if name == "shortgpt":
        assert p.scores[6] == pytest.approx(0.0, abs=1e-6)
    if name == "shortened-taylor":
        assert p.scores[6] == 0.0  # no weight of an identity layer moves the loss


def test_shortened_protects_first_and_last(make_model):
    model = make_model("llama", num_layers=8)
    p = shortened.plan(model, _calib(), shortened.ShortenedConfig(n_remove=2), progress=False)
    assert all(4 <= i < 6 for i in p.drop) and p.drop == (4, 5)
    assert p.scores[:4] == (None,) * 4 and p.scores[-2:] == (None, None)
    with pytest.raises(ValueError, match="at most 2"):
        shortened.plan(model, _calib(), shortened.ShortenedConfig(n_remove=3), progress=False)


def test_sleb_is_iterative_and_reports_nll(testbed):
    _, calib = testbed
    model = load_model(TINY_PATH, dtype="float32", device="cpu")
    p = sleb.plan(model, calib, sleb.SLEBConfig(n_remove=2), progress=False)
    assert len(p.order) == 2 and sorted(p.order) == list(p.drop)
    assert 0 not in p.drop and 11 not in p.drop  # barriers
    assert p.nll[0] <= p.nll[1]  # each removal costs something on a trained model


# --- merging ----------------------------------------------------------------------------------


def test_merge_rules(make_model):
    layers = get_layers(make_model("qwen2", num_layers=3))
    w = [l.mlp.up_proj.weight for l in layers]
    got = {r: common.merge_layers(list(layers), r).mlp.up_proj.weight
           for r in ("paper", "keep_top", "keep_bottom", "mean")}
    torch.testing.assert_close(got["paper"], w[1] + w[2] - w[0])
    torch.testing.assert_close(got["keep_top"], w[2])
    torch.testing.assert_close(got["keep_bottom"], w[0])
    torch.testing.assert_close(got["mean"], (w[0] + w[1] + w[2]) / 3)
    # qwen2 q/k/v biases merge too; norms are the bottom layer's
    torch.testing.assert_close(common.merge_layers(list(layers)).self_attn.q_proj.bias,
                               layers[1].self_attn.q_proj.bias + layers[2].self_attn.q_proj.bias
                               - layers[0].self_attn.q_proj.bias)
    assert common.merge_layers(list(layers)).input_layernorm is not layers[0].input_layernorm


def test_slm_merges_identical_layers_into_either(make_model):
    model = make_model("qwen2", num_layers=6)
    layers = get_layers(model)
    layers[4].load_state_dict(layers[3].state_dict())
    ref = copy.deepcopy(layers[3])
    slm.apply_(model, slm.SLMPlan(merges=((3, 4),), threshold=0.0, similarity=1.0, merge="paper"))
    assert model.config.num_hidden_layers == 5
    merged = get_layers(model)[3].state_dict()
    for name, t in ref.state_dict().items():
        torch.testing.assert_close(merged[name], t, atol=0, rtol=0)


@pytest.mark.parametrize("k", [2, 5])
def test_slm_bisection_hits_the_target(k, testbed):
    _, calib = testbed
    model = load_model(TINY_PATH, dtype="float32", device="cpu")
    p = slm.plan(model, calib, slm.SLMConfig(n_remove=k, bisect_steps=8), progress=False)
    assert sum(hi - lo for lo, hi in p.merges) == k
    assert all(hi < 11 for _, hi in p.merges)  # the last layer is never merged
    # windows are disjoint and top first
    assert all(a[0] > b[1] for a, b in zip(p.merges, p.merges[1:]))
    # the uncapped sweep at the same T commits the same windows and then goes on
    untargeted = slm.plan(model, calib, slm.SLMConfig(threshold=p.threshold), progress=False)
    assert sum(hi - lo for lo, hi in untargeted.merges) >= k
    slm.apply_(model, p)
    assert model.config.num_hidden_layers == 12 - k


def test_slm_threshold_sweep_is_the_original(testbed):
    _, calib = testbed
    model = load_model(TINY_PATH, dtype="float32", device="cpu")
    strict = slm.plan(model, calib, slm.SLMConfig(threshold=1.0), progress=False)
    loose = slm.plan(model, calib, slm.SLMConfig(threshold=-1.0), progress=False)
    assert strict.merges == ()
    assert loose.merges == ((0, 10),)  # everything below the last layer collapses into one


def test_laco_hits_target_and_replays(testbed):
    _, calib = testbed
    model = load_model(TINY_PATH, dtype="float32", device="cpu")
    p = laco.plan(model, calib, laco.LaCoConfig(n_remove=3, m=2, bisect_steps=8), progress=False)
    assert sum(m for _, m in p.merges) == 3
    ref_sim = p.similarity
    dense_out = model(calib.input_ids[:4], attention_mask=calib.attention_mask[:4],
                      output_hidden_states=True).hidden_states[-1]
    laco.apply_(model, p)
    assert model.config.num_hidden_layers == 9
    out = model(calib.input_ids[:4], attention_mask=calib.attention_mask[:4],
                output_hidden_states=True).hidden_states[-1]
    mask = calib.attention_mask[:4, :out.shape[1]][..., None]
    cos = torch.nn.functional.cosine_similarity((out * mask).flatten(1), (dense_out * mask).flatten(1))
    assert 0 < ref_sim <= 1 and cos.min() > 0  # the replayed model is the one that was scored


def test_laco_keep_top_equals_dropping_the_lower_layers(make_model):
    model = make_model("llama", num_layers=5)
    top = copy.deepcopy(get_layers(model)[3])
    laco.apply_(model, laco.LaCoPlan(merges=((1, 2),), threshold=0, similarity=1, merge="keep_top"))
    got = get_layers(model)[1]
    torch.testing.assert_close(got.mlp.down_proj.weight, top.mlp.down_proj.weight)
    torch.testing.assert_close(got.self_attn.q_proj.weight, top.self_attn.q_proj.weight)


# --- configs and calibration -----------------------------------------------------------------


def test_bad_configs_say_what_to_fix():
    with pytest.raises(ValueError, match="exactly one of --n-remove or --ratio"):
        shortgpt.ShortGPTConfig()
    with pytest.raises(ValueError, match="--criterion"):
        shortened.ShortenedConfig(n_remove=1, criterion="l2")
    with pytest.raises(ValueError, match="--threshold"):
        slm.SLMConfig()
    with pytest.raises(ValueError, match="--m and --interval"):
        laco.LaCoConfig(n_remove=1, m=0)
    with pytest.raises(ValueError, match="at most"):
        shortgpt.ShortGPTConfig(n_remove=6).count(6)


def test_calib_config_draws_reproducible_windows(tokenizer, tmp_path):
    text = tmp_path / "wiki.txt"
    text.write_text("".join(f"sentence number {i} of the corpus. " for i in range(400)))
    c1 = CalibConfig(source=str(text), samples=5, seq_len=32, seed=1).build(tokenizer)
    c2 = CalibConfig(source=str(text), samples=5, seq_len=32, seed=1).build(tokenizer)
    c3 = CalibConfig(source=str(text), samples=5, seq_len=32, seed=2).build(tokenizer)
    assert c1.input_ids.shape == (5, 32) and bool(c1.attention_mask.all())
    assert torch.equal(c1.input_ids, c2.input_ids) and not torch.equal(c1.input_ids, c3.input_ids)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join('{"text": "%s"}' % ("word " * (i + 3)) for i in range(20)))
    c = CalibConfig(samples=8, seq_len=16).build(tokenizer, default=docs)
    assert c.input_ids.shape[0] == 8 and c.input_ids.shape[1] <= 16
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CalibConfig(source=str(tmp_path / "nope.txt")).build(tokenizer)
    with pytest.raises(ValueError, match="no calibration data"):
        CalibConfig().build(tokenizer)


def test_calibration_without_targets_is_refused(make_model):
    model = make_model("qwen2", num_layers=4)
    c = _calib(n=3)
    c = Calibration(c.input_ids, c.attention_mask, torch.zeros_like(c.attention_mask))
    for mod, cfg in ((sleb, sleb.SLEBConfig(n_remove=1)),
                     (shortened, shortened.ShortenedConfig(n_remove=1, protect_first=0, protect_last=0)),
                     (shortened, shortened.ShortenedConfig(n_remove=1, criterion="taylor", protect_first=0,
                                                           protect_last=0))):
        with pytest.raises(ValueError, match="no calibration sequence has a target token"):
            mod.plan(model, c, cfg, progress=False)


def test_long_examples_keep_their_answer_in_calibration(tokenizer):
    recipe = read_recipe(TINY_PATH)
    ex = make_split("validation", 4, recipe["problems"], recipe["seed"])
    c = CalibConfig(samples=4, seq_len=40).build(tokenizer, default=ex)
    assert c.input_ids.shape[1] <= 40 and bool(c.target_mask.sum(1).gt(0).all())
    from elmkit.data import encode

    fulls = [encode(tokenizer, e, 1 << 20)["input_ids"] for e in ex]
    for ids, mask in zip(c.input_ids, c.attention_mask):
        row = ids[mask.bool()].tolist()  # the cut kept each example's end, where the answer is
        assert len(row) == 40 and any(f[-40:] == row for f in fulls)


def test_laco_first_window_stays_below_the_top_layer(testbed):
    _, calib = testbed
    model = load_model(TINY_PATH, dtype="float32", device="cpu")
    p = laco.plan(model, calib, laco.LaCoConfig(threshold=-1.0, m=2), progress=False)
    assert p.merges[0] == (8, 2)  # HIGHEST_LAY 11 - MERGE_LAYERS 3: layers 8..10 into 8
