"""Fixed-point solvers for z = f(z), per token, at any batch size.

Every solver has the signature ``solve(f, z0, *, max_iter, tol, tol_mode, ...) -> (out, info)``:

* ``f`` maps (B, T, d) -> (B, T, d); it is the ELM block phi(., h) and couples tokens through
  attention, so it is always evaluated on the whole tensor.
* Convergence is judged per token on the residual ||f(z) - z|| over d (``tol_mode="abs"``), or
  that divided by ||f(z)|| (``"rel"``). A converged token is frozen: its value stops changing
  while the other tokens iterate, so a batch mixing easy and hard tokens costs each token only
  its own iterations of *update*, and the loop ends when every token has converged.
* ``max_iter`` counts evaluations of f. ``out`` is the output of the last evaluation for active
  tokens (frozen tokens keep the output they converged with), so a KV cache written by the last
  call matches what is returned.
* ``info`` (:class:`SolverInfo`) carries per-token evaluation counts and final residuals.

A non-finite value in f's output stops the solve with the token and iteration named.

Solvers: ``naive`` (Picard iteration), ``anderson`` (Anderson acceleration, memory m, mixing
beta, Tikhonov lam relative to the residuals' scale; Walker & Ni 2011), ``broyden`` (good Broyden
on g(z) = f(z) - z with a low-rank inverse Jacobian, as in Bai et al. 2019 DEQ). This file
sits beside the ELM modeling file so that a saved ELM folder carries it for ``trust_remote_code``
loading; ``elmkit.solvers`` re-exports it.

Scalar example (f(z) = 0.5 z + 1, fixed point 2): naive halves the error each evaluation; Anderson
with m >= 1 solves this linear map exactly on its third evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class SolverInfo:
    """What a solve did, per token."""

    iterations: Tensor
    """(B, T) evaluations of f until the token converged (max_iter if it never did)."""
    residual: Tensor
    """(B, T) last residual of each token (abs or rel, as requested)."""
    converged: Tensor
    """(B, T) bool: residual fell below tol."""
    trace: list[float]
    """Max residual over active tokens after each evaluation."""


class NonFiniteError(FloatingPointError):
    """The fixed-point iteration produced NaN or inf."""


def _residual(fz: Tensor, z: Tensor, tol_mode: str) -> Tensor:
    r = (fz - z).float().norm(dim=-1)  # (B, T)
    if tol_mode == "rel":
        r = r / (fz.float().norm(dim=-1) + 1e-8)
    return r


def _check_finite(fz: Tensor, k: int) -> None:
    bad = ~torch.isfinite(fz).all(dim=-1)  # (B, T)
    if bad.any():
        b, t = (int(i) for i in bad.nonzero()[0])
        raise NonFiniteError(f"fixed-point iteration {k} produced NaN/inf at batch row {b}, "
                             f"token {t}; the block diverged (lower the learning rate, or "
                             "check the input)")


class _Tracker:
    """Per-token bookkeeping shared by the solvers."""

    def __init__(self, z0: Tensor, tol: float, tol_mode: str):
        B, T, _ = z0.shape
        self.tol, self.tol_mode = tol, tol_mode
        self.active = torch.ones(B, T, dtype=torch.bool, device=z0.device)
        self.iters = torch.zeros(B, T, dtype=torch.long, device=z0.device)
        self.res = torch.full((B, T), float("inf"), device=z0.device)
        self.out: Tensor | None = None
        self.trace: list[float] = []

    def record(self, x: Tensor, fx: Tensor, k: int) -> None:
        """After evaluation k (1-based) at x: update residuals, outputs, freeze converged tokens."""
        _check_finite(fx, k)
        r = _residual(fx, x, self.tol_mode)
        act = self.active
        self.res = torch.where(act, r, self.res)
        self.iters = torch.where(act, torch.full_like(self.iters, k), self.iters)
        self.out = fx if self.out is None else torch.where(act[..., None], fx, self.out)
        self.trace.append(float(r[act].max().detach()) if act.any() else 0.0)
        if self.tol > 0:
            self.active = act & ~(r < self.tol)

    def info(self) -> SolverInfo:
        return SolverInfo(self.iters, self.res, self.res < self.tol, self.trace)


def naive(f: Callable[[Tensor], Tensor], z0: Tensor, *, max_iter: int, tol: float = 0.0,
          tol_mode: str = "abs") -> tuple[Tensor, SolverInfo]:
    """Picard iteration z_{k+1} = f(z_k)."""
    tr = _Tracker(z0, tol, tol_mode)
    z = z0
    for k in range(1, max_iter + 1):
        fz = f(z)
        tr.record(z, fz, k)
        z = torch.where(tr.active[..., None], fz, tr.out)  # frozen tokens keep their value
        if not tr.active.any():
            break
    return tr.out, tr.info()


def anderson(f: Callable[[Tensor], Tensor], z0: Tensor, *, max_iter: int, tol: float = 0.0,
             tol_mode: str = "abs", m: int = 5, beta: float = 1.0, lam: float = 1e-4
             ) -> tuple[Tensor, SolverInfo]:
    """Anderson acceleration, per token: mix the last m iterates to cancel the residuals."""
    B, T, d = z0.shape
    N = B * T
    tr = _Tracker(z0, tol, tol_mode)
    dt = torch.promote_types(z0.dtype, torch.float32)  # mixing weights need >= fp32
    X = z0.new_zeros(N, m, d, dtype=dt)  # ring buffers of inputs / outputs
    F = z0.new_zeros(N, m, d, dtype=dt)
    x = z0
    for k in range(1, max_iter + 1):
        fx = f(x)
        tr.record(x, fx, k)
        if not tr.active.any() or k == max_iter:
            break
        slot = (k - 1) % m
        X[:, slot] = x.reshape(N, d).to(dt)
        F[:, slot] = fx.reshape(N, d).to(dt)
        n = min(k, m)
        if n == 1:
            nxt = fx.reshape(N, d).to(dt)  # plain step until there is a history
        else:
            nxt = anderson_mix(X[:, :n], F[:, :n], beta, lam)
        nxt = nxt.reshape(B, T, d).to(x.dtype)
        x = torch.where(tr.active[..., None], nxt, x)
    return tr.out, tr.info()


def anderson_mix(X: Tensor, F: Tensor, beta: float, lam: float, check: bool = True) -> Tensor:
    """Next Anderson iterate from n past inputs X and outputs F, each (N, n, d) with n >= 2.

    ``check=False`` skips the solve's host-side singularity check (CUDA-graph capture).
    """
    dt = X.dtype
    n = X.shape[1]
    G = F - X  # (N, n, d) residual history
    H = torch.bmm(G, G.transpose(1, 2))  # (N, n, n)
    # Tikhonov term scaled to the residuals, so it neither vanishes nor dominates as they shrink
    scale = H.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] + 1e-30
    H = H + lam * scale * torch.eye(n, device=H.device, dtype=dt)
    # bordered system [[0, 1^T], [1, H]] [mu; alpha] = [1; 0]: sum(alpha) = 1
    A = torch.zeros(X.shape[0], n + 1, n + 1, device=H.device, dtype=dt)
    A[:, 0, 1:] = 1
    A[:, 1:, 0] = 1
    A[:, 1:, 1:] = H / scale  # normalised: well conditioned whatever the scale
    rhs = torch.zeros(X.shape[0], n + 1, 1, device=H.device, dtype=dt)
    rhs[:, 0] = 1
    sol = torch.linalg.solve(A, rhs) if check else torch.linalg.solve_ex(A, rhs)[0]
    alpha = sol[:, 1:, 0]  # (N, n)
    return beta * torch.einsum("nk,nkd->nd", alpha, F) + (1 - beta) * torch.einsum("nk,nkd->nd", alpha, X)


def broyden(f: Callable[[Tensor], Tensor], z0: Tensor, *, max_iter: int, tol: float = 0.0,
            tol_mode: str = "abs", memory: int | None = None) -> tuple[Tensor, SolverInfo]:
    """Good Broyden on g(z) = f(z) - z with inverse Jacobian -I + U V^T (per token, no line search)."""
    B, T, d = z0.shape
    N = B * T
    L = memory or max_iter
    tr = _Tracker(z0, tol, tol_mode)
    dt = torch.promote_types(z0.dtype, torch.float32)
    U = z0.new_zeros(N, d, L, dtype=dt)
    VT = z0.new_zeros(N, L, d, dtype=dt)

    def matvec(v: Tensor, n: int) -> Tensor:  # (-I + U V^T) v, v: (N, d)
        if n == 0:
            return -v
        return -v + torch.einsum("ndl,nl->nd", U[:, :, :n], torch.einsum("nld,nd->nl", VT[:, :n], v))

    def rmatvec(v: Tensor, n: int) -> Tensor:  # v^T (-I + U V^T)
        if n == 0:
            return -v
        return -v + torch.einsum("nl,nld->nd", torch.einsum("nd,ndl->nl", v, U[:, :, :n]), VT[:, :n])

    z = z0
    fz = f(z)
    tr.record(z, fz, 1)
    g = (fz - z).reshape(N, d).to(dt)
    step = g  # -B g with B = -I: the first step is a plain iteration
    n = 0
    for k in range(2, max_iter + 1):
        if not tr.active.any():
            break
        act = tr.active.reshape(N, 1)
        dz = torch.where(act, step, torch.zeros_like(step))
        z = z + dz.reshape(B, T, d).to(z.dtype)
        fz = f(z)
        tr.record(z, fz, k)
        g_new = (fz - z).reshape(N, d).to(dt)
        dg = g_new - g
        vT = rmatvec(dz, n)  # (N, d)
        denom = (vT * dg).sum(-1, keepdim=True)
        u = (dz - matvec(dg, n)) / torch.where(denom.abs() < 1e-12, torch.ones_like(denom), denom)
        u = torch.nan_to_num(torch.where(act, u, torch.zeros_like(u)))
        vT = torch.nan_to_num(torch.where(act, vT, torch.zeros_like(vT)))
        i = n % L
        U[:, :, i], VT[:, i] = u, vT
        n = min(n + 1, L)
        g = g_new
        step = -matvec(g, n)
    return tr.out, tr.info()


SOLVERS: dict[str, Callable] = {"naive": naive, "anderson": anderson, "broyden": broyden}


def solve(f: Callable[[Tensor], Tensor], z0: Tensor, *, solver: str = "naive", max_iter: int,
          tol: float = 0.0, tol_mode: str = "abs", **options) -> tuple[Tensor, SolverInfo]:
    """Dispatch to a solver by name; unknown names list the known ones."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if max_iter < 1:
        raise ValueError("max_iter must be at least 1")
    if tol_mode not in ("abs", "rel"):
        raise ValueError(f"tol_mode must be 'abs' or 'rel', got {tol_mode!r}")
    return SOLVERS[solver](f, z0, max_iter=max_iter, tol=tol, tol_mode=tol_mode, **options)
