"""LLM-Streamline: replace the most redundant span of layers with one trained layer (Chen et al., 2024,
arXiv 2403.19135).

To remove n layers, every contiguous span of m = n + 1 layers starting at j is scored on calibration
tokens t (padding excluded)::

    s_j = E_t[ cos(H[j]_t, H[j+m]_t) ]        H[i]: input of layer i, H[N]: last layer's output

and the span j* = argmax s_j (its input and output agree most) is replaced by a single layer:
``layer`` (the paper's default) is a copy of decoder layer j*; ``ffn`` is the same copy with its
attention branch disabled (o_proj zeroed and frozen), so it computes h + MLP(post_attention_norm(h))
with the family's own SwiGLU MLP. Only the replacement is trained, either to map H[j*] to the dense
model's H[j*+m] (``mse``) or, inserted into the frozen model, on next-token cross-entropy (``lm``).
The result is a stock transformers model with N - n layers.

Differences from the official code, on purpose:

* H[N] is the last layer's output *before* the final norm (elmkit's ``capture_hidden_states``
  indexing); the official code takes transformers' last hidden state, which is after the norm, so
  its last span is compared in another space.
* s_j is the plain cosine averaged over all non-pad tokens of the calibration set; the official
  0.5 + 0.5 cos averaged per sample then over samples has the same argmax up to the weighting of
  sequences of different lengths.
* The ``ffn`` replacement is the family's SwiGLU MLP inside an ordinary decoder layer (the paper
  discusses SwiGLU; the examples use Linear-ReLU-Linear) so that the output stays a stock model
  folder. Its attention and KV-cache compute therefore remain, feeding a zero o_proj, until elmkit
  has a slim format for attention-free layers.
* MSE targets are computed on the fly per batch rather than stored for the whole training set
  (which needs > 1 TB of RAM at the paper's scale, official issue #5); a fixed number of steps with
  no gradient accumulation and no best-checkpoint selection on a held-out split; the replacement
  trains in float32 whatever the model's dtype; weight decay applies to matrices only; no warm-up.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.calibration import Calibration
from ..models.adapters import (
    LayerContext,
    get_layers,
    head_logits,
    layer_inputs,
    layer_type,
    num_layers,
    replace_span_,
    run_layers,
)
from ..train.common import batch_indices, cosine_lr
from .common import DepthTarget


@dataclass(frozen=True)
class StreamlineConfig(DepthTarget):
    """LLM-Streamline: which span goes (n_remove or ratio), what replaces it, how it is trained."""

    replacement: Literal["layer", "ffn"] = "layer"
    """layer: a copy of the span's first layer; ffn: that copy with its attention branch zeroed."""
    loss: Literal["mse", "lm"] = "mse"
    """mse: match the dense hidden state after the span; lm: next-token CE with the model frozen."""
    steps: int = 200
    """Optimizer steps training the replacement (0: keep the untrained copy)."""
    lr: float = 2e-4
    """Peak AdamW learning rate."""
    min_lr: float = 5e-5
    """Learning rate at the end of the cosine schedule."""
    weight_decay: float = 1e-3
    """AdamW weight decay (matrices only)."""
    clip: float = 5.0
    """Gradient-norm clip."""
    train_batch_size: int = 8
    """Training sequences per optimizer step."""
    seed: int = 0
    """Seed of the data order and of torch during training."""

    def __post_init__(self):
        super().__post_init__()
        if self.replacement not in ("layer", "ffn"):
            raise ValueError(f"--replacement must be layer or ffn, got {self.replacement!r}")
        if self.loss not in ("mse", "lm"):
            raise ValueError(f"--loss must be mse or lm, got {self.loss!r}")
        if self.steps < 0:
            raise ValueError("--steps must be >= 0")
        if not self.lr > 0:
            raise ValueError("--lr must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError("--min-lr must be in [0, --lr]")
        if self.weight_decay < 0:
            raise ValueError("--weight-decay must be >= 0")
        if not self.clip > 0:
            raise ValueError("--clip must be > 0")
        if self.train_batch_size < 1:
            raise ValueError("--train-batch-size must be >= 1")


@dataclass(frozen=True)
class StreamlinePlan:
    start: int
    """j*: the first layer of the replaced span."""
    span: int
    """m = n + 1: layers replaced by one (1 when nothing is removed: the model is left as is)."""
    scores: tuple[float, ...]
    """s_j, the mean cosine of the span's input and output, for every candidate start j."""


@torch.no_grad()
def span_scores(model, calib: Calibration, span: int, batch_size: int = 8) -> list[float]:
    """s_j = mean over non-pad calibration tokens of cos(H[j], H[j+span]), j = 0 .. N - span."""
    device = next(model.parameters()).device
    n = num_layers(model)
    if not 1 <= span <= n:
        raise ValueError(f"a span of {span} layers does not fit in {n} layers")
    total, count = torch.zeros(n - span + 1, dtype=torch.float64), 0
    for ids, mask in calib.batches(batch_size, device):
        ctx = layer_inputs(model, ids, mask)
        valid = mask.bool()  # (B, T)
        hs = {0: ctx.hidden}  # H[i], (B, T, d); only the last span + 1 are kept
        for i in range(n):
            hs[i + 1] = run_layers(model, hs[i], ctx, i, i + 1)
            j = i + 1 - span
            if j >= 0:
                cos = F.cosine_similarity(hs[j].double(), hs[i + 1].double(), dim=-1)  # (B, T)
                total[j] += cos[valid].sum().cpu()
                del hs[j]
        count += int(valid.sum())
    return (total / max(count, 1)).tolist()


def plan(model, calib: Calibration, cfg: StreamlineConfig) -> StreamlinePlan:
    n = num_layers(model)
    k = cfg.count(n, at_most=n - 1)
    scores = span_scores(model, calib, k + 1, cfg.batch_size)
    start = max(range(len(scores)), key=lambda j: scores[j])  # first of any ties
    return StreamlinePlan(start, k + 1, tuple(scores))


def init_layer(model, p: StreamlinePlan, replacement: str = "layer") -> nn.Module:
    """The untrained replacement: a copy of layer p.start, its attention branch disabled for ffn."""
    layer = copy.deepcopy(get_layers(model)[p.start])
    if replacement == "ffn":
        # o_proj = 0 makes the attention branch add exactly zero: h + MLP(post_attention_layernorm(h))
        with torch.no_grad():
            layer.self_attn.o_proj.weight.zero_()
            if layer.self_attn.o_proj.bias is not None:
                layer.self_attn.o_proj.bias.zero_()
    elif replacement != "layer":
        raise ValueError(f"unknown replacement {replacement!r}; choose layer or ffn")
    return layer


def _trainable(layer: nn.Module, replacement: str) -> list[nn.Parameter]:
    # ffn: the whole attention branch (input norm, q/k/v, zero o_proj) stays frozen
    frozen = ("self_attn.", "input_layernorm.") if replacement == "ffn" else ()
    return [p for name, p in layer.named_parameters() if not name.startswith(frozen)]


def _run_layer(layer: nn.Module, h: torch.Tensor, ctx: LayerContext, kind: str) -> torch.Tensor:
    """The replacement on h (B, T, d), in the replacement's own dtype (float32 while training)."""
    dt = next(layer.parameters()).dtype
    mask = ctx.masks[kind]
    if mask is not None and mask.is_floating_point():  # additive mask (eager attention)
        mask = mask.to(dt)
    return layer(h.to(dt), attention_mask=mask, position_ids=ctx.position_ids,
                 use_cache=False, position_embeddings=tuple(t.to(dt) for t in ctx.position_embeddings))


def _loss(model, layer: nn.Module, p: StreamlinePlan, ids: torch.Tensor, mask: torch.Tensor,
          target_mask: torch.Tensor, loss: str) -> torch.Tensor:
    kind = layer_type(model.config, p.start)
    with torch.no_grad():
        ctx = layer_inputs(model, ids, mask)
        x = run_layers(model, ctx.hidden, ctx, 0, p.start)  # H[j*], (B, T, d)
        if loss == "mse":
            target = run_layers(model, x, ctx, p.start, p.start + p.span)  # H[j*+m]
    y = _run_layer(layer, x, ctx, kind)
    valid = mask.bool()
    if loss == "mse":
        return ((y.float() - target.float()) ** 2).mean(-1)[valid].mean()
    # lm: the replacement in the span's place, gradients flowing through the frozen layers above it
    h = run_layers(model, y.to(x.dtype), ctx, p.start + p.span, num_layers(model))
    logits = head_logits(model, h)[:, :-1].float()  # (B, T-1, V)
    pred = valid[:, :-1] & target_mask[:, 1:].bool()  # predicting a target token from a real one
    return F.cross_entropy(logits[pred], ids[:, 1:][pred])


def fit(model, plan: StreamlinePlan, train: Calibration, cfg: StreamlineConfig,
        progress: bool = True) -> tuple[nn.Module, dict]:
    """Train the replacement of ``plan``'s span; the model is left unchanged (dense).

    Returns the layer in the model's dtype and device, not yet inserted, and
    {"steps", "first_loss" (the untrained layer, first batch), "final_loss" (mean of the last 10
    steps), "loss_curve"}.
    """
    from tqdm.auto import tqdm

    ref = get_layers(model)[plan.start]
    dtype, device = next(ref.parameters()).dtype, next(ref.parameters()).device
    layer = init_layer(model, plan, cfg.replacement).float()  # fp32 master weights
    if cfg.steps == 0:
        return layer.to(dtype).eval(), {"steps": 0, "first_loss": None, "final_loss": None,
                                        "loss_curve": []}
    if len(train) == 0:
        raise ValueError("no training sequences")
    layer.requires_grad_(False)
    params = _trainable(layer, cfg.replacement)
    for q in params:
        q.requires_grad_(True)
    decay, rest = [q for q in params if q.dim() >= 2], [q for q in params if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)
    per_epoch = max(1, len(train) // cfg.train_batch_size)
    flags = [q.requires_grad for q in model.parameters()]
    model.requires_grad_(False)  # lm: gradients reach the replacement only
    torch.manual_seed(cfg.seed)
    layer.train()
    curve = []
    bar = tqdm(total=cfg.steps, desc="streamline", disable=not progress)
    try:
        for step in range(cfg.steps):
            lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, 0)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = batch_indices(len(train), cfg.train_batch_size, step, per_epoch, cfg.seed)
            ids, mask = train.input_ids[idx], train.attention_mask[idx]
            tgt = train.target_mask[idx] if train.target_mask is not None else mask
            keep = int(mask.sum(1).max())  # drop all-pad columns (right padding)
            ids, mask, tgt = (t[:, :keep].to(device) for t in (ids, mask, tgt))
            loss = _loss(model, layer, plan, ids, mask, tgt, cfg.loss)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"LLM-Streamline loss became {loss.item()} at step {step}; "
                                         "lower --lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{curve[-1]:.4g}", lr=f"{lr:.2e}")
    finally:
        bar.close()
        for q, f in zip(model.parameters(), flags):
            q.requires_grad_(f)
    layer.requires_grad_(False)
    tail = curve[-10:]
    stats = {"steps": cfg.steps, "first_loss": curve[0], "final_loss": sum(tail) / len(tail),
             "loss_curve": curve}
    return layer.to(dtype).eval(), stats


def apply_(model, plan: StreamlinePlan, layer: nn.Module | None = None,
           cfg: StreamlineConfig | None = None):
    """Replace the span by ``layer`` (default: the untrained init of cfg.replacement), in place.

    A plan of span 1 without a layer (nothing to remove) leaves the model as it is.
    """
    if layer is None:
        if plan.span == 1:
            return model
        layer = init_layer(model, plan, cfg.replacement if cfg is not None else "layer")
    ref = next(get_layers(model)[plan.start].parameters())
    layer.to(device=ref.device, dtype=ref.dtype)
    return replace_span_(model, plan.start, plan.start + plan.span, layer)


def compress_(model, calib: Calibration, cfg: StreamlineConfig, train: Calibration | None = None,
              progress: bool = True) -> tuple[StreamlinePlan, dict]:
    """plan, fit (when ``train`` is given and cfg.steps > 0) and apply_, in place.

    n = 0 gives a plan of span 1 and leaves the model unchanged, untrained.
    """
    p = plan(model, calib, cfg)
    if p.span == 1:
        return p, {}
    layer, stats = None, {}
    if train is not None and cfg.steps > 0:
        layer, stats = fit(model, p, train, cfg, progress)
    apply_(model, p, layer, cfg)
    return p, stats
