"""What differs between the transformers releases elmkit supports (5.17 on), decided once.

transformers 5.24 renamed the KV-cache argument of every model forward, decoder layer, attention
module and mask builder (``create_causal_mask``, ``create_sliding_window_causal_mask``) from
``past_key_values`` to ``cache``, and the field of model outputs with it. The old name still works
there with a FutureWarning, removal announced for 5.40. Two traps of mixing the names:

* a layer subclass whose forward names ``past_key_values`` receives the backbone's cache in
  ``**kwargs`` under ``cache``, and the parent forward then *prefers that one*, silently bypassing
  anything the subclass did to its own cache (an ELM's per-evaluation crop);
* an output built with ``past_key_values=`` is renamed with a warning per call.

So nothing in elmkit spells either name: every call site goes through ``CACHE`` (or the helpers
below). The detection reads the mask builder's signature, the one function renamed alongside the
rest that has no deprecation wrapper in front of it; ``tests/test_adapters.py`` checks on the
installed release that layers, attention and outputs agree with it.

This file is saved next to ELM and slim weights (remote code), so it imports transformers only.
"""

import inspect

from transformers.masking_utils import create_causal_mask

CACHE: str = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
"""Keyword of the KV cache in forward calls and model outputs on the installed transformers."""

_ALIASES = ("cache", "past_key_values")


def cache_kw(cache) -> dict:
    """``{CACHE: cache}``: splat into a model, layer, attention or mask-builder call."""
    return {CACHE: cache}


def pop_cache(kwargs: dict):
    """Take the cache out of a forward's ``**kwargs`` under either name (None when absent)."""
    found = [kwargs.pop(name) for name in _ALIASES if name in kwargs]
    found = [c for c in found if c is not None]
    if len(found) > 1 and found[0] is not found[1]:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`, not both")
    return found[0] if found else None


def output_cache(output):
    """The cache a model output carries (None when it carries none)."""
    return getattr(output, CACHE, None)
