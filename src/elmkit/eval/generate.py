"""Batched greedy generation with left padding and the KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..data.collate import pad_batch


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the tokenizer's eos and the generation config's."""
    ids = set()
    for src in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        ids.update(src if isinstance(src, (list, tuple)) else [src])
    return sorted(ids)


@torch.no_grad()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> list[list[int]]:
    """Greedy continuations (token ids, stop token excluded) for tokenized prompts, in order.

    Prompts are sorted by length so that each batch pads little, then restored to input order.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be positive")
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    if not stops:
        raise ValueError("neither the tokenizer nor the generation config names an eos token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress, leave=False)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = pad_batch([{"input_ids": list(prompts[i])} for i in idx], pad, side="left")
        out = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=stops,
            pad_token_id=pad,
        )
        new = out[:, batch["input_ids"].shape[1]:].tolist()  # (B, <=max_new_tokens)
        for i, toks in zip(idx, new):
            cut = next((k for k, t in enumerate(toks) if t in stops), len(toks))
            outputs[i] = toks[:cut]
        bar.update(len(idx))
    bar.close()
    return outputs
