"""FLAP: fluctuation-based adaptive structured pruning (An et al., AAAI 2024, arXiv 2312.11983).

For every input channel j of o_proj (attention) and down_proj (MLP), over calibration tokens:

    S_j = Var(x_j) * ||W[:, j]||^2                                   (WIFV)

standardised per layer and module (z-scores); an attention head scores the mean z of its head_dim
channels. All heads and MLP channels of all layers compete under one global threshold, each weighted
by the parameters it frees, until ``ratio`` of the attention + MLP parameters are gone; then the
removed inputs' mean is folded into a new output bias,

    b = W[:, removed] @ mean(x[removed])

so that the layer's output keeps its average. Training-free; the result is a slim model (per-layer
widths). As in the official code, attention channel scores are squared before standardising
(``attn_square``). Our choices where the official code has none (it supports neither GQA nor
head_dim != 128): a query head frees its q rows and o columns plus its share of its KV head, and a KV
head goes when all of its query heads have gone; padding is excluded from the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..data.calibration import Calibration
from ..models.adapters import get_layers
from ..models.slim import LayerKeep, to_slim
from .common import module_inputs, non_embedding_parameters


@dataclass(frozen=True)
class FLAPConfig:
    """How much FLAP removes."""

    ratio: float = 0.2
    """Fraction of attention + MLP parameters to remove."""
    attn_square: bool = True
    """Square attention channel scores before standardising (the official code)."""
    batch_size: int = 8
    """Calibration sequences per forward pass."""

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise ValueError("--ratio must be in [0, 1)")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")


@dataclass(frozen=True)
class FLAPPlan:
    layers: tuple[dict, ...]
    """Per layer: kept q_heads, kv_heads, channels."""
    attn_mean: tuple[tuple[float, ...], ...]
    """Per layer: mean of every o_proj input channel (for the bias)."""
    mlp_mean: tuple[tuple[float, ...], ...]
    """Per layer: mean of every down_proj input channel (for the bias)."""
    removed_fraction: float
    """Attention + MLP parameters removed / their total."""


@torch.no_grad()
def channel_stats(model, calib: Calibration, batch_size: int = 8) -> list[dict]:
    """Per layer: mean and variance of the inputs of o_proj and down_proj over non-pad tokens."""
    device = next(model.parameters()).device
    layers = get_layers(model)
    acc = [{} for _ in layers]

    def add(key, x):
        i, name = key
        x = x.double()  # (tokens, channels)
        s = acc[i].setdefault(name, [0, 0.0, 0.0])
        s[0] += x.shape[0]
        s[1] = s[1] + x.sum(0)
        s[2] = s[2] + (x * x).sum(0)

    modules = {(i, kind): lin for i, layer in enumerate(layers)
               for kind, lin in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj))}
    module_inputs(model, modules, calib.batches(batch_size, device), add)
    out = []
    for a in acc:
        st = {}
        for name, (n, s1, s2) in a.items():
            mean = s1 / n
            st[name] = (mean, (s2 - n * mean * mean) / max(n - 1, 1))  # sample variance
        out.append(st)
    return out


@torch.no_grad()
def plan(model, calib: Calibration, cfg: FLAPConfig, progress: bool = False) -> FLAPPlan:
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    group = c.num_attention_heads // c.num_key_value_heads
    d = c.hidden_size
    stats = channel_stats(model, calib, cfg.batch_size)
    units = []  # (score, cost, layer, kind, index)
    for i, (layer, st) in enumerate(zip(get_layers(model), stats)):
        for kind, lin in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            mean, var = st[kind]
            # (channels,); the statistics live on the model's device
            s = var.double().cpu() * lin.weight.double().pow(2).sum(0).cpu()
            if kind == "attn" and cfg.attn_square:
                s = s * s
            z = (s - s.mean()) / (s.std() + 1e-12)
            if kind == "attn":
                head_z = z.view(-1, hd).mean(1)  # (heads,)
                cost = (2 + 2 / group) * hd * d  # q rows + o columns + a share of k, v
                units += [(float(head_z[h]), cost, i, "head", h) for h in range(c.num_attention_heads)]
            else:
                units += [(float(z[j]), 3 * d, i, "channel", j) for j in range(c.intermediate_size)]
    total = sum(u[1] for u in units)
    budget, kept = (1 - cfg.ratio) * total, set()
    used = 0.0
    for _score, cost, i, kind, j in sorted(units, key=lambda u: (-u[0], u[2], u[3], u[4])):
        if used + cost > budget:
            continue
        kept.add((i, kind, j))
        used += cost
    layers = []
    for i in range(c.num_hidden_layers):
        q = [h for h in range(c.num_attention_heads) if (i, "head", h) in kept]
        kv = sorted({h // group for h in q})
        ch = [j for j in range(c.intermediate_size) if (i, "channel", j) in kept]
        layers.append({"q_heads": q, "kv_heads": kv, "channels": ch})
    return FLAPPlan(tuple(layers), tuple(tuple(st["attn"][0].tolist()) for st in stats),
                    tuple(tuple(st["mlp"][0].tolist()) for st in stats), 1 - used / total)


@torch.no_grad()
def compensation(weight: torch.Tensor, mean: torch.Tensor, removed: list[int]) -> torch.Tensor:
    """The output bias that replaces removed inputs by their mean: W[:, removed] @ mean[removed]."""
    if not removed:
        return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    idx = torch.as_tensor(removed, dtype=torch.long, device=weight.device)
    return (weight[:, idx].double() @ mean.to(weight.device).double()[idx]).to(weight.dtype)


def apply_(model, p: FLAPPlan):
    """The slim model of the plan, with the bias compensation (returns a new model)."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    keep = []
    for layer, spec, am, mm in zip(get_layers(model), p.layers, p.attn_mean, p.mlp_mean):
        gone_heads = [h for h in range(c.num_attention_heads) if h not in set(spec["q_heads"])]
        gone_attn = [h * hd + t for h in gone_heads for t in range(hd)]
        gone_mlp = [j for j in range(c.intermediate_size) if j not in set(spec["channels"])]
        o_w, down_w = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
        o_bias = compensation(o_w, torch.tensor(am), gone_attn) if gone_attn else None
        down_bias = compensation(down_w, torch.tensor(mm), gone_mlp) if gone_mlp else None
        keep.append(LayerKeep(spec["q_heads"], spec["kv_heads"], spec["channels"], o_bias, down_bias))
    return to_slim(model, keep)


def compress_(model, calib: Calibration, cfg: FLAPConfig, train=None, progress: bool = True, folder=None):
    """plan + apply_; returns (slim model, plan, stats) — the model is replaced, not edited.
    Training-free: ``train`` and ``folder`` (resumable state) are not used."""
    p = plan(model, calib, cfg)
    return apply_(model, p), p, {"removed_fraction": p.removed_fraction}


def for_target(base: FLAPConfig, model, fraction: float) -> FLAPConfig:
    """The config that removes ``fraction`` of the non-embedding parameters (FLAP's ratio counts
    the attention + MLP parameters its units free)."""
    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    group = c.num_attention_heads // c.num_key_value_heads
    units = c.num_hidden_layers * (c.num_attention_heads * (2 + 2 / group) * hd + 3 * c.intermediate_size) \
        * c.hidden_size
    ratio = fraction * non_embedding_parameters(model) / units
    if not ratio < 1:
        raise ValueError(f"FLAP cannot remove {fraction:.0%} of the non-embedding parameters")
    return replace(base, ratio=ratio)
