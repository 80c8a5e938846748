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

import torch
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..models.adapters import get_layers, layer_inputs, layer_type, num_layers, replace_span_
from .common import DepthTarget, MergeRule, bisect_threshold, merge_layers, run_modules, sequence_cosine


@dataclass(frozen=True)
class LaCoConfig(DepthTarget):
    """Collapse size, sweep range, merge rule, and either a target or a threshold T."""

    threshold: float | None = None
    """Cosine threshold T; set it (and no target) to run the original, untargeted sweep."""
    m: int = 2
    """Layers collapsed into the base layer per merge (each accepted merge removes m)."""
    interval: int = 1
    """How far the sweep jumps down after an accepted merge."""
    protect_first: int = 0
    """The first layers that are never merged (LaCo's LOWEST_LAY)."""
    protect_last: int = 0
    """The last layers that are never merged (0: the sweep may reach the top layer)."""
    merge: MergeRule = "paper"
    """paper: RDSC; keep_top: what the released notebook computes; keep_bottom; mean."""
    bisect_steps: int = 16
    """Bisection steps over T when a target is set."""

    def __post_init__(self):
        if self.n_remove is not None and self.ratio is not None:
            raise ValueError("set at most one of --n-remove or --ratio")
        if self.n_remove is None and self.ratio is None and self.threshold is None:
            raise ValueError("set --n-remove / --ratio (T is then searched) or --threshold")
        self._check_target()
        if self.m < 1 or self.interval < 1:
            raise ValueError("--m and --interval must be >= 1")
        if self.protect_first < 0 or self.protect_last < 0:
            raise ValueError("--protect-first and --protect-last must be >= 0")
        if self.merge not in ("paper", "keep_top", "keep_bottom", "mean"):
            raise ValueError("--merge must be paper, keep_top, keep_bottom or mean")
        if self.bisect_steps < 1:
            raise ValueError("--bisect-steps must be >= 1")


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
        self.model, self.cfg = model, cfg
        self.layers = [(l, layer_type(model.config, i)) for i, l in enumerate(get_layers(model))]
        device = next(model.parameters()).device
        self.batches = []  # per batch: (ctx, mask, dense input of every layer, dense output)
        with torch.no_grad():
            for ids, mask in calib.batches(cfg.batch_size, device):
                ctx = layer_inputs(model, ids, mask)
                h, inputs = ctx.hidden, []
                for mod in self.layers:
                    inputs.append(h)
                    h = run_modules([mod], h, ctx)
                self.batches.append((ctx, mask, inputs, h))
        self._sim: dict = {}

    @torch.no_grad()
    def similarity(self, key: tuple, modules: list, lowest: int) -> float:
        """Similarity of ``modules`` (the collapsed layer list) to the dense model."""
        if key not in self._sim:
            total, count = 0.0, 0
            for ctx, mask, inputs, ref in self.batches:  # layers below ``lowest`` are dense
                out = run_modules(modules[lowest:], inputs[lowest], ctx)
                total += float(sequence_cosine(self.model, out, ref, mask).sum())
                count += out.shape[0]
            self._sim[key] = total / count
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
    if cfg.n_remove is None and cfg.ratio is None:
        T, budget = cfg.threshold, None
    else:
        budget = cfg.count(n, at_most=room - 1)
        bar = tqdm(total=cfg.bisect_steps + 1, desc="LaCo threshold", disable=not progress)

        def removed_at(t: float) -> int:
            bar.update(1)
            return sum(m for _, m in sweep.run(t, budget)[0])

        T = bisect_threshold(removed_at, budget, steps=cfg.bisect_steps) if budget else 1.0
        bar.close()
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
