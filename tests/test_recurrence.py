import copy
import dataclasses
import json
import os

import pytest
import torch
from checks import assert_loads_with_remote_code_only
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from elmkit.data.synthetic import arithmetic_examples
from elmkit.infer import Decoder
from elmkit.io import read_json
from elmkit.methods import elm as E
from elmkit.methods import recurrence as R
from elmkit.models import RecurrentConfig, count_parameters, load_model
from elmkit.models.adapters import UnsupportedModelError, cache_kw, layer_inputs
from elmkit.train.recurrence import (
    RecurrenceTrainConfig,
    depth_draw,
    mean_depth,
    train_recurrent,
    wsd_lr,
)

TEXTS = [f"{a} plus {b} is {a + b}. " * 3 for a in range(10) for b in range(4)]
CFG = RecurrenceTrainConfig(steps=6, batch_size=4, max_len=32, lr=3e-3, min_lr=3e-4, warmup=1,
                            save_every=2)


def _ids(B=2, T=9, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _recurrent(make_model, family="qwen2", n=6, **cfg):
    source = make_model(family, num_layers=n)
    ref = copy.deepcopy(source)
    p = R.plan(source, R.RecurrenceConfig(**cfg))
    return ref, p, R.apply_(source, p)


def test_identity_adapter_at_one_iteration_reproduces_the_source(make_model, family):
    """A = [0 | I], p == c0 (nothing deleted), r = 1: s_0 is ignored and the logits are the source's."""
    ref, _, m = _recurrent(make_model, family, prelude=2, core_len=3, mean_recurrence=1,
                           adapter_init="identity", state_seed=None)
    ids, mask = _ids(), torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0  # left padding
    with torch.no_grad():
        torch.testing.assert_close(m(ids, attention_mask=mask).logits,
                                   ref(ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    # generate() recomputes the whole sequence per step, with or without use_cache
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for use_cache in (True, False):
        got = m.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, use_cache=use_cache)
        assert torch.equal(got, want)


def test_layout_and_parameter_counts_are_as_planned(make_model):
    source = make_model("qwen2", num_layers=8)
    layers = list(source.model.layers)
    per_layer = count_parameters(layers[0])
    before = count_parameters(source)
    p = R.plan(source, R.RecurrenceConfig(prelude=2, core_start=4, core_len=3, mean_recurrence=4))
    assert (p.prelude, p.deleted, p.core, p.coda) == ((0, 1), (2, 3), (4, 5, 6), (7,))
    assert p.layer_evals == 2 + 4 * 3 + 1
    d = source.config.hidden_size
    assert p.params_before == before and p.params_after == before - 2 * per_layer + 2 * d * d
    m = R.apply_(source, p)
    assert count_parameters(m) == p.params_after
    assert m.config.num_hidden_layers == 6 and len(m.model.layers) == 6
    assert [l.self_attn.layer_idx for l in m.model.layers] == list(range(6))
    assert list(m.prelude) == layers[:2] and list(m.core) == layers[4:7] and list(m.coda) == layers[7:]
    assert len(source.model.layers) == 0  # the deleted layers went with the source's shell
    assert m.adapter.weight.shape == (d, 2 * d) and m.adapter.bias is None
    bound = 1 / (2 * d) ** 0.5  # nn.Linear's default init
    assert m.adapter.weight.abs().max() <= bound and m.adapter.weight.std() > bound / 4


def test_untied_head_gets_its_own_copy(make_model):
    source = make_model("qwen2", tie_word_embeddings=True)
    assert source.lm_head.weight is source.model.embed_tokens.weight
    before = count_parameters(source)
    p = R.plan(source, R.RecurrenceConfig(prelude=2, core_len=2, untie_embeddings=True))
    m = R.apply_(source, p)
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)
    assert count_parameters(m) == p.params_after == before + m.lm_head.weight.numel() + 2 * 32 * 32
    assert m.config.tie_word_embeddings is False


def test_for_target_places_the_core_where_elm_places_its_span(make_model):
    dense = make_model("qwen2", num_layers=12)
    base = R.RecurrenceConfig(core_len=2, mean_recurrence=3)
    cfg = R.for_target(base, dense, n_remove=3)
    elm_start = E.plan(dense, span=4).start  # ELM at the same n: span n + 1 in the middle
    assert (cfg.prelude, cfg.core_start) == (elm_start, elm_start + 3)
    p = R.plan(dense, cfg)
    assert len(p.deleted) == 3 and len(p.prelude + p.core + p.coda) == 12 - 3
    # compute budget: as many layer evaluations per token as a model with 3 layers pruned
    p = R.plan(dense, R.for_target(base, dense, n_remove=3, budget="compute"))
    assert p.layer_evals == 12 - 3 and len(p.deleted) == 3 + (3 - 1) * 2
    long_core = R.for_target(dataclasses.replace(base, core_len=6), dense, n_remove=3)
    assert (long_core.prelude, long_core.core_start) == (3, 6)  # slid down from 4 to fit the core
    with pytest.raises(ValueError, match="cannot delete 11 of 12 layers"):
        R.for_target(base, dense, n_remove=11)


def test_eval_state_is_seeded_per_input_and_training_state_is_random(make_model):
    _, _, m = _recurrent(make_model, prelude=1, core_start=2, core_len=2, mean_recurrence=3)
    ids = _ids(3, 9)
    with torch.no_grad():
        a, b = m(ids).logits, m(ids).logits
        alone = m(ids[1:2]).logits  # s_0 is drawn once for every row: batch-mates don't matter
        assert torch.equal(a, b)
        torch.testing.assert_close(alone[0], a[1], atol=1e-5, rtol=0)
        m.config.state_seed = None  # the authors' stochastic eval
        assert not torch.equal(m(ids).logits, m(ids).logits)
        m.train()
        e = torch.zeros(2, 5, 32)
        s = m.initial_state(e)
        assert s.shape == e.shape and not torch.equal(s[0], s[1])
        g = torch.Generator().manual_seed
        assert torch.equal(m.initial_state(e, g(7)), m.initial_state(e, g(7)))
        assert float(s.abs().max()) <= 3 * m.config.state_std


def test_save_load_gives_identical_logits(make_model, tmp_path):
    _, _, m = _recurrent(make_model, prelude=2, core_start=3, core_len=2, mean_recurrence=3)
    ids = _ids()
    with torch.no_grad():
        want = m(ids).logits
    m.save_pretrained(tmp_path / "rec")
    files = set(os.listdir(tmp_path / "rec"))
    assert {"model.safetensors", "config.json", "modeling_recurrent.py", "configuration_recurrent.py",
            "hf_compat.py"} <= files
    cfg = json.loads((tmp_path / "rec" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_recurrent.RecurrentForCausalLM"
    for again in (AutoModelForCausalLM.from_pretrained(tmp_path / "rec").eval(),
                  load_model(tmp_path / "rec", dtype="float32", device="cpu")):
        with torch.no_grad():
            assert torch.equal(again(ids).logits, want)
    assert_loads_with_remote_code_only(tmp_path / "rec", ids, want, tmp_path)


def test_bad_configs_raise_clear_errors(make_model, tokenizer, tmp_path):
    source = make_model("qwen2", num_layers=6)
    _, _, m0 = _recurrent(make_model, prelude=2, core_len=2)
    with pytest.raises(ValueError, match=r"the core \[4, 8\) goes beyond the 6 layers"):
        R.plan(source, R.RecurrenceConfig(prelude=2, core_start=4, core_len=4))
    with pytest.raises(ValueError, match="mean-recurrence"):
        R.RecurrenceConfig(mean_recurrence=0)
    with pytest.raises(ValueError, match="inside the prelude"):
        R.RecurrenceConfig(prelude=3, core_start=2)
    with pytest.raises(ValueError, match="--core-len must be >= 1"):
        R.RecurrenceConfig(core_len=0)
    with pytest.raises(ValueError, match="--adapter-init"):
        R.RecurrenceConfig(adapter_init="zeros")
    with pytest.raises(ValueError, match="--coda 1 does not match"):
        R.plan(source, R.RecurrenceConfig(prelude=2, core_len=2, coda=1))
    with pytest.raises(ValueError, match="mean_recurrence r must be >= 1"):
        RecurrentConfig(mean_recurrence=0)
    with pytest.raises(ValueError, match="--curriculum"):
        RecurrenceTrainConfig(curriculum="cosine")
    with pytest.raises(ValueError, match="no training example has a target token"):
        train_recurrent(m0, tokenizer, arithmetic_examples(4, seed=1), tmp_path, CFG, progress=False)
    m = R.apply_(source, R.plan(source, R.RecurrenceConfig(prelude=2, core_len=2)))
    with pytest.raises(ValueError, match="already of type 'recurrent'"):
        R.plan(m, R.RecurrenceConfig())
    with pytest.raises(ValueError, match="keeps no KV cache"):
        m(_ids(), **cache_kw(object()))
    # hand-running the layers in sequence would skip the recurrence: refused, not silently wrong
    with pytest.raises(UnsupportedModelError, match="its core repeats"):
        layer_inputs(m, _ids())
    with pytest.raises(UnsupportedModelError, match="decode a recurrent model with model.generate"):
        Decoder(m, batch_size=1, max_len=16)


def test_footprint_refuses_a_model_without_a_kv_cache(make_model, tokenizer):
    """kv_bytes_at / kv_cache_bytes: a recurrent model holds no cache, which is not "0 bytes"."""
    from elmkit.eval.footprint import kv_bytes_at, kv_cache_bytes

    _, _, m = _recurrent(make_model, prelude=1, core_start=2, core_len=2)
    with pytest.raises(ValueError, match="RecurrentForCausalLM keeps no KV cache: it recomputes"):
        kv_bytes_at(m, 4096)
    with pytest.raises(ValueError, match="keeps no KV cache"):
        kv_cache_bytes(m, tokenizer, [[1, 2, 3], [4, 5]])
    dense = make_model("qwen2", num_layers=6)
    assert kv_bytes_at(dense, 10) == 6 * 2 * 10 * dense.config.num_key_value_heads * 2 * (
        dense.config.hidden_size // dense.config.num_attention_heads)  # layers x (K, V) x T x KV width x 2 B


def test_depth_draws_schedule_and_curriculum():
    cfg = RecurrenceTrainConfig(steps=1000)
    draws = [depth_draw(s, 4, 8, cfg) for s in range(2000)]
    assert draws == [depth_draw(s, 4, 8, cfg) for s in range(2000)]  # a pure function of the step
    assert all(k >= 1 and k <= 4 and (n == 0 or k == 4) for n, k in draws)  # k_bar := min(8, r_bar)
    depth = sum(n + k for n, k in draws) / len(draws)
    assert abs(depth - 5) < 0.3  # E[Poisson(lambda) + 1] = r_bar + 1
    assert all(k <= 2 for _, k in (depth_draw(s, 8, 2, cfg) for s in range(200)))
    ramp = RecurrenceTrainConfig(steps=100, curriculum="1-sqrt", curriculum_frac=0.5)
    r = [mean_depth(s, 8, ramp) for s in range(100)]
    assert r[0] == 1 and r == sorted(r) and r[49] < 8 and r[50:] == [8] * 50
    lrs = [wsd_lr(s, CFG) for s in range(CFG.steps)]
    assert lrs[0] == CFG.lr and lrs[2] == CFG.lr and lrs[3] > lrs[4] > lrs[5] >= CFG.min_lr


def _train(make_model, tokenizer, out, cfg, on_step=None, **layout):
    _, _, m = _recurrent(make_model, **(layout or dict(prelude=1, core_start=2, core_len=2,
                                                       mean_recurrence=3, backprop_depth=2)))
    return m, train_recurrent(m, tokenizer, TEXTS, out, cfg, progress=False, on_step=on_step)


def test_seeded_training_is_deterministic_and_lowers_the_loss(make_model, tokenizer, tmp_path):
    cfg = dataclasses.replace(CFG, steps=20, save_every=100)
    a, ma = _train(make_model, tokenizer, tmp_path / "a", cfg)
    b, mb = _train(make_model, tokenizer, tmp_path / "b", cfg)
    assert read_json(tmp_path / "a" / "history.json") == read_json(tmp_path / "b" / "history.json")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    losses = [h["loss"] for h in read_json(tmp_path / "a" / "history.json")]
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    assert (tmp_path / "a" / "model" / "modeling_recurrent.py").is_file()
    assert (tmp_path / "a" / "loss.png").is_file()
    depths = {h["n"] + h["k"] for h in read_json(tmp_path / "a" / "history.json")}
    assert len(depths) > 1  # the depth is drawn per step


def test_core_only_training_moves_only_the_adapter_and_the_core(make_model, tokenizer, tmp_path):
    _, _, m = _recurrent(make_model, prelude=1, core_start=2, core_len=2)
    before = {n: p.clone() for n, p in m.named_parameters()}
    cfg = dataclasses.replace(CFG, steps=2, trainable="core")
    train_recurrent(m, tokenizer, TEXTS, tmp_path / "t", cfg, progress=False)
    changed = {n for n, p in m.named_parameters() if not torch.equal(p, before[n])}
    assert "adapter.weight" in changed
    assert all(n == "adapter.weight" or n.startswith(("model.layers.1.", "model.layers.2."))
               for n in changed), changed


class Stop(Exception):
    pass


def test_resume_after_interruption_equals_an_uninterrupted_run(make_model, tokenizer, tmp_path):
    _train(make_model, tokenizer, tmp_path / "a", CFG)

    def stop(step, loss):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        _train(make_model, tokenizer, tmp_path / "b", CFG, on_step=stop)
    _train(make_model, tokenizer, tmp_path / "b", CFG)  # a fresh process would rebuild it like this
    wa = load_file(str(tmp_path / "a/model/model.safetensors"))
    wb = load_file(str(tmp_path / "b/model/model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert read_json(tmp_path / "a" / "history.json") == read_json(tmp_path / "b" / "history.json")
    with pytest.raises(ValueError, match="different settings"):
        _train(make_model, tokenizer, tmp_path / "b", dataclasses.replace(CFG, lr=1e-3))
