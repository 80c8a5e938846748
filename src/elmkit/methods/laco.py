"""LaCo: layer collapse (Yang, Cao, Zhao, EMNLP 2024 Findings, arXiv 2402.11187).

Reserving-Differences-while-Seeking-Common (RDSC) merge of the m layers above layer l into l,

    theta*_l = theta_l + sum_{k=1..m} (theta_{l+k} - theta_l)         (projections; norms kept)

tried from the top down on the model as collapsed so far, and kept only if the final hidden states
stay close to the dense model's on the calibration sequences:

    l = top - (m + 1)
    while l >= lowest:
        candidate = collapse layers l..l+m
        if mean_x cos(flatten(h_dense(x)), flatten(h_candidate(x))) > T:
            accept; l -= interval
        else:
            l -= 1

With a target k (``n_remove`` / ``ratio``) the sweep stops once k layers are gone (the last merge
is shortened to fit) and T is found by bisection (the highest T that still removes k), as for SLM;
a fixed ``threshold`` without a target runs the original sweep. ``merge="keep_top"`` reproduces
the released notebook, whose in-place update leaves the top layer's weights (LaCo issue #5).
Paper settings for Llama-2-13B: m = 6 (MERGE_LAYERS 7), interval 1, all 40 layers, T = 0.45.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.calibration import Calibration
from ..models.adapters import get_layers, num_layers, replace_span_
from .common import DenseStates, SweepTarget, merge_layers, sweep_threshold


@dataclass(frozen=True)
class LaCoConfig(SweepTarget):
    """Collapse size, sweep range, merge rule, and either a target or a threshold T."""

    m: int = 2
    """Layers collapsed into the base layer per merge (each accepted merge removes m)."""
    interval: int = 1
    """How far the sweep jumps down after an accepted merge."""
    protect_first: int = 0
    """The first layers that are never merged (LaCo's LOWEST_LAY)."""
    protect_last: int = 0
    """The last layers that are never merged (0: the sweep may reach the top layer)."""

    def __post_init__(self):
        super().__post_init__()
        if self.m < 1 or self.interval < 1:
            raise ValueError("--m and --interval must be >= 1")
        if self.protect_first < 0 or self.protect_last < 0:
            raise ValueError("--protect-first and --protect-last must be >= 0")


@dataclass(frozen=True)
class LaCoPlan:
    merges: tuple[tuple[int, int], ...]
    """Accepted collapses (l, m) in the order applied; l counts layers of the model at that time."""
    threshold: float
    """The T the sweep ran at."""
    similarity: float
    """Similarity of the final model to the dense one."""
    merge: str
    """The merge rule."""


class _Sweep:
    def __init__(self, model, calib: Calibration, cfg: LaCoConfig):
        self.cfg = cfg
        self.dense = DenseStates(model, calib, cfg.batch_size)
        self.layers = self.dense.layers
        self._sim: dict = {}

    def similarity(self, key: tuple, modules: list, lowest: int) -> float:
        """Similarity of ``modules`` (the collapsed layer list) to the dense model."""
        if key not in self._sim:
            self._sim[key] = self.dense.similarity(modules[lowest:], lowest)
        return self._sim[key]

    def run(self, T: float, budget: int | None) -> tuple[tuple[tuple[int, int], ...], float]:
        cfg = self.cfg
        work, merges, removed, sim = list(self.layers), (), 0, 1.0
        # LaCo starts at HIGHEST_LAY - MERGE_LAYERS (MERGE_LAYERS = m + 1): the first window stays
        # below the top layer; short models start at the lowest allowed layer
        l = max(len(work) - 1 - cfg.protect_last - cfg.m - 1, cfg.protect_first)
        while l >= cfg.protect_first and (budget is None or removed < budget):
            m = min(cfg.m, len(work) - 1 - cfg.protect_last - l)
            if budget is not None:
                m = min(m, budget - removed)
            if m < 1:
                l -= 1
                continue
            merged = merge_layers([mod for mod, _ in work[l:l + m + 1]], cfg.merge)
            cand = work[:l] + [(merged, work[l][1])] + work[l + m + 1:]
            s = self.similarity(merges + ((l, m),), cand, l)
            if s > T:
                work, merges, removed, sim = cand, merges + ((l, m),), removed + m, s
                l -= cfg.interval
            else:
                l -= 1
        return merges, sim


def plan(model, calib: Calibration, cfg: LaCoConfig, progress: bool = True) -> LaCoPlan:
    n = num_layers(model)
    room = n - cfg.protect_first - cfg.protect_last
    if room < 2:
        raise ValueError(f"LaCo has {room} mergeable layers after --protect-first/--protect-last; needs 2")
    sweep = _Sweep(model, calib, cfg)
    T, budget = sweep_threshold(cfg, n, room - 1, lambda t, k: sum(m for _, m in sweep.run(t, k)[0]),
                                "LaCo threshold", progress)
    merges, sim = sweep.run(T, budget) if budget != 0 else ((), 1.0)
    return LaCoPlan(merges, T, sim, cfg.merge)


def apply_(model, p: LaCoPlan):
    for l, m in p.merges:
        layers = get_layers(model)
        replace_span_(model, l, l + m + 1, merge_layers(layers[l:l + m + 1], p.merge))
    return model


def compress_(model, calib: Calibration, cfg: LaCoConfig, train=None, progress: bool = True):
    """plan + apply_ in place; training-free (``train`` is ignored)."""
    p = plan(model, calib, cfg, progress)
    apply_(model, p)
    return p, {"threshold": p.threshold, "similarity": p.similarity}
