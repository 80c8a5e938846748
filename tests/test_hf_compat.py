"""The transformers-version table (models/hf_compat.py): one decision, true on the installed release.

transformers 5.24 renamed the cache argument (`past_key_values` -> `cache`). Mixing the names
broke nothing loudly: an ELM's block read an uncropped cache and a slim model's generation drifted.
These tests pin the invariants that caught it, on whatever release is installed.
"""

import copy
import inspect
import warnings

import pytest
import torch
from checks import assert_cached_equals_full, cached_and_full
from test_slim import _random_keep
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from elmkit.methods import elm as E
from elmkit.models import get_layers, to_slim
from elmkit.models.adapters import CACHE, output_cache, pop_cache
from elmkit.models.hf_compat import cache_kw


def _ids(B=2, T=9, seed=1):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


def test_cache_keyword_matches_every_signature_it_stands_for(make_model, family):
    model = make_model(family)
    layer = get_layers(model)[0]
    for fn in (type(model).forward, type(model.model).forward, type(layer).forward,
               type(layer.self_attn).forward, create_causal_mask, create_sliding_window_causal_mask):
        assert CACHE in inspect.signature(fn).parameters, fn.__qualname__
    for out in (BaseModelOutputWithPast, CausalLMOutputWithPast):
        assert CACHE in out.__dataclass_fields__


def _models(make_model, family):
    """dense, ELM one-step, ELM per-iteration, slim: every kind of model elmkit writes."""
    dense = make_model(family, num_layers=6).eval()
    one = E.apply_(copy.deepcopy(dense), E.plan(dense, start=2, span=3, max_iter=3))
    per = E.apply_(copy.deepcopy(dense), E.plan(dense, start=2, span=3, max_iter=3, kv_mode="per_iter"))
    slim = to_slim(copy.deepcopy(dense), _random_keep(dense))
    return {"dense": dense, "elm": one.eval(), "elm_per_iter": per.eval(), "slim": slim.eval()}


def test_no_deprecated_call_and_cached_equals_full(make_model, family):
    for name, model in _models(make_model, family).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # a deprecated name anywhere fails here
            if name == "elm":  # one-step K/V is exact only at convergence (test_elm_model.py)
                cached_and_full(model, prompt_len=5, new=5)
            else:
                assert_cached_equals_full(model, prompt_len=5, new=5)


def test_elm_block_keeps_one_slot_per_token_and_default_cache_changes_nothing(make_model, family):
    m = _models(make_model, family)["elm"]
    ids = _ids()
    with torch.no_grad():
        out = m(ids, use_cache=True)
        plain = m(ids).logits  # the config's use_cache (on) as a user calls it
        nocache = m(ids, use_cache=False).logits
    cache = output_cache(out)
    # one-step KV: every evaluation overwrites the block's slot, so it holds T entries, not iters x T
    assert cache.layers[m.config.start].keys.shape[-2] == ids.shape[1]
    assert m.block.last_info is not None
    torch.testing.assert_close(plain, nocache, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, nocache, atol=1e-6, rtol=0)


def test_pop_cache_takes_either_name_once():
    c = object()
    for name in ("cache", "past_key_values"):
        kw = {name: c, "other": 1}
        assert pop_cache(kw) is c and kw == {"other": 1}
    assert pop_cache({}) is None and pop_cache({"cache": None, "past_key_values": c}) is c
    with pytest.raises(ValueError, match="not both"):
        pop_cache({"cache": c, "past_key_values": object()})
    assert cache_kw(c) == {CACHE: c}
