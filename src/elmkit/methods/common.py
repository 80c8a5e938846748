"""What the methods share: the removal target, running an edited layer list, calibration NLL and
similarity, the layer-merge operator, the threshold bisection of SLM and LaCo, and the statistics of
module inputs that the width methods score and update with.

Every depth method ends with N - k decoder layers, where k comes from ``DepthTarget``: methods that
delete layers delete k; methods that replace a span (LLM-Streamline, ReplaceMe, ELM) replace k + 1
layers with one; merging methods (SLM, LaCo) merge until k layers are gone.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..models.adapters import (
    LayerContext,
    count_parameters,
    get_embed,
    get_head,
    get_norm,
    layer_inputs,
    layer_type,
)

MergeRule = Literal["paper", "keep_top", "keep_bottom", "mean"]
NO_TARGETS = ("no calibration sequence has a target token (for instruction data: an answer token "
              "within --calib.seq-len); raise --calib.seq-len or use text calibration data")
MERGED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DepthTarget:
    """How many decoder layers go."""

    n_remove: int | None = None
    """Layers the compressed model has fewer than the dense one; or set ratio."""
    ratio: float | None = None
    """Fraction of layers to remove (rounded to the nearest count), when n_remove is unset."""
    batch_size: int = 8
    """Calibration sequences per forward pass."""

    def __post_init__(self):
        if (self.n_remove is None) == (self.ratio is None):
            raise ValueError("set exactly one of --n-remove or --ratio")
        self._check_target()

    def _check_target(self):
        if self.n_remove is not None and self.n_remove < 0:
            raise ValueError("--n-remove must be >= 0")
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ValueError("--ratio must be in [0, 1)")
        if self.batch_size < 1:
            raise ValueError("--batch-size must be >= 1")

    def count(self, n_layers: int, at_most: int | None = None) -> int:
        """k for a model of ``n_layers``; ``at_most`` is the method's own limit."""
        k = self.n_remove if self.n_remove is not None else round(self.ratio * n_layers)
        limit = n_layers - 1 if at_most is None else min(at_most, n_layers - 1)
        if k > limit:
            raise ValueError(f"cannot remove {k} of {n_layers} layers with this method "
                             f"(at most {limit}); lower --n-remove / --ratio")
        return k


# ---------------------------------------------------------------------------------------------
# running and scoring
# ---------------------------------------------------------------------------------------------


def run_modules(modules: Sequence[tuple[nn.Module, str]], h: torch.Tensor, ctx: LayerContext
                ) -> torch.Tensor:
    """Run (layer, layer type) pairs in order on h (B, T, d), without a cache."""
    for layer, kind in modules:
        h = layer(h, attention_mask=ctx.masks[kind], position_ids=ctx.position_ids,
                  use_cache=False, position_embeddings=ctx.position_embeddings)
    return h


def typed_layers(model) -> list[tuple[nn.Module, str]]:
    """The model's decoder layers paired with their mask types."""
    from ..models.adapters import get_layers

    return [(l, layer_type(model.config, i)) for i, l in enumerate(get_layers(model))]


def token_nll(model, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
              target: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed next-token NLL of the last layer's output h (B, T, d), and the tokens counted.

    ``target`` (B, T) marks the tokens to predict (default: every real token).
    """
    target = mask if target is None else target
    logits = get_head(model)(get_norm(model)(h))[:, :-1].float()  # (B, T-1, V)
    valid = (mask[:, :-1] * target[:, 1:]).bool()  # predicting a target token from a real token
    nll = F.cross_entropy(logits[valid], ids[:, 1:][valid], reduction="sum")
    return float(nll), int(valid.sum())


def sequence_cosine(model, h: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per sequence: cosine of the flattened (tokens x d) final-norm states of h and ref. -> (B,)

    Used by SLM and LaCo; the final norm is applied to both, as in their code (which compares
    transformers' last hidden state, taken after the norm). Padding positions are excluded.
    """
    norm = get_norm(model)
    a, b = norm(h).float() * mask[..., None], norm(ref).float() * mask[..., None]  # (B, T, d)
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)


@torch.no_grad()
def module_inputs(model, modules: dict, batches, add: Callable[[object, torch.Tensor], None]) -> None:
    """Run ``model`` over ``batches`` of (input_ids, attention_mask) and call ``add(key, x)`` with
    the input of every ``modules[key]`` at the real tokens, x: (tokens, d_in)."""
    mask_now: dict = {}

    def hook(key):
        def f(module, args):
            add(key, args[0][mask_now["m"]])
        return f

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in modules.items()]
    try:
        for ids, mask in batches:
            mask_now["m"] = mask.bool()
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()


def input_hessians(model, modules: dict, batches) -> dict:
    """H = 2 X X^T / n (float32) of every ``modules[key]``'s input over the real tokens of
    ``batches``; keys whose module saw no token are left out."""
    acc: dict = {}

    def add(key, x):
        x = x.float()  # (tokens, d_in)
        n, h = acc.get(key, (0, 0.0))
        acc[key] = (n + x.shape[0], h + x.T @ x)

    module_inputs(model, modules, batches, add)
    return {k: 2 * h / n for k, (n, h) in acc.items() if n}


def non_embedding_parameters(model) -> int:
    """Parameters outside the token embedding and the LM head (the target of width methods)."""
    outside = {id(p): p.numel() for m in (get_embed(model), get_head(model)) for p in m.parameters()}
    return count_parameters(model) - sum(outside.values())


