"""Full BFGS: a dense inverse-Hessian approximation, updated in O(d^2) per iteration.

Every rank holds the same ``H`` and applies the same update to it from the same
allreduced gradient, so every rank takes the same step; the objective is collective.
The line search is L-BFGS's (``fleetmpi.optim.lbfgs.backtrack``). ``H`` is d x d float64:
``MAX_MATRIX_BYTES`` bounds it, and a larger model is refused with a pointer to lbfgs.
"""

from __future__ import annotations

import numpy as np

from fleetmpi.errors import CheckpointError
from fleetmpi.optim.lbfgs import QuasiNewton, curvature_ok
from fleetmpi.spec import BfgsSpec

# 200 MB: 5000 parameters. H is copied into every checkpoint and held by every rank.
MAX_MATRIX_BYTES = 200_000_000


def matrix_bytes(n_params: int) -> int:
    """Return the bytes (B) of the float64 inverse Hessian of ``n_params`` parameters."""
    return 8 * n_params * n_params


def size_refusal(n_params: int) -> str | None:
    """Return why BFGS cannot hold ``n_params`` parameters' matrix (None: it can)."""
    need = matrix_bytes(n_params)
    if need <= MAX_MATRIX_BYTES:
        return None
    return (f"bfgs keeps a d x d matrix: {n_params} parameters need {need / 1e6:.1f} MB "
            f"(limit {MAX_MATRIX_BYTES / 1e6:.0f} MB); use optimizer lbfgs")


def _matvec(H: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Return H v without BLAS, whose threaded sums may differ between processes of one run."""
    return np.einsum("ij,j->i", H, v)


def bfgs_update(H: np.ndarray, s: np.ndarray, y: np.ndarray, rows: int = 256) -> None:
    """Apply H <- (I - r s y') H (I - r y s') + r s s' in place, r = 1 / s'y; O(d^2) time, O(rows d) scratch."""
    r = 1.0 / float(s @ y)
    Hy = _matvec(H, y)
    a = r + r * r * float(y @ Hy)
    # Expanded (H symmetric): H + a s s' - r (Hy s' + s Hy'), a block of rows at a time
    # so the scratch stays small even for the largest allowed matrix.
    for lo in range(0, H.shape[0], rows):
        hi = min(lo + rows, H.shape[0])
        H[lo:hi] += a * s[lo:hi, None] * s[None, :] - r * (Hy[lo:hi, None] * s[None, :] + s[lo:hi, None] * Hy[None, :])


class BFGS(QuasiNewton):
    name = "bfgs"

    def __init__(self, spec: BfgsSpec, n_params: int) -> None:
        """Start with no curvature (H all zero: the first step is L-BFGS's bounded steepest descent)."""
        refusal = size_refusal(n_params)
        if refusal:
            raise ValueError(refusal)
        self.spec: BfgsSpec = spec
        self.n_params = n_params
        self.H = np.zeros((n_params, n_params))
        self.curved = False
        self.f: float | None = None
        self.g = np.zeros(n_params)
        self.last_step = 0.0
        self.evals = 0

    def direction(self, g: np.ndarray) -> np.ndarray:
        """Return the search direction -H g (before any curvature: -g / max(1, |g|_1))."""
        if self.curved:
            return -_matvec(self.H, g)
        return -g / max(1.0, float(np.abs(g).sum()))

    def update(self, s: np.ndarray, y: np.ndarray) -> bool:
        """Take the curvature of step ``s`` and gradient change ``y`` into H; False if skipped (s'y <= eps)."""
        if not curvature_ok(s, y):
            return False
        if not self.curved:
            # The standard scaling of H0 (Nocedal & Wright eq. 6.20), applied before the first update.
            self.H[...] = 0.0
            self.H.flat[:: self.n_params + 1] = float(s @ y) / float(y @ y)
            self.curved = True
        bfgs_update(self.H, s, y)
        return True

    def reset(self) -> None:
        """Drop the curvature (the next step is bounded steepest descent)."""
        self.H[...] = 0.0
        self.curved = False

    def state(self) -> dict[str, np.ndarray]:
        """Return H (all zero: no curvature yet), gradient and objective (NaN: none yet) by checkpoint name."""
        f = np.array([np.nan if self.f is None else self.f])
        return {"bfgs_H": self.H, "bfgs_g": self.g, "bfgs_f": f}

    def load_state(self, arrays: dict[str, np.ndarray], where: str = "checkpoint") -> None:
        """Take H, gradient and objective from a checkpoint's arrays (every rank); refuse another size."""
        if "bfgs_H" not in arrays:
            return
        p = self.n_params
        H, g, f = arrays["bfgs_H"], arrays.get("bfgs_g"), arrays.get("bfgs_f")
        if H.shape != (p, p) or g is None or g.shape != (p,) or f is None or f.shape != (1,):
            raise CheckpointError(f"{where}: bfgs_H has shape {H.shape} but the model has {p} parameters "
                                  f"(expected ({p}, {p}) with bfgs_g ({p},) and bfgs_f (1,))")
        self.H = np.array(H, dtype=np.float64)
        self.curved = bool(self.H.any())
        self.g = np.array(g, dtype=np.float64)
        fv = float(f[0])
        self.f = None if np.isnan(fv) else fv
