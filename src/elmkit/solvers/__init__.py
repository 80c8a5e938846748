"""Fixed-point solvers (naive, Anderson, Broyden) with per-token stopping.

The implementation lives in ``elmkit/models/elm_solvers.py`` so that a saved ELM folder carries it
for ``trust_remote_code`` loading; this package is its public home.
"""

from ..models.elm_solvers import SOLVERS, NonFiniteError, SolverInfo, anderson, broyden, naive, solve

__all__ = ["SOLVERS", "NonFiniteError", "SolverInfo", "anderson", "broyden", "naive", "solve"]
