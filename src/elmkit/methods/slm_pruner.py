"""SLM depth + width: sliding-window layer merging, then LLM-Pruner on the merged model
(Ding et al., 2025, arXiv 2502.19159, "depth + width fusion"; the official ``script/merge_prune.sh``).

The SLM paper combines its depth method with a width method: first ``slm`` merges windows of
consecutive layers until k layers are gone (see slm.py), then LLM-Pruner (Ma, Fang, Wang,
NeurIPS 2023; see llm_pruner.py) removes the lowest-Taylor-importance attention groups and MLP
channels of the merged model:

    dense (N layers) --SLM--> stock model, N - k layers --LLM-Pruner--> slim model, N - k layers

Both steps keep their own semantics: LLM-Pruner's importance is computed on the *merged* model (its
gradients flow through the merged layers), and its layer range is in merged-model indices, so the
default ``layer_end`` (None -> N - 2) means two layers before the merged model's end. (The official
script passes the range explicitly: ``--block_*_layer_start 4 --block_*_layer_end 26``, ratio 0.2,
``--taylor param_first``.) The result is a slim model (``SlimForCausalLM``, per-layer widths) that
saves with its modeling code.

The SLM step edits the model in place (as slm.compress_ does), so ``apply_`` and ``compress_``
leave the input model merged; pass a copy if the dense model is needed afterwards. ``plan`` runs on
a copy and leaves its input as it is.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from ..data.calibration import Calibration
from ..models.adapters import num_layers
from . import llm_pruner, slm
from .common import non_embedding_parameters
from .llm_pruner import LLMPrunerConfig, LLMPrunerPlan
from .slm import SLMConfig, SLMPlan


@dataclass(frozen=True)
class SLMPrunerConfig:
    """The two steps' own configs: SLM (how many layers are merged away), then LLM-Pruner (width)."""

    slm: SLMConfig = field(default_factory=lambda: SLMConfig(ratio=0.125))
    """Depth step. Default: merge away 1/8 of the layers (4 of Llama's 32), T found by bisection."""
    pruner: LLMPrunerConfig = field(default_factory=lambda: LLMPrunerConfig(ratio=0.2))
    """Width step on the merged model. Default: the paper's ratio 0.2, layers [4, N' - 2) of the
    N' merged layers."""

    def __post_init__(self):
        # nested configs arrive as dicts from JSON/CLI callers that forgot to build them
        if not isinstance(self.slm, SLMConfig):
            raise ValueError(f"slm must be an SLMConfig, got {type(self.slm).__name__}")
        if not isinstance(self.pruner, LLMPrunerConfig):
            raise ValueError(f"pruner must be an LLMPrunerConfig, got {type(self.pruner).__name__}")


@dataclass(frozen=True)
class SLMPrunerPlan:
    n_layers: int
    """Decoder layers of the dense model the plan was made for."""
    slm: SLMPlan
    """Depth step: merged windows, in dense-model indices."""
    pruner: LLMPrunerPlan
    """Width step: what each layer of the merged model keeps, in merged-model indices."""


def plan(model, calib: Calibration, cfg: SLMPrunerConfig, progress: bool = False) -> SLMPrunerPlan:
    """Both steps' plans. ``model`` is left as it is: SLM is applied to a copy, which LLM-Pruner scores."""
    _check_range(cfg, num_layers(model))  # before the copy and the sweep: fail fast
    return _plan_(copy.deepcopy(model), calib, cfg, progress)


def apply_(model, p: SLMPrunerPlan):
    """The slim model of the plan (a new model); ``model`` is merged in place on the way."""
    n = num_layers(model)
    if n != p.n_layers:  # SLM's windows are dense indices: a merged model would be merged twice
        raise ValueError(f"the plan is for a model of {p.n_layers} layers, this one has {n} "
                         "(has SLM already been applied to it?)")
    slm.apply_(model, p.slm)
    return llm_pruner.apply_(model, p.pruner)


def compress_(model, calib: Calibration, cfg: SLMPrunerConfig, train=None, progress: bool = True,
              folder=None):
    """plan + apply_ without a copy; returns (slim model, plan, stats). Training-free (``train`` and
    ``folder`` are ignored); ``model`` is left merged (the SLM step), the slim model is a new one."""
    _check_range(cfg, num_layers(model))
    p = _plan_(model, calib, cfg, progress)  # leaves ``model`` merged: only the width step remains
    slim_model = llm_pruner.apply_(model, p.pruner)
    stats = {"threshold": p.slm.threshold, "similarity": p.slm.similarity, "dense_layers": p.n_layers,
             "merged_layers": slim_model.config.num_hidden_layers}
    return slim_model, p, stats


def _plan_(model, calib: Calibration, cfg: SLMPrunerConfig, progress: bool) -> SLMPrunerPlan:
    """Plan SLM, merge ``model`` in place, plan LLM-Pruner on the merged model."""
    n = num_layers(model)
    p_slm = slm.plan(model, calib, cfg.slm, progress)
    slm.apply_(model, p_slm)
    p_pruner = llm_pruner.plan(model, calib, cfg.pruner, progress)  # its N - 2 default is the merged N
    return SLMPrunerPlan(n, p_slm, p_pruner)


def _check_range(cfg: SLMPrunerConfig, n: int) -> None:
    """LLM-Pruner's layer range must fit the merged model; known up front when SLM has a target
    (with a bare threshold the merged depth is known only after the sweep; llm_pruner checks then)."""
    if n < 3 or (cfg.slm.n_remove is None and cfg.slm.ratio is None):  # n < 3: slm.plan's own error
        return
    k = cfg.slm.count(n, at_most=n - 2)  # SLM never merges the last layer
    left = n - k
    end = cfg.pruner.layer_end if cfg.pruner.layer_end is not None else left - 2
    if not cfg.pruner.layer_start < end <= left:
        raise ValueError(f"LLM-Pruner's layers [{cfg.pruner.layer_start}, {end}) are not inside the {left} "
                         f"layers left after SLM merges away {k} of {n}; lower pruner.layer_start / "
                         "pruner.layer_end or slm.n_remove / slm.ratio")


def for_target(base: SLMPrunerConfig, model, fraction: float) -> SLMPrunerConfig:
    """The config that removes ``fraction`` of the non-embedding parameters: SLM merges away half of
    it in whole layers (k = round(fraction / 2 x N)), LLM-Pruner takes the rest from the merged
    model's pruned layers."""
    n = num_layers(model)
    k = max(1, round(fraction / 2 * n))
    left = n - k
    end = base.pruner.layer_end if base.pruner.layer_end is not None else left - 2
    pruned = max(0, min(end, left) - base.pruner.layer_start)
    per_layer = llm_pruner._layer_parameters(model)
    rest = fraction * non_embedding_parameters(model) - k * per_layer
    ratio = max(0.0, rest) / (pruned * per_layer) if pruned else 1.0
    if not ratio < 1:
        raise ValueError(f"SLM + LLM-Pruner cannot remove {fraction:.0%} of the non-embedding parameters "
                         f"with layers [{base.pruner.layer_start}, {end}) of {left} pruned")
    return replace(base, slm=replace(base.slm, n_remove=k, ratio=None),
                   pruner=replace(base.pruner, ratio=ratio))
