"""What a model costs to hold: parameters and the KV cache it fills."""

from __future__ import annotations

import torch

from ..data.collate import pad_batch
from ..models.adapters import output_cache


@torch.no_grad()
def kv_cache_bytes(model, tokenizer, prompts: list[list[int]]) -> int:
    """Bytes of K and V the cache holds after prefilling ``prompts`` (one left-padded batch).

    Raises:
        ValueError: the model keeps no KV cache (a retrofitted recurrent model).
    """
    b = pad_batch([{"input_ids": p} for p in prompts], tokenizer.pad_token_id, side="left")
    device = next(model.parameters()).device
    return cache_bytes(_prefill_cache(model, **{k: v.to(device) for k, v in b.items()}))


def cache_bytes(cache) -> int:
    """Bytes of a transformers cache's K and V tensors, with an ELM's per-iteration slots."""
    total = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers
                if isinstance(getattr(l, "keys", None), torch.Tensor))
    return total + sum(cache_bytes(c) for c in getattr(cache, "_elm_iteration_slots", {}).values())


@torch.no_grad()
def kv_bytes_at(model, tokens: int = 4096, bytes_per_value: int = 2) -> int:
    """KV-cache bytes of one sequence of ``tokens`` tokens, at ``bytes_per_value`` (2: 16-bit).

    Measured on a real cache of a one-token prefill, per cache layer: a full-attention layer holds
    every token, a sliding-window layer the last window - 1 (as transformers' sliding layers keep).
    So pruned KV heads, removed layers and an ELM's one slot (or per-iteration slots) all count.

    Raises:
        ValueError: the model keeps no KV cache (a retrofitted recurrent model: it recomputes the
            sequence at every step instead, so no figure in bytes would be honest).
    """
    device = next(model.parameters()).device
    cache = _prefill_cache(model, input_ids=torch.ones(1, 1, dtype=torch.long, device=device))
    per_value = next(model.parameters()).element_size()

    def held(c) -> int:  # bytes of one token's K and V, scaled to what each layer holds
        total = 0
        for layer in c.layers:
            if not isinstance(getattr(layer, "keys", None), torch.Tensor):
                continue
            n = min(tokens, layer.sliding_window - 1) if getattr(layer, "is_sliding", False) else tokens
            total += (layer.keys.nbytes + layer.values.nbytes) * n
        return total + sum(held(x) for x in getattr(c, "_elm_iteration_slots", {}).values())

    return held(cache) // per_value * bytes_per_value


def _prefill_cache(model, **inputs):
    """The cache a forward with ``use_cache=True`` fills; a model that keeps none is refused rather
    than counted as holding 0 bytes."""
    cache = output_cache(model(**inputs, use_cache=True))
    if cache is None:
        why = (": it recomputes the whole sequence at every step, so its cost is compute (layer "
               "evaluations per token), not cache memory") if model.config.model_type == "recurrent" else ""
        raise ValueError(f"{type(model).__name__} keeps no KV cache{why}")
    return cache
