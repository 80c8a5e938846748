"""Shortened LLaMA: one-shot block pruning by a PPL or a Taylor+ criterion
(Kim et al., 2024, arXiv 2402.02834).

PPL criterion: for every block b, the calibration perplexity of the model without b,

    s_b = exp( NLL(model \\ b) / tokens )

Taylor+ criterion: with the LM loss L on the calibration set, for every weight matrix W of block b
(q, k, v, o, gate, up, down and both norms),

    s_b = sum_W sum_ij | W_ij * dL/dW_ij |

The k blocks with the lowest score go in one shot. The "+" heuristic protects the first 4 and last
2 blocks; as in the official ``block_prune.py`` it applies to both criteria (``protect_first`` /
``protect_last`` change it). Difference from the official code, on purpose: NLL and gradients skip
padding (the official calibration has none: batch 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..models.adapters import get_layers, layer_inputs, num_layers, remove_layers_, run_layers
from .common import NO_TARGETS, DepthTarget, loss_gradients, run_modules, token_nll, typed_layers


@dataclass(frozen=True)
class ShortenedConfig(DepthTarget):
    """Which criterion ranks the blocks and which blocks are never removed."""

    criterion: Literal["ppl", "taylor"] = "ppl"
    """ppl: perplexity without the block; taylor: sum |W * dL/dW| over the block's weights."""
    protect_first: int = 4
    """The first blocks that are never removed."""
    protect_last: int = 2
    """The last blocks that are never removed."""

    def __post_init__(self):
        super().__post_init__()
        if self.criterion not in ("ppl", "taylor"):
            raise ValueError("--criterion must be ppl or taylor")
        if self.protect_first < 0 or self.protect_last < 0:
            raise ValueError("--protect-first and --protect-last must be >= 0")


@dataclass(frozen=True)
class ShortenedPlan:
    drop: tuple[int, ...]
    """Layer indices to delete (sorted)."""
    scores: tuple[float | None, ...]
    """Score of every layer (None for protected ones); the lowest are removed."""
    criterion: str
    """ppl or taylor."""


def plan(model, calib: Calibration, cfg: ShortenedConfig, progress: bool = True) -> ShortenedPlan:
    n = num_layers(model)
    candidates = list(range(cfg.protect_first, n - cfg.protect_last))
    k = cfg.count(n, at_most=len(candidates))
    if cfg.criterion == "ppl":
        scores = ppl_without_each(model, calib, candidates, cfg.batch_size, progress)
    else:
        scores = taylor_scores(model, calib, cfg.batch_size)
    scored = [scores[i] if i in candidates else None for i in range(n)]
    drop = sorted(sorted(candidates, key=lambda i: scores[i])[:k])
    return ShortenedPlan(tuple(drop), tuple(scored), cfg.criterion)


def apply_(model, p: ShortenedPlan):
    return remove_layers_(model, p.drop)


def compress_(model, calib: Calibration, cfg: ShortenedConfig, train=None, progress: bool = True):
    """plan + apply_ in place; training-free (``train`` is ignored)."""
    p = plan(model, calib, cfg, progress)
    apply_(model, p)
    return p, {}


@torch.no_grad()
def ppl_without_each(model, calib: Calibration, candidates: list[int], batch_size: int = 8,
                     progress: bool = True) -> dict[int, float]:
    """Calibration perplexity of the model with each candidate layer removed on its own."""
    device = next(model.parameters()).device
    layers = typed_layers(model)
    nll = dict.fromkeys(candidates, 0.0)
    tokens = 0
    bar = tqdm(total=len(candidates) * math.ceil(len(calib) / batch_size), desc="ppl criterion",
               disable=not progress)
    for ids, mask, target in calib.target_batches(batch_size, device):
        ctx = layer_inputs(model, ids, mask)
        h, inputs = ctx.hidden, {}
        for i in range(len(layers)):  # input of every layer, so each run starts at its candidate
            inputs[i] = h
            h = run_layers(model, h, ctx, i, i + 1)
        for b in candidates:
            out = run_modules(layers[b + 1:], inputs[b], ctx)
            nll[b] += token_nll(model, out, ids, mask, target)[0]
            bar.update(1)
        tokens += token_nll(model, h, ids, mask, target)[1]
    bar.close()
    if tokens == 0:
        raise ValueError(NO_TARGETS)
    return {b: math.exp(v / tokens) for b, v in nll.items()}


def taylor_scores(model, calib: Calibration, batch_size: int = 8) -> dict[int, float]:
    """sum |W * dL/dW| per layer, with L the mean target-token NLL of each calibration batch, summed."""
    grads = loss_gradients(model, calib, batch_size)
    with torch.no_grad():
        return {i: float(sum((p * grads[p]).abs().sum() for p in layer.parameters() if p in grads))
                for i, layer in enumerate(get_layers(model))}
