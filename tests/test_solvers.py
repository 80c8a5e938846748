import pytest
import torch

from elmkit.solvers import NonFiniteError, solve


def _contraction(d=16, rho=0.8, seed=0, B=2, T=5, slow=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = rho * A / torch.linalg.matrix_norm(A, ord=2)
    if slow:  # symmetric, eigenvalues spread up to rho: naive needs ~log(tol)/log(rho) steps
        Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        A = Q @ torch.diag(torch.linspace(0.3, rho, d, dtype=torch.float64)) @ Q.T
    b = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    z_star = torch.linalg.solve(torch.eye(d, dtype=torch.float64) - A, b[..., None])[..., 0]
    return (lambda z: z @ A.T + b), z_star, torch.zeros(B, T, d, dtype=torch.float64)


@pytest.mark.parametrize("solver", ["naive", "anderson", "broyden"])
def test_solvers_reach_tol_on_a_contraction(solver):
    f, z_star, z0 = _contraction()
    out, info = solve(f, z0, solver=solver, max_iter=200, tol=1e-8)
    assert bool(info.converged.all()), info.trace[-3:]
    torch.testing.assert_close(out, z_star, atol=1e-6, rtol=0)


def test_anderson_needs_fewer_evaluations_than_naive():
    f, _, z0 = _contraction(rho=0.97, slow=True)
    _, naive = solve(f, z0, solver="naive", max_iter=500, tol=1e-6)
    _, anderson = solve(f, z0, solver="anderson", max_iter=500, tol=1e-6, m=5)
    _, broyden = solve(f, z0, solver="broyden", max_iter=500, tol=1e-6)
    assert naive.converged.all() and anderson.converged.all() and broyden.converged.all()
    assert anderson.iterations.max() < naive.iterations.max() / 2
    assert broyden.iterations.max() < naive.iterations.max()


@pytest.mark.parametrize("solver", ["naive", "anderson", "broyden"])
def test_converged_tokens_are_frozen_while_hard_ones_iterate(solver):
    # token t contracts towards target[t] at rate c[t]: tokens 0,1 easy (0.05), 2,3 hard (0.9)
    c = torch.tensor([0.05, 0.05, 0.9, 0.9], dtype=torch.float64)[None, :, None]
    target = torch.randn(1, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    seen = []

    def f(z):
        seen.append(z.clone())
        return target + c * (z - target)

    out, info = solve(f, torch.zeros(1, 4, 8, dtype=torch.float64), solver=solver, max_iter=300,
                      tol=1e-6)
    it = info.iterations[0]
    assert bool(info.converged.all())
    if solver != "broyden":  # Broyden solves these per-token linear maps in a few steps
        assert it[0] < it[2] and it[1] < it[3]
    k = int(it[0])  # after its convergence an easy token's input never moves again
    for z in seen[k + 1:]:
        torch.testing.assert_close(z[0, :2], seen[k][0, :2], atol=0, rtol=0)
    torch.testing.assert_close(out, target, atol=1e-5, rtol=0)


def test_relative_tolerance_and_fixed_iterations():
    f, _, z0 = _contraction()
    _, info = solve(f, z0, solver="naive", max_iter=7, tol=0.0)
    assert (info.iterations == 7).all() and len(info.trace) == 7  # tol 0: no early stop
    _, rel = solve(f, z0, solver="naive", max_iter=200, tol=1e-4, tol_mode="rel")
    assert rel.converged.all() and (rel.residual < 1e-4).all()


def test_bad_inputs_fail_clearly():
    f, _, z0 = _contraction()
    with pytest.raises(ValueError, match="unknown solver 'newton'.*naive, anderson, broyden"):
        solve(f, z0, solver="newton", max_iter=3)
    with pytest.raises(ValueError, match="max_iter"):
        solve(f, z0, max_iter=0)

    def blows_up(z):
        out = z * 10 + 1
        if (out.abs() > 1e3).any():
            out = out.clone()
            out[1, 3, 0] = float("nan")
        return out

    with pytest.raises(NonFiniteError, match="iteration 4 .* batch row 1, token 3"):
        solve(blows_up, z0, max_iter=10)
