"""SLM: sliding-window layer merging (Ding et al., 2025, arXiv 2502.19159; AAAI-26 as "SWM").

A window [low, high] slides down from the top (the last layer is never merged). The window's layers
are collapsed into one layer at ``low``,

    theta' = theta_low + sum_{k=low+1..high} (theta_k - theta_low)      (paper; ``merge="paper"``)

and the candidate model is accepted while its final hidden states stay close to the dense model's:

    sim = mean_x cos( flatten(h_dense(x)), flatten(h_candidate(x)) ) > T

    high = N-2, low = high-1
    while low >= 0:
        if sim(window low..high) > T:  low -= 1                      (grow the window)
        elif high - low >= 2:  commit low+1..high; high = low; low = high-1
        else:                  high -= 1; low -= 1                   (slide)

The similarity is always against the dense model, so errors of earlier merges accumulate. The
pruning ratio is not an input of the original; here a target k (``n_remove`` / ``ratio``) turns on a
bisection over T that finds the highest T whose sweep removes k layers, with the sweep capped at k
(it stops committing once k layers are gone). A fixed ``threshold`` without a target runs the
original sweep.

Merge rules (see ``common.merge_layers``): ``paper`` (default); ``keep_top`` is what the released
code computes (its in-place update with weight_factor 1 leaves the top layer's projections with the
bottom layer's norms); ``keep_bottom``; ``mean``. Differences from the official code, on purpose:
a window still passing when the sweep reaches layer 0 is committed (the official loop drops it),
and padding is excluded from the similarity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.calibration import Calibration
from ..models.adapters import get_layers, num_layers, replace_span_
from .common import DenseStates, SweepTarget, merge_layers, sweep_threshold


@dataclass(frozen=True)
class SLMConfig(SweepTarget):
    """Merge rule, and either a target (n_remove / ratio, T found by bisection) or a threshold T."""


@dataclass(frozen=True)
class SLMPlan:
    merges: tuple[tuple[int, int], ...]
    """Merged windows (low, high), inclusive, top first; applied in this order."""
    threshold: float
    """The T the sweep ran at."""
    similarity: float
    """sim of the final model against the dense one."""
    merge: str
    """The merge rule."""


class _Sweep:
    """The sliding-window sweep at a given T, with the dense states and similarities cached."""

    def __init__(self, model, calib: Calibration, cfg: SLMConfig):
        self.cfg = cfg
        self.dense = DenseStates(model, calib, cfg.batch_size)
        self.layers = [l for l, _ in self.dense.layers]
        self.types = [t for _, t in self.dense.layers]
        self._sim: dict = {}
        self._merged: dict = {}

    def merged(self, low: int, high: int):
        key = (low, high)
        if key not in self._merged:
            if len(self._merged) >= 8:  # a merged layer is a full layer's weights: keep few
                self._merged.pop(next(iter(self._merged)))
            self._merged[key] = merge_layers(self.layers[low:high + 1], self.cfg.merge)
        return self._merged[key]

    @torch.no_grad()
    def similarity(self, merges: tuple[tuple[int, int], ...]) -> float:
        """sim of the dense model with the windows in ``merges`` collapsed (original indices)."""
        if merges in self._sim:
            return self._sim[merges]
        lowest = min(lo for lo, _ in merges)
        modules, i, n = [], lowest, len(self.layers)
        spans = {lo: hi for lo, hi in merges}
        while i < n:  # layers below the lowest window are dense: start from the cached input
            if i in spans:
                modules.append((self.merged(i, spans[i]), self.types[i]))
                i = spans[i] + 1
            else:
                modules.append((self.layers[i], self.types[i]))
                i += 1
        self._sim[merges] = self.dense.similarity(modules, lowest)
        return self._sim[merges]

    def run(self, T: float, budget: int | None) -> tuple[tuple[int, int], ...]:
        n = len(self.layers)
        merges: tuple[tuple[int, int], ...] = ()
        removed = 0
        high, low = n - 2, n - 3
        while low >= 0 and (budget is None or removed < budget):
            if self.similarity(merges + ((low, high),)) > T:
                if budget is not None and removed + high - low == budget:
                    merges, removed = merges + ((low, high),), budget
                    break
                low -= 1
            elif high - low >= 2:  # the last passing window low+1..high has >= 2 layers
                merges, removed = merges + ((low + 1, high),), removed + high - low - 1
                high, low = low, low - 1
            else:
                high, low = high - 1, low - 1
        if low < 0 and high - low >= 2 and (budget is None or removed < budget):
            merges += ((0, high),)  # a window still passing at the bottom (official code drops it)
        return merges


def plan(model, calib: Calibration, cfg: SLMConfig, progress: bool = True) -> SLMPlan:
    n = num_layers(model)
    if n < 3:
        raise ValueError(f"SLM needs at least 3 layers (the last is never merged); the model has {n}")
    sweep = _Sweep(model, calib, cfg)
    T, budget = sweep_threshold(cfg, n, n - 2, lambda t, k: sum(hi - lo for lo, hi in sweep.run(t, k)),
                                "SLM threshold", progress)
    merges = sweep.run(T, budget) if budget != 0 else ()
    sim = sweep.similarity(merges) if merges else 1.0
    return SLMPlan(merges, T, sim, cfg.merge)


def apply_(model, p: SLMPlan):
    for low, high in p.merges:  # top first: lower indices stay valid
        layers = get_layers(model)
        replace_span_(model, low, high + 1, merge_layers(layers[low:high + 1], p.merge))
    return model


def compress_(model, calib: Calibration, cfg: SLMConfig, train=None, progress: bool = True):
    """plan + apply_ in place; training-free (``train`` is ignored)."""
    p = plan(model, calib, cfg, progress)
    apply_(model, p)
    return p, {"threshold": p.threshold, "similarity": p.similarity}
