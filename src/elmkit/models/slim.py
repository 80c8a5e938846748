"""Cutting a dense model into the slim format: keep some query heads, KV heads and MLP channels per
layer, copy exactly those slices, and get a ``SlimForCausalLM`` with physically smaller tensors.

    keep = [LayerKeep(q_heads=[0, 1, 3], kv_heads=[0, 1], channels=range(0, 96)), ...]
    slim = to_slim(model, keep)            # dense (or slim) model -> SlimForCausalLM

Query head h of a GQA layer reads KV head h // (n_q / n_kv) in the dense model; every kept query
head's KV head must be kept too, and it is renumbered among the kept ones (``q_to_kv``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .adapters import get_layers
from .configuration_slim import SlimConfig
from .modeling_slim import SlimForCausalLM


@dataclass
class LayerKeep:
    """What one layer keeps, as indices into its current (dense) tensors."""

    q_heads: Sequence[int]
    """Query heads kept ([] removes the attention branch)."""
    kv_heads: Sequence[int]
    """KV heads kept (must cover the kept query heads' groups)."""
    channels: Sequence[int]
    """MLP channels kept ([] removes the MLP branch)."""
    o_bias: torch.Tensor | None = None
    """Output bias of o_proj, (d,) (FLAP's compensation), or None."""
    down_bias: torch.Tensor | None = None
    """Output bias of down_proj, (d,), or None."""
    meta: dict = field(default_factory=dict)
    """Free-form notes (scores, ...), not stored in the model."""


def full_keep(model) -> list[LayerKeep]:
    """Everything kept: ``to_slim(model, full_keep(model))`` is the same function as ``model``."""
    c = model.config
    return [LayerKeep(range(c.num_attention_heads), range(c.num_key_value_heads), range(c.intermediate_size))
            for _ in get_layers(model)]


@torch.no_grad()
def to_slim(model, keep: Sequence[LayerKeep]) -> SlimForCausalLM:
    """A SlimForCausalLM holding exactly the kept slices of a dense family model."""
    if getattr(model.config, "model_type", None) == "slim":
        raise ValueError("to_slim cuts a dense model; cut the slim model's dense original instead")
    c = model.config
    layers = get_layers(model)
    if len(keep) != len(layers):
        raise ValueError(f"keep has {len(keep)} entries for {len(layers)} layers")
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    group = c.num_attention_heads // c.num_key_value_heads
    specs = []
    for i, k in enumerate(keep):
        q, kv = [int(h) for h in k.q_heads], [int(g) for g in k.kv_heads]
        if len(set(q)) != len(q) or len(set(kv)) != len(kv):
            raise ValueError(f"layer {i}: repeated head indices")
        missing = sorted({h // group for h in q} - set(kv))
        if missing:
            raise ValueError(f"layer {i}: kept query heads read KV heads {missing}, which are not kept")
        if not q:
            kv = []
        specs.append({"q_to_kv": [kv.index(h // group) for h in q], "num_key_value_heads": len(kv),
                      "intermediate_size": len(k.channels), "o_bias": k.o_bias is not None,
                      "down_bias": k.down_bias is not None})
    config = SlimConfig.from_base(c, specs)
    config._attn_implementation = c._attn_implementation
    slim = SlimForCausalLM(config).to(dtype=next(model.parameters()).dtype)
    src, dst = model.state_dict(), slim.state_dict()
    for name, t in dst.items():  # embeddings, final norm, head, layer norms: copied whole
        if ".layers." not in name and name in src:
            t.copy_(src[name])
    for i, (k, spec) in enumerate(zip(keep, specs)):
        a, b = layers[i], slim.model.layers[i]
        b.input_layernorm.load_state_dict(a.input_layernorm.state_dict())
        b.post_attention_layernorm.load_state_dict(a.post_attention_layernorm.state_dict())
        if spec["q_to_kv"]:
            rows_q = head_rows(k.q_heads, hd)
            rows_kv = head_rows(k.kv_heads, hd)
            sa, sb = a.self_attn, b.self_attn
            _copy(sb.q_proj, sa.q_proj, rows=rows_q)
            _copy(sb.k_proj, sa.k_proj, rows=rows_kv)
            _copy(sb.v_proj, sa.v_proj, rows=rows_kv)
            _copy(sb.o_proj, sa.o_proj, cols=rows_q, bias=k.o_bias)
            for norm in ("q_norm", "k_norm"):  # Qwen3: per-head_dim weights, shared by heads
                if hasattr(sa, norm):
                    getattr(sb, norm).load_state_dict(getattr(sa, norm).state_dict())
        elif k.o_bias is not None:  # attention gone, its compensation stays as a constant
            b.self_attn.bias.copy_(k.o_bias + (a.self_attn.o_proj.bias if a.self_attn.o_proj.bias is not None
                                               else 0))
        if spec["intermediate_size"]:
            ch = torch.as_tensor(list(k.channels), dtype=torch.long)
            _copy(b.mlp.gate_proj, a.mlp.gate_proj, rows=ch)
            _copy(b.mlp.up_proj, a.mlp.up_proj, rows=ch)
            _copy(b.mlp.down_proj, a.mlp.down_proj, cols=ch, bias=k.down_bias)
        elif k.down_bias is not None:
            b.mlp.bias.copy_(k.down_bias + (a.mlp.down_proj.bias if a.mlp.down_proj.bias is not None else 0))
    if getattr(c, "tie_word_embeddings", False):
        slim.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        slim.generation_config = copy.deepcopy(model.generation_config)
    return slim.eval()


def head_rows(heads: Sequence[int], hd: int) -> torch.Tensor:
    """Row indices of whole heads: head h owns rows [h * hd, (h + 1) * hd)."""
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads]) if len(heads) else \
        torch.zeros(0, dtype=torch.long)


def _copy(dst: torch.nn.Linear, src: torch.nn.Linear, rows=None, cols=None, bias=None) -> None:
    w = src.weight
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    dst.weight.copy_(w)
    if dst.bias is not None:
        if bias is not None:  # a new output bias (FLAP)
            dst.bias.copy_(bias + (src.bias if src.bias is not None and cols is not None else 0))
        elif src.bias is not None:
            dst.bias.copy_(src.bias[rows] if rows is not None else src.bias)
        else:
            dst.bias.zero_()
