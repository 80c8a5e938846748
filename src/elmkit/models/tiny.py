"""Tiny randomly initialised models of each supported family, built from config (tests, demos)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .adapters import FAMILIES


def tiny_config(
    family: str = "qwen2",
    vocab_size: int = 259,
    num_layers: int = 6,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    **overrides,
):
    """A small config of ``family`` (GQA when num_kv_heads < num_heads)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    kw = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=256, bos_token_id=None, eos_token_id=258, tie_word_embeddings=False,
    )
    if family == "qwen3":
        kw["head_dim"] = hidden_size // num_heads
    kw.update(overrides)
    return AutoConfig.for_model(family, **kw)


def tiny_model(family: str = "qwen2", seed: int = 0, **kw) -> PreTrainedModel:
    """A seeded random model from :func:`tiny_config`, in fp32 and eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **kw), dtype=torch.float32)
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model.eval()
