import copy
import json
import os

import pytest
import torch
from checks import assert_loads_with_remote_code_only, cached_and_full
from transformers import AutoModelForCausalLM

from elmkit.methods import elm as E
from elmkit.models import ElmConfig, layer_inputs, run_layers
from elmkit.models.adapters import output_cache
from elmkit.solvers import NonFiniteError


def _ids(B=2, T=9, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def _elm(make_model, family="qwen2", n=6, start=2, span=2, **settings):
    dense = make_model(family, num_layers=n)
    ref = copy.deepcopy(dense)
    return ref, E.apply_(dense, E.plan(dense, start=start, span=span, **settings))


def test_identity_at_init_with_one_layer_and_one_iteration(make_model, family):
    ref, m = _elm(make_model, family, span=1, max_iter=1)
    ids, mask = _ids(), torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(m(ids, attention_mask=mask).logits,
                                   ref(ids, attention_mask=mask).logits, atol=1e-5, rtol=0)


def test_first_iteration_reproduces_dense_layer_start(make_model, family):
    ref, m = _elm(make_model, family, start=1, span=3)
    ids = _ids()
    with torch.no_grad():
        ctx = layer_inputs(ref, ids)
        h = run_layers(ref, ctx.hidden, ctx, 0, 1)
        want = run_layers(ref, h, ctx, 1, 2)
        mask = next(iter(ctx.masks.values()))  # one mask kind per tiny family
        got = m.block.phi(torch.zeros_like(h), h, attention_mask=mask,
                          position_ids=ctx.position_ids, position_embeddings=ctx.position_embeddings)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_only_kept_layers_and_the_block_remain(make_model):
    dense = make_model("qwen2", num_layers=8)
    per_layer = sum(p.numel() for p in dense.model.layers[0].parameters())
    total = sum(p.numel() for p in dense.parameters())
    m = E.apply_(dense, E.plan(dense, start=2, span=4))
    d = m.config.hidden_size
    assert m.config.num_hidden_layers == 5 and len(m.model.layers) == 5
    assert [l.self_attn.layer_idx for l in m.model.layers] == list(range(5))
    assert sum(p.numel() for p in m.parameters()) == total - 3 * per_layer + 2 * d * d + d
    assert len(dense.model.layers) == 0  # the dense shell no longer holds the replaced layers


def test_per_iteration_cache_equals_full_recomputation(make_model, family):
    _, m = _elm(make_model, family, span=3, max_iter=3, kv_mode="per_iter")
    cached, full, past = cached_and_full(m, prompt_len=6, new=5)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)
    assert len(past._elm_iteration_slots[2].layers) == 2  # iterations 2 and 3 have their own slots


def test_one_step_cache_matches_when_the_block_converges(make_model, family):
    _, m = _elm(make_model, family, span=3, max_iter=60, tol=1e-7)
    cached, full, past = cached_and_full(m, prompt_len=6, new=5)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    lengths = {layer.keys.shape[-2] for layer in past.layers}
    assert lengths == {past.get_seq_length()}  # the block's slot was overwritten, not appended


def test_kv_cache_bytes_are_n_minus_m_plus_one_over_n(make_model):
    ref, m = _elm(make_model, "qwen2", n=8, start=2, span=4, max_iter=3)
    ids = _ids(2, 11)
    with torch.no_grad():
        kv = lambda c: sum(l.keys.nbytes + l.values.nbytes for l in c.layers)  # noqa: E731
        dense_bytes = kv(output_cache(ref(ids, use_cache=True)))
        elm_bytes = kv(output_cache(m(ids, use_cache=True)))
    assert elm_bytes * 8 == dense_bytes * (8 - 4 + 1)


@pytest.mark.parametrize("solver", ["naive", "anderson", "broyden"])
def test_adaptive_stopping_at_batch_size_above_one(make_model, solver):
    _, m = _elm(make_model, "qwen2", span=3, max_iter=40, tol=1e-4, solver=solver)
    ids, mask = _ids(3, 10), torch.ones(3, 10, dtype=torch.long)
    mask[1, :4] = 0  # left padding in a batch
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    info = m.block.last_info
    assert out.shape == (3, 14)
    assert info.iterations.shape == (3, 1) and bool(info.converged.all())
    assert int(info.iterations.max()) < 40


def test_save_load_in_process_and_with_remote_code_only(make_model, tmp_path):
    _, m = _elm(make_model, "qwen2", span=2, max_iter=3)
    ids = _ids()
    with torch.no_grad():
        want = m(ids).logits
    m.save_pretrained(tmp_path / "elm")
    files = set(os.listdir(tmp_path / "elm"))
    assert {"model.safetensors", "config.json", "modeling_elm.py", "configuration_elm.py",
            "elm_solvers.py"} <= files
    cfg = json.loads((tmp_path / "elm" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_elm.ElmForCausalLM"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "elm").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, atol=0, rtol=0)

    assert_loads_with_remote_code_only(tmp_path / "elm", ids, want, tmp_path)


def test_bad_input_gives_clear_errors(make_model):
    dense = make_model("qwen2", num_layers=6)
    with pytest.raises(ValueError, match="exceeds the 6 layers"):
        E.plan(dense, start=4, span=3)
    with pytest.raises(ValueError, match="span M must be >= 1"):
        E.plan(dense, start=1, span=0)
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        E.plan(dense, start=1, span=2, solver="newton")
    with pytest.raises(ValueError, match="set tol=0"):
        E.plan(dense, start=1, span=2, kv_mode="per_iter", tol=1e-3)
    with pytest.raises(ValueError, match="must be smaller than the 6"):
        ElmConfig(dense_num_hidden_layers=6, start=0, span=6)


def test_divergence_is_reported_with_token_and_iteration(make_model):
    _, m = _elm(make_model, "qwen2", span=2, max_iter=50)
    with torch.no_grad():
        m.block.proj.weight[:, :32] = torch.eye(32) * 1e4  # W_z huge: the iteration explodes
        with pytest.raises(NonFiniteError, match=r"iteration \d+ produced NaN/inf at batch row"):
            m(_ids())


def test_cache_bytes_counts_per_iteration_slots(make_model):
    """footprint.cache_bytes counts the block's extra per-iteration slots: N - M + max_iter."""
    from elmkit.eval.footprint import cache_bytes

    ref, m = _elm(make_model, "qwen2", n=8, start=2, span=4, max_iter=3, kv_mode="per_iter")
    ids = _ids(2, 11)
    with torch.no_grad():
        dense_bytes = cache_bytes(output_cache(ref(ids, use_cache=True)))
        elm_bytes = cache_bytes(output_cache(m(ids, use_cache=True)))
    assert elm_bytes * 8 == dense_bytes * (8 - 4 + 3)


@pytest.mark.parametrize("family,kw", [("qwen2", {}), ("mistral", {"sliding_window": 4})])
def test_kv_bytes_at_equals_a_real_long_cache(make_model, family, kw):
    """kv_bytes_at(T) = the cache of a T-token prefill in 16-bit, sliding windows and ELM slots too."""
    from elmkit.eval.footprint import cache_bytes, kv_bytes_at

    ids = torch.randint(1, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    dense = make_model(family, **kw)
    for m in (dense, E.apply_(make_model(family, **kw), E.plan(dense, start=1, span=3, max_iter=2,
                                                               kv_mode="per_iter"))):
        with torch.no_grad():
            real = cache_bytes(output_cache(m(ids, use_cache=True)))  # fp32: 4 bytes per value
        assert kv_bytes_at(m, 40) == real // 2
        assert kv_bytes_at(m, 40, bytes_per_value=4) == real
