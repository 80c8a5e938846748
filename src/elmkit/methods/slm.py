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
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..models.adapters import get_layers, layer_inputs, layer_type, num_layers, replace_span_
from .common import DepthTarget, MergeRule, bisect_threshold, merge_layers, run_modules, sequence_cosine


@dataclass(frozen=True)
class SLMConfig(DepthTarget):
    """Merge rule, and either a target (n_remove / ratio, T found by bisection) or a threshold T."""

    threshold: float | None = None
    """Cosine threshold T; set it (and no target) to run the original, untargeted sweep."""
    merge: MergeRule = "paper"
    """paper: theta_l + sum(theta_k - theta_l); keep_top: the official code's result; keep_bottom; mean."""
    bisect_steps: int = 16
    """Bisection steps over T when a target is set."""

    def __post_init__(self):
        if self.n_remove is not None and self.ratio is not None:
            raise ValueError("set at most one of --n-remove or --ratio")
        if self.n_remove is None and self.ratio is None and self.threshold is None:
            raise ValueError("set --n-remove / --ratio (T is then searched) or --threshold")
        self._check_target()
        if self.merge not in ("paper", "keep_top", "keep_bottom", "mean"):
            raise ValueError("--merge must be paper, keep_top, keep_bottom or mean")
        if self.bisect_steps < 1:
            raise ValueError("--bisect-steps must be >= 1")


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
        self.model, self.cfg = model, cfg
        self.layers = list(get_layers(model))
        self.types = [layer_type(model.config, i) for i in range(len(self.layers))]
        device = next(model.parameters()).device
        self.batches = []  # per batch: (ctx, mask, dense input of every layer, dense output)
        with torch.no_grad():
            for ids, mask in calib.batches(cfg.batch_size, device):
                ctx = layer_inputs(model, ids, mask)
                h, inputs = ctx.hidden, []
                for i, l in enumerate(self.layers):
                    inputs.append(h)
                    h = run_modules([(l, self.types[i])], h, ctx)
                self.batches.append((ctx, mask, inputs, h))
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
        total, count = 0.0, 0
        for ctx, mask, inputs, ref in self.batches:
            out = run_modules(modules, inputs[lowest], ctx)
            total += float(sequence_cosine(self.model, out, ref, mask).sum())
            count += out.shape[0]
        self._sim[merges] = total / count
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
    if cfg.n_remove is None and cfg.ratio is None:
        T, budget = cfg.threshold, None
    else:
        budget = cfg.count(n, at_most=n - 2)
        bar = tqdm(total=cfg.bisect_steps + 1, desc="SLM threshold", disable=not progress)

        def removed_at(t: float) -> int:
            bar.update(1)
            return sum(hi - lo for lo, hi in sweep.run(t, budget))

        T = bisect_threshold(removed_at, budget, steps=cfg.bisect_steps) if budget else 1.0
        bar.close()
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