def loss_gradients(model, calib, batch_size: int = 8) -> dict[nn.Parameter, torch.Tensor]:
    """dL/dW of every parameter, summed over calibration batches (L: the mean target-token NLL of a
    batch); the model's own .grad and requires_grad are left as they were."""
    device = next(model.parameters()).device
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    used = 0
    try:
        for ids, mask, target in calib.target_batches(batch_size, device):
            if not target[:, 1:].any():  # no answer token survived the cut: the mean loss is NaN
                continue
            labels = ids.masked_fill(target == 0, -100)
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            used += 1
        if used == 0:
            raise ValueError(NO_TARGETS)
        return {p: p.grad for p in model.parameters() if p.grad is not None}
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)


# ---------------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def merge_layers(layers: Sequence[nn.Module], rule: MergeRule = "paper") -> nn.Module:
    """One layer from a window of layers (bottom first); norms are the bottom layer's.

    paper:       theta_l + sum_k (theta_k - theta_l)    (LaCo's RDSC, SLM's paper formula)
    keep_top:    theta_h                              (what SLM's and LaCo's released code computes)
    keep_bottom: theta_l                              (plain deletion of the layers above l)
    mean:        mean_k theta_k
    Applied to the seven projections and their biases (Qwen2 q/k/v).
    """
    if not layers:
        raise ValueError("nothing to merge")
    base = copy.deepcopy(layers[0])
    for name, p in base.named_parameters():
        if name.split(".")[-2] not in MERGED:  # norms (incl. Qwen3 q_norm/k_norm) stay
            continue
        ws = [dict(l.named_parameters())[name] for l in layers]
        if rule == "paper":
            p.copy_(ws[0] + sum(w - ws[0] for w in ws[1:]))
        elif rule == "keep_top":
            p.copy_(ws[-1])
        elif rule == "keep_bottom":
            p.copy_(ws[0])
        elif rule == "mean":
            p.copy_(torch.stack(list(ws)).mean(0))
        else:
            raise ValueError(f"unknown merge rule {rule!r}; choose paper, keep_top, keep_bottom, mean")
    return base


# ---------------------------------------------------------------------------------------------
# similarity-gated sweeps (SLM, LaCo)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepTarget(DepthTarget):
    """Either a target (n_remove / ratio: T is found by bisection) or a threshold T; a merge rule."""

    threshold: float | None = None
    """Cosine threshold T; set it (and no target) to run the original, untargeted sweep."""
    merge: MergeRule = "paper"
    """paper: theta_l + sum(theta_k - theta_l); keep_top: the released code's result; keep_bottom; mean."""
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


class DenseStates:
    """The dense model's input of every layer and its last output, per calibration batch, to score
    edited layer lists from the first edited layer on (layers below it are still dense)."""

    def __init__(self, model, calib, batch_size: int):
        self.model = model
        self.layers = typed_layers(model)
        device = next(model.parameters()).device
        self.batches = []  # per batch: (ctx, mask, dense input of every layer, dense output)
        with torch.no_grad():
            for ids, mask in calib.batches(batch_size, device):
                ctx = layer_inputs(model, ids, mask)
                h, inputs = ctx.hidden, []
                for mod in self.layers:
                    inputs.append(h)
                    h = run_modules([mod], h, ctx)
                self.batches.append((ctx, mask, inputs, h))

    @torch.no_grad()
    def similarity(self, modules: Sequence[tuple[nn.Module, str]], lowest: int) -> float:
        """Mean per-sequence ``sequence_cosine`` to the dense model of the dense layers below
        ``lowest`` followed by ``modules``."""
        total, count = 0.0, 0
        for ctx, mask, inputs, ref in self.batches:
            out = run_modules(modules, inputs[lowest], ctx)
            total += float(sequence_cosine(self.model, out, ref, mask).sum())
            count += out.shape[0]
        return total / count


def sweep_threshold(cfg: SweepTarget, n_layers: int, at_most: int,
                    removed_at: Callable[[float, int], int], desc: str, progress: bool
                    ) -> tuple[float, int | None]:
    """(T, budget): the configured threshold without a target, else the bisected T for k layers
    (``removed_at(T, k)`` runs the sweep capped at k)."""
    if cfg.n_remove is None and cfg.ratio is None:
        return cfg.threshold, None
    budget = cfg.count(n_layers, at_most=at_most)
    if budget == 0:
        return 1.0, 0
    bar = tqdm(total=cfg.bisect_steps + 1, desc=desc, disable=not progress)

    def counted(t: float) -> int:
        bar.update(1)
        return removed_at(t, budget)

    T = bisect_threshold(counted, budget, steps=cfg.bisect_steps)
    bar.close()
    return T, budget


# ---------------------------------------------------------------------------------------------
# threshold search
# ---------------------------------------------------------------------------------------------


def bisect_threshold(removed_at: Callable[[float], int], k: int, lo: float = -1.0, hi: float = 1.0,
                     steps: int = 20) -> float:
    """The highest threshold in [lo, hi] at which a capped sweep removes k layers.

    ``removed_at(T)`` is non-increasing in T in practice (a stricter threshold accepts fewer
    merges) and capped at k, so the set {T : removed_at(T) == k} is an interval starting at lo.
    """
    got = removed_at(lo)
    if got < k:
        raise ValueError(f"even accepting every merge removes only {got} layers, fewer than {k}")
    for _ in range(steps):
        mid = (lo + hi) / 2
        if removed_at(mid) >= k:
            lo = mid
        else:
            hi = mid
    return lo
