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


def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> list[list[int]]:
    """Greedy continuations (token ids, stop token excluded) for tokenized prompts, in order."""
    return [o[0] for o in generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress)]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[list[int]]]:
    """``samples`` continuations per prompt (greedy when temperature is 0), stop token excluded.

    Prompts are sorted by length so that each batch pads little, then restored to input order.
    ``batch_size`` counts sequences, so a batch holds batch_size // samples prompts.
    """
    if batch_size < 1 or max_new_tokens < 1 or samples < 1:
        raise ValueError("batch_size, max_new_tokens and samples must be positive")
    if temperature == 0 and samples > 1:
        raise ValueError("greedy decoding gives one sample per prompt; set a temperature > 0")
    device = next(model.parameters()).device
    stops = stop_token_ids(model, tokenizer)
    if not stops:
        raise ValueError("neither the tokenizer nor the generation config names an eos token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per_batch = max(1, batch_size // samples)
    outputs: list[list[list[int]]] = [[] for _ in prompts]
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else \
        dict(do_sample=False)
    torch.manual_seed(seed)
    bar = tqdm(total=len(prompts), desc="generate", disable=not progress, leave=False)
    for s in range(0, len(order), per_batch):
        idx = order[s:s + per_batch]
        batch = pad_batch([{"input_ids": list(prompts[i])} for i in idx], pad, side="left")
        out = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
            use_cache=True,
            eos_token_id=stops,
            pad_token_id=pad,
            **sampling,
        )
        new = out[:, batch["input_ids"].shape[1]:].tolist()  # (B * samples, <=max_new_tokens)
        for j, toks in enumerate(new):
            cut = next((k for k, t in enumerate(toks) if t in stops), len(toks))
            outputs[idx[j // samples]].append(toks[:cut])
        bar.update(len(idx))
    bar.close()
    return outputs
