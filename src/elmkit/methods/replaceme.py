"""ReplaceMe: delete a span of layers and fold a linear map into the MLP below it
(Shopkhoev et al., 2025, arXiv 2505.02819). Training-free.

With h_l the output of layer l (before the final norm), the span is chosen on the last non-pad
token of each calibration sequence s:

    d_l = mean_s arccos(cos(h_l, h_{l+n})) / pi        l = 0 .. N-1-n,    l* = argmin_l d_l

and layers l*+1 .. l*+n go. On every non-pad calibration token, with X the MLP output of layer l*,
Y = h_{l*+n} and Z = h_{l*} - X (the attention + residual part of layer l*), a map T (d x d) is fit
so that layer l* alone outputs Z + X T ~ Y:

    lstsq (default):  T = (X^T X + ridge I)^-1 X^T (Y - Z)       (normal equations in float64)
    cosine:           min_T mean_t 1 - cos(X T, Y - Z)          (accurate: 1 - cos(X T + Z, Y))
                      Adam from T = I, lr 1e-4, 1024-token mini-batches, 10 epochs

T is folded into the down projection, W_down <- T^T W_down (a bias b <- b T), so the model has
exactly n layers' parameters fewer and no new modules. n = 0 leaves the model untouched (plan runs
no forward pass, fit returns I, apply_ does nothing).

Differences from the official code, on purpose: padding is masked when collecting X, Y, Z (the
official least squares includes pad positions); activations come from the model at its own precision
(official: loaded in 4-bit NF4); the last layer's output is compared before the final norm (official:
transformers' post-norm last hidden state); one span only (official ``num_A`` can pick several);
the normal equations are solved by Cholesky, falling back to the pseudo-inverse (the minimum-norm
least-squares T) when X^T X + ridge I is singular, e.g. fewer calibration tokens than d with ridge 0
(official: ``torch.linalg.inv``); the cosine solver keeps its activations in float32 (official:
bfloat16).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.calibration import Calibration
from ..models.adapters import get_layers, layer_inputs, num_layers, remove_layers_, run_layers
from .common import DepthTarget


@dataclass(frozen=True)
class ReplaceMeConfig(DepthTarget):
    """How many layers ReplaceMe removes (n_remove or ratio) and how it fits the map T."""

    solver: Literal["lstsq", "cosine"] = "lstsq"
    """lstsq: closed-form least squares; cosine: Adam on the cosine distance."""
    ridge: float = 0.0
    """lstsq: ridge term alpha added to X^T X (0: plain least squares)."""
    epochs: int = 10
    """cosine: passes over the calibration tokens."""
    lr: float = 1e-4
    """cosine: Adam learning rate."""
    token_batch: int = 1024
    """cosine: tokens per Adam step."""
    accurate: bool = False
    """cosine: fit the whole layer output, 1 - cos(X T + Z, Y), instead of 1 - cos(X T, Y - Z)."""
    seed: int = 0
    """cosine: seed of the token shuffling."""

    def __post_init__(self):
        super().__post_init__()
        if self.solver not in ("lstsq", "cosine"):
            raise ValueError("--solver must be lstsq or cosine")
        if not self.ridge >= 0:
            raise ValueError("--ridge must be >= 0")
        if self.epochs < 1:
            raise ValueError("--epochs must be >= 1")
        if not self.lr > 0:
            raise ValueError("--lr must be > 0")
        if self.token_batch < 1:
            raise ValueError("--token-batch must be >= 1")


@dataclass(frozen=True)
class ReplaceMePlan:
    """The span ReplaceMe replaces."""

    start: int
    """l*: the kept layer whose down_proj absorbs T."""
    n_remove: int
    """n: layers l*+1 .. l*+n are deleted."""
    distances: tuple[float, ...]
    """d_l for every candidate l = 0 .. N-1-n."""


# ---------------------------------------------------------------------------------------------
# choosing the span
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def distances(model, calib: Calibration, n: int, batch_size: int = 8) -> list[float]:
    """d_l for l = 0 .. N-1-n: mean over sequences of the angular distance between the outputs of
    layers l and l+n at the sequence's last non-pad token."""
    device = next(model.parameters()).device
    N = num_layers(model)
    total, count = torch.zeros(N - n, dtype=torch.float64), 0
    for ids, mask in calib.batches(batch_size, device):
        ctx = layer_inputs(model, ids, mask)
        real = mask.bool().any(1)  # (B,) an all-pad row has no last token
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # (B,) index of the last 1 in each row
        rows = torch.arange(ids.shape[0], device=device)
        h, outs = ctx.hidden, []
        for i in range(N):
            h = run_layers(model, h, ctx, i, i + 1)
            outs.append(h[rows, last][real].double())  # (B', d) output of layer i
        for l in range(N - n):
            # float64 and clamped: an identical pair must give exactly ~0, not arccos(1 - 1e-7)
            cos = F.cosine_similarity(outs[l], outs[l + n], dim=-1).clamp(-1, 1)
            total[l] += (torch.arccos(cos) / math.pi).sum().cpu()
        count += int(real.sum())
    return (total / max(count, 1)).tolist()


