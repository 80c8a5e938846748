"""SLEB: iterative greedy removal of redundant transformer blocks (Song et al., ICML 2024,
arXiv 2402.09025).

Repeat k times, on the model as pruned so far:

    j* = argmin_j  NLL(current model without block j)      (summed over calibration tokens)

and remove j*. Being iterative, it accounts for interactions between removals (unlike one-shot
rankings). As in the official code, the first alive block and the last alive block are never
candidates (``early_barrier`` / ``latter_barrier``). Difference on purpose: padding is masked in the
NLL (the official calibration is unpadded 2048-token chunks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..models.adapters import layer_inputs, num_layers, remove_layers_
from .common import NO_TARGETS, DepthTarget, run_modules, token_nll, typed_layers


@dataclass(frozen=True)
class SLEBConfig(DepthTarget):
    """How many blocks SLEB removes, and which it never considers."""

    early_barrier: int = 1
    """The first alive blocks that are never removed."""
    latter_barrier: int = 1
    """The last alive blocks that are never removed."""

    def __post_init__(self):
        super().__post_init__()
        if self.early_barrier < 0 or self.latter_barrier < 0:
            raise ValueError("--early-barrier and --latter-barrier must be >= 0")


@dataclass(frozen=True)
class SLEBPlan:
    drop: tuple[int, ...]
    """Layer indices to delete (sorted, original numbering)."""
    order: tuple[int, ...]
    """The same layers in the order SLEB removed them."""
    nll: tuple[float, ...]
    """Calibration NLL per token after each removal."""


@torch.no_grad()
def plan(model, calib: Calibration, cfg: SLEBConfig, progress: bool = True) -> SLEBPlan:
    n = num_layers(model)
    k = cfg.count(n, at_most=max(n - cfg.early_barrier - cfg.latter_barrier, 0))
    device = next(model.parameters()).device
    layers = typed_layers(model)
    batches = list(calib.target_batches(cfg.batch_size, device))
    alive, order, curve = list(range(n)), [], []
    bar = tqdm(total=k, desc="SLEB", disable=not progress)
    for _ in range(k):
        candidates = alive[cfg.early_barrier:len(alive) - cfg.latter_barrier]
        nll, tokens = dict.fromkeys(candidates, 0.0), 0
        for ids, mask, target in batches:
            ctx = layer_inputs(model, ids, mask)
            h = ctx.hidden
            for pos, j in enumerate(alive):  # h: input of alive[pos] in the current model
                if j in nll:
                    out = run_modules([layers[i] for i in alive[pos + 1:]], h, ctx)
                    s, t = token_nll(model, out, ids, mask, target)
                    nll[j] += s
                h = run_modules([layers[j]], h, ctx)
            tokens += t
        if tokens == 0:
            raise ValueError(NO_TARGETS)
        best = min(candidates, key=lambda j: (nll[j], j))
        alive.remove(best)
        order.append(best)
        curve.append(nll[best] / tokens)
        bar.update(1)
        bar.set_postfix(removed=best, nll=f"{curve[-1]:.4f}")
    bar.close()
    return SLEBPlan(tuple(sorted(order)), tuple(order), tuple(curve))


def apply_(model, p: SLEBPlan):
    return remove_layers_(model, p.drop)


def compress_(model, calib: Calibration, cfg: SLEBConfig, train=None, progress: bool = True):
    """plan + apply_ in place; training-free (``train`` is ignored)."""
    p = plan(model, calib, cfg, progress)
    apply_(model, p)
    return p, {}
