"""LLM-Pruner, block-wise (Ma, Fang, Wang, NeurIPS 2023, arXiv 2305.11627).

Coupled structures are pruned together (dependency groups):
* an attention group is one KV head with the query heads that read it: its k/v rows, their q rows
  and o_proj columns (GQA-aware: grouping survives because whole groups go);
* an MLP group is one channel: its gate_proj and up_proj rows and its down_proj column.

Importance is first-order Taylor on the calibration loss L, per element then summed over the group:

    param_first:  I = sum_{w in group} |w * dL/dw|
    vectorize:    I = |sum_{w in group} w * dL/dw|

In every layer of [layer_start, layer_end) (default: all but the first 4 and the last 2, as the
official scripts) the ``ratio`` fraction of lowest-importance attention groups and of MLP channels
are removed (local, one shot). The result is a slim model. Difference from the official code, on
purpose: the gradient uses the calibration's target tokens only (all tokens for plain text) and no
padding.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from ..data.calibration import Calibration
from ..models.adapters import get_layers
from ..models.slim import LayerKeep, to_slim
from .common import loss_gradients, non_embedding_parameters


@dataclass(frozen=True)
class LLMPrunerConfig:
    """What LLM-Pruner removes, where, and how it scores."""

    ratio: float = 0.25
    """Fraction of attention groups and of MLP channels removed in each pruned layer."""
    layer_start: int = 4
    """First layer that is pruned."""
    layer_end: int | None = None
    """Layer after the last pruned one (default: N - 2)."""
    taylor: Literal["param_first", "vectorize"] = "param_first"
    """Element importance |w g| summed over the group, or |sum w g|."""
    batch_size: int = 8
    """Calibration sequences per forward/backward pass."""

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError("--ratio must be in [0, 1)")
        if self.layer_start < 0 or (self.layer_end is not None and self.layer_end <= self.layer_start):
            raise ValueError("--layer-start must be >= 0 and --layer-end > --layer-start")
        if self.taylor not in ("param_first", "vectorize"):
            raise ValueError("--taylor must be param_first or vectorize")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")


@dataclass(frozen=True)
class LLMPrunerPlan:
    layers: tuple[dict, ...]
    """Per layer: kept q_heads, kv_heads, channels."""
    attn_scores: tuple[tuple[float, ...] | None, ...]
    """Per layer: importance of every KV group (None outside the pruned range)."""
    mlp_scores: tuple[tuple[float, ...] | None, ...]
    """Per layer: importance of every MLP channel (None outside the pruned range)."""


def plan(model, calib: Calibration, cfg: LLMPrunerConfig, progress: bool = False) -> LLMPrunerPlan:
    c = model.config
    n = c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    group = c.num_attention_heads // c.num_key_value_heads
    end = cfg.layer_end if cfg.layer_end is not None else n - 2
    if not cfg.layer_start < end <= n:
        raise ValueError(f"pruned layers [{cfg.layer_start}, {end}) are not inside 0..{n}")
    grads = loss_gradients(model, calib, cfg.batch_size)
    # element scores w * g are summed over a group: |.| first (param_first) or after (vectorize)
    reduce = (lambda t, dim: t.abs().sum(dim)) if cfg.taylor == "param_first" else (lambda t, dim: t.sum(dim))
    layers, attn_scores, mlp_scores = [], [], []
    with torch.no_grad():
        for i, layer in enumerate(get_layers(model)):
            q_all, kv_all = list(range(c.num_attention_heads)), list(range(c.num_key_value_heads))
            ch_all = list(range(c.intermediate_size))
            if not cfg.layer_start <= i < end:
                layers.append({"q_heads": q_all, "kv_heads": kv_all, "channels": ch_all})
                attn_scores.append(None)
                mlp_scores.append(None)
                continue
            a, m = layer.self_attn, layer.mlp

            def s(p):
                return _wg(p, grads)

            # per query head: q rows (+ bias) and o columns; per KV head: k, v rows (+ biases)
            q_head = reduce(s(a.q_proj.weight).view(c.num_attention_heads, hd, -1), (1, 2))
            o_head = reduce(s(a.o_proj.weight).view(-1, c.num_attention_heads, hd), (0, 2))
            k_head = reduce(s(a.k_proj.weight).view(c.num_key_value_heads, hd, -1), (1, 2))
            v_head = reduce(s(a.v_proj.weight).view(c.num_key_value_heads, hd, -1), (1, 2))
            for lin, target in ((a.q_proj, "q"), (a.k_proj, "k"), (a.v_proj, "v")):
                if lin.bias is not None:
                    b = reduce(s(lin.bias).view(-1, hd), (1,))
                    if target == "q":
                        q_head = q_head + b
                    elif target == "k":
                        k_head = k_head + b
                    else:
                        v_head = v_head + b
            per_q = q_head + o_head  # (n_q,)
            kv_score = k_head + v_head + per_q.view(c.num_key_value_heads, group).sum(1)  # (n_kv,)
            if cfg.taylor == "vectorize":
                kv_score = kv_score.abs()
            ch_score = reduce(s(m.gate_proj.weight), (1,)) + reduce(s(m.up_proj.weight), (1,)) + \
                reduce(s(m.down_proj.weight), (0,))
            if cfg.taylor == "vectorize":
                ch_score = ch_score.abs()
            k_kv = round(cfg.ratio * c.num_key_value_heads)
            k_ch = round(cfg.ratio * c.intermediate_size)
            kv_keep = sorted(sorted(kv_all, key=lambda g: (-float(kv_score[g]), g))[:len(kv_all) - k_kv])
            ch_keep = sorted(sorted(ch_all, key=lambda j: (-float(ch_score[j]), j))[:len(ch_all) - k_ch])
            q_keep = [h for h in q_all if h // group in set(kv_keep)]
            layers.append({"q_heads": q_keep, "kv_heads": kv_keep, "channels": ch_keep})
            attn_scores.append(tuple(kv_score.tolist()))
            mlp_scores.append(tuple(ch_score.tolist()))
    return LLMPrunerPlan(tuple(layers), tuple(attn_scores), tuple(mlp_scores))


def _wg(p: torch.Tensor, grads: dict) -> torch.Tensor:
    """w * dL/dw in float64 (zeros for a parameter the loss does not reach)."""
    return p.double() * grads[p].double() if p in grads else torch.zeros_like(p, dtype=torch.double)


def apply_(model, p: LLMPrunerPlan):
    """The slim model of the plan (a new model; ``model`` is left as it is)."""
    return to_slim(model, [LayerKeep(l["q_heads"], l["kv_heads"], l["channels"]) for l in p.layers])


def compress_(model, calib: Calibration, cfg: LLMPrunerConfig, train=None, progress: bool = True,
              folder=None):
    """plan + apply_; returns (slim model, plan, stats) — the model is replaced, not edited.
    Training-free here (LoRA recovery is ``elmkit finetune`` / compare's --heal lora); ``train``
    and ``folder`` are not used."""
    p = plan(model, calib, cfg)
    return apply_(model, p), p, {}


def for_target(base: LLMPrunerConfig, model, fraction: float) -> LLMPrunerConfig:
    """The config that removes ``fraction`` of the non-embedding parameters: the per-layer ratio
    that many parameters take from the pruned layers alone."""
    n = model.config.num_hidden_layers
    end = base.layer_end if base.layer_end is not None else n - 2
    pruned = max(0, min(end, n) - base.layer_start)
    per_layer = _layer_parameters(model)
    ratio = fraction * non_embedding_parameters(model) / (pruned * per_layer) if pruned else 1.0
    if not ratio < 1:
        raise ValueError(f"LLM-Pruner cannot remove {fraction:.0%} of the non-embedding parameters from "
                         f"layers [{base.layer_start}, {end}) alone")
    return replace(base, ratio=ratio)


def _layer_parameters(model) -> int:
    """Attention + MLP parameters of one (dense) decoder layer."""
    layer = get_layers(model)[0]
    return sum(p.numel() for m in (layer.self_attn, layer.mlp) for p in m.parameters())