def plan(model, calib: Calibration, cfg: ReplaceMeConfig) -> ReplaceMePlan:
    N = num_layers(model)
    n = cfg.count(N, at_most=N - 1)
    if n == 0:  # every d_l is 0 by definition; no forward pass
        return ReplaceMePlan(0, 0, (0.0,) * N)
    d = distances(model, calib, n, cfg.batch_size)
    start = min(range(len(d)), key=lambda l: (d[l], l))
    return ReplaceMePlan(start, n, tuple(d))


# ---------------------------------------------------------------------------------------------
# fitting T
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def activations(model, p: ReplaceMePlan, calib: Calibration, batch_size: int = 8,
                progress: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per calibration batch, on its non-pad tokens: (X, H, Y), each (M, d) in float32, with X the
    MLP output of layer ``p.start``, H its layer output and Y the output of layer start + n.
    Z = H - X is left to the caller, who picks the precision of the difference."""
    _check_plan(model, p)
    device = next(model.parameters()).device
    seen = {}
    hook = get_layers(model)[p.start].mlp.register_forward_hook(
        lambda module, args, out: seen.__setitem__("x", out))
    try:
        for ids, mask in tqdm(calib.batches(batch_size, device), total=math.ceil(len(calib) / batch_size),
                              desc="ReplaceMe activations", disable=not progress):
            ctx = layer_inputs(model, ids, mask)
            h = run_layers(model, ctx.hidden, ctx, 0, p.start + 1)  # (B, T, d) output of layer l*
            x = seen.pop("x")
            y = run_layers(model, h, ctx, p.start + 1, p.start + p.n_remove + 1)
            valid = mask.bool()
            yield x[valid].float(), h[valid].float(), y[valid].float()
    finally:
        hook.remove()


def lstsq_transform(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], ridge: float = 0.0) -> torch.Tensor:
    """T = (X^T X + ridge I)^-1 X^T R from (X, R) chunks, each (M_i, d); float64, (d, d).

    X^T X and X^T R are accumulated in float64. Cholesky solves the system when it is positive
    definite; a rank-deficient one (e.g. fewer tokens than d with ridge 0) gets the minimum-norm
    least-squares solution through the pseudo-inverse instead of a blown-up T.
    """
    xtx = xtr = None
    for x, r in chunks:
        x, r = x.double(), r.double()
        if xtx is None:
            xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            xtr = torch.zeros(x.shape[1], r.shape[1], dtype=torch.float64, device=x.device)
        xtx += x.T @ x
        xtr += x.T @ r
    if xtx is None:
        raise ValueError("no calibration tokens to fit T on")
    d = xtx.shape[0]
    a = xtx + ridge * torch.eye(d, dtype=torch.float64, device=xtx.device)
    L, info = torch.linalg.cholesky_ex(a)
    pivots = L.diagonal() ** 2
    # a singular matrix leaves a pivot of rounding size; the cut-off is pinv's default rtol
    if int(info) == 0 and pivots.min() > d * torch.finfo(torch.float64).eps * pivots.max():
        return torch.cholesky_solve(xtr, L)
    warnings.warn("X^T X + ridge I is singular: T is the minimum-norm least-squares solution "
                  "(more calibration tokens or --ridge > 0 avoid this)", stacklevel=2)
    return torch.linalg.pinv(a, hermitian=True) @ xtr


def cosine_transform(x: torch.Tensor, target: torch.Tensor, z: torch.Tensor | None = None,
                     epochs: int = 10, lr: float = 1e-4, token_batch: int = 1024, seed: int = 0,
                     device=None, progress: bool = False) -> torch.Tensor:
    """T minimising mean_t 1 - cos(x T + z, target) (z = 0 when None) by Adam from T = I.

    x, target, z: (M, d), may live on the CPU; mini-batches go to ``device``. The token order of
    every epoch comes from ``seed`` alone, so the result is reproducible. Returns float32 (d, d).
    """
    M, d = x.shape
    device = x.device if device is None else device
    T = torch.eye(d, device=device, requires_grad=True)
    opt = torch.optim.Adam([T], lr=lr)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * math.ceil(M / token_batch), desc="ReplaceMe cosine", disable=not progress)
    with torch.enable_grad():
        for _ in range(epochs):
            for idx in torch.randperm(M, generator=g).split(token_batch):
                pred = x[idx].to(device, torch.float32) @ T  # (b, d)
                if z is not None:
                    pred = pred + z[idx].to(device, torch.float32)
                loss = (1 - F.cosine_similarity(pred, target[idx].to(device, torch.float32), dim=-1)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.5f}")
    bar.close()
    return T.detach()


def fit(model, plan: ReplaceMePlan, calib: Calibration, cfg: ReplaceMeConfig,
        progress: bool = True) -> torch.Tensor:
    """T (d, d) in float32 on the model's device, fit on ``calib``; the model is not changed."""
    device = next(model.parameters()).device
    d = get_layers(model)[plan.start].mlp.down_proj.out_features
    if plan.n_remove == 0:
        return torch.eye(d, device=device)
    acts = activations(model, plan, calib, cfg.batch_size, progress)
    if cfg.solver == "lstsq":
        # Y - Z = Y - H + X, formed in float64 so a near-cancelling span keeps its digits
        T = lstsq_transform(((x, y.double() - h.double() + x.double()) for x, h, y in acts), cfg.ridge)
        return T.float()
    xs, hs, ys = zip(*((x.cpu(), h.cpu(), y.cpu()) for x, h, y in acts))
    x, h, y = torch.cat(xs), torch.cat(hs), torch.cat(ys)  # (M, d) each, on the CPU
    z = h - x
    del h
    target, z = (y, z) if cfg.accurate else (y - z, None)
    return cosine_transform(x, target, z, cfg.epochs, cfg.lr, cfg.token_batch, cfg.seed, device, progress)


@torch.no_grad()
def fit_cosines(model, p: ReplaceMePlan, T: torch.Tensor, calib: Calibration,
                batch_size: int = 8) -> tuple[float, float]:
    """Mean over non-pad tokens of cos(X T + Z, Y) (the fit) and cos(X + Z, Y) (plain deletion)."""
    if p.n_remove == 0:
        return 1.0, 1.0
    fitted, deleted, count = 0.0, 0.0, 0
    for x, h, y in activations(model, p, calib, batch_size):
        y = y.double()  # float64 cosines: an exact fit reads 1, not 1 + 1e-7
        fitted += float(F.cosine_similarity((h - x + x @ T.to(x)).double(), y, dim=-1).sum())
        deleted += float(F.cosine_similarity(h.double(), y, dim=-1).sum())
        count += x.shape[0]
    return fitted / max(count, 1), deleted / max(count, 1)


# ---------------------------------------------------------------------------------------------
# folding
# ---------------------------------------------------------------------------------------------


def _check_plan(model, p: ReplaceMePlan) -> None:
    N = num_layers(model)
    if p.n_remove < 1 or not 0 <= p.start < p.start + p.n_remove < N:
        raise ValueError(f"plan start={p.start}, n_remove={p.n_remove} does not fit a model of {N} layers")


@torch.no_grad()
def apply_(model, plan: ReplaceMePlan, T: torch.Tensor):
    """Fold T into layer ``plan.start``'s down_proj and delete the n layers above it, in place."""
    if plan.n_remove == 0:
        return model
    _check_plan(model, plan)
    down = get_layers(model)[plan.start].mlp.down_proj  # weight (d, d_ff): out = a W^T + b
    d = down.out_features
    if tuple(T.shape) != (d, d):
        raise ValueError(f"T has shape {tuple(T.shape)}, expected ({d}, {d})")
    T = T.to(down.weight.device, torch.float64)
    # (a W^T + b) T = a (T^T W)^T + b T
    down.weight.copy_((T.T @ down.weight.double()).to(down.weight.dtype))
    if down.bias is not None:
        down.bias.copy_((down.bias.double() @ T).to(down.bias.dtype))
    return remove_layers_(model, range(plan.start + 1, plan.start + plan.n_remove + 1))


def compress_(model, calib: Calibration, cfg: ReplaceMeConfig, train: Calibration | None = None,
              progress: bool = True) -> tuple[ReplaceMePlan, dict]:
    """plan + fit + apply_ in place; training-free (``train`` is ignored)."""
    p = plan(model, calib, cfg)
    T = fit(model, p, calib, cfg, progress)
    fitted, deleted = fit_cosines(model, p, T, calib, cfg.batch_size)
    apply_(model, p, T)
    stats = {"solver": cfg.solver, "start": p.start, "n_remove": p.n_remove,
             "distance": p.distances[p.start] if p.n_remove else 0.0,
             "fit_cosine": fitted, "deletion_cosine": deleted}
    return p, stats
