"""Gaussian-process regression by random Fourier features (Rahimi and Recht), on one rank.

The kernel k(x, x') = s * kappa((x - x') / l) is approximated by D features
``phi(x) = sqrt(2 s / D) cos(omega x / l + b)`` with ``omega`` drawn from the kernel's
spectral density (rbf: standard normal; Matern nu: Student t with 2 nu degrees of freedom)
and ``b ~ U(0, 2 pi)``, both from the spec's seed alone. Regression is then exact Bayesian
linear regression on phi: weights w ~ N(0, I), noise variance e. Everything here is a
function of the data's Gram statistics ``F^T F``, ``F^T y``, ``y^T y`` and n, with
``F = cos(omega x / l + b)`` the unit-amplitude features: how those are summed over ranks
is the engine's business (``fleetmpi.engine.gp``).

Hyperparameters live in log space, ``theta = [log l_1 .. log l_m, log s, log e]`` (m = 1
shared or d per feature); y is standardised (mean, std) before any of this, as
scikit-learn's ``normalize_y`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KERNELS = ("rbf", "matern32", "matern52")
_DOF = {"matern32": 3.0, "matern52": 5.0}   # 2 nu: the Student t's degrees of freedom


def draw_frequencies(kernel: str, d: int, features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (omega (features, d), b (features,)) for unit lengthscale, from ``seed`` alone (never the rank)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid: {', '.join(KERNELS)}")
    rng = np.random.default_rng([seed, 0x6790, KERNELS.index(kernel)])
    omega = rng.standard_normal((features, d))
    if kernel in _DOF:
        nu2 = _DOF[kernel]
        # Student t: a normal divided by sqrt(chi2(2 nu) / 2 nu), one scale per frequency.
        omega *= np.sqrt(nu2 / rng.chisquare(nu2, size=(features, 1)))
    b = rng.uniform(0.0, 2.0 * math.pi, size=features)
    return omega, b


def phase(X: np.ndarray, omega: np.ndarray, b: np.ndarray, ls: np.ndarray) -> np.ndarray:
    """Return Z = (X / l) omega^T + b (rows x features, float64); ``ls`` has 1 or d entries."""
    return (np.asarray(X, np.float64) / ls) @ omega.T + b


def split_theta(theta: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Return (lengthscales, signal variance, noise variance) from log-space ``theta``."""
    return np.exp(theta[:-2]), float(math.exp(theta[-2])), float(math.exp(theta[-1]))


@dataclass(frozen=True)
class Fit:
    """The log marginal likelihood at one theta and what its gradient and the posterior need."""

    lml: float                 # log p(y | theta) of the standardised targets (nats)
    grad_se: np.ndarray        # d lml / d (log s, log e)
    M: np.ndarray              # d lml / d P  (D x D, symmetric), P = Phi^T Phi
    v: np.ndarray              # d lml / d r  (D,), r = Phi^T y
    amp: float                 # sqrt(2 s / D): Phi = amp * F
    mean_w: np.ndarray         # posterior mean of the weights (D,)
    chol: np.ndarray           # lower Cholesky factor of A = P / e + I


def fit_stats(gram: np.ndarray, n: int, s: float, e: float) -> Fit:
    """Return the fit from the Gram of [F, y] ((D+1) x (D+1)) at signal ``s`` and noise ``e`` variances.

    Raises numpy.linalg.LinAlgError if A is not positive definite (a degenerate theta).
    """
    D = gram.shape[0] - 1
    amp2 = 2.0 * s / D
    P = amp2 * gram[:D, :D]
    r = math.sqrt(amp2) * gram[:D, D]
    q = float(gram[D, D])
    A = P / e
    A[np.diag_indices(D)] += 1.0
    L = np.linalg.cholesky(A)
    Ainv = _chol_inverse(L)
    m = Ainv @ r / e                               # posterior mean weights
    rm = float(r @ m)
    logdet = 2.0 * float(np.log(np.diag(L)).sum())
    lml = -0.5 * (q / e - rm / e) - 0.5 * logdet - 0.5 * n * math.log(2.0 * math.pi * e)
    M = -(np.outer(m, m) + Ainv) / (2.0 * e)
    v = m / e
    mPm = float(m @ P @ m)
    tr_AinvP = float(np.einsum("ij,ji->", Ainv, P))
    d_log_s = float(np.einsum("ij,ij->", M, P)) + 0.5 * float(v @ r)
    d_log_e = 0.5 * q / e + 0.5 * mPm / e - rm / e + 0.5 * tr_AinvP / e - 0.5 * n
    return Fit(lml, np.array([d_log_s, d_log_e]), M, v, math.sqrt(amp2), m, L)


def _chol_inverse(L: np.ndarray) -> np.ndarray:
    """Return A^-1 from A's lower Cholesky factor L, symmetric by construction."""
    Linv = np.linalg.solve(L, np.eye(L.shape[0]))
    return Linv.T @ Linv


def lengthscale_grad_rows(X: np.ndarray, y: np.ndarray, omega: np.ndarray, b: np.ndarray, ls: np.ndarray,
                          fit: Fit) -> np.ndarray:
    """Return d lml / d log l over the rows of (X, y): one entry per lengthscale (summed over rows).

    With Phi = amp cos Z and G = d lml / d Phi = 2 Phi M + y v^T, the derivative is
    sum_ij G_ij amp sin(Z_ij) omega_jk x_ik / l_k.
    """
    Z = phase(X, omega, b, ls)
    G = (2.0 * fit.amp) * (np.cos(Z) @ fit.M) + np.outer(y, fit.v)
    H = fit.amp * np.sin(Z) * G
    per_feature = ((np.asarray(X, np.float64) / ls) * (H @ omega)).sum(axis=0)
    return per_feature if ls.size > 1 else np.array([per_feature.sum()])


def chunk_stats(X: np.ndarray, y: np.ndarray, omega: np.ndarray, b: np.ndarray, ls: np.ndarray,
                with_dls: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Return (B^T B, S^T B or None) of one chunk: B = [F, y], S = dF / d log l for one shared lengthscale.

    With Z = (X / l) omega^T + b and F = cos Z, dZ / d log l = -(Z - b), so
    S = sin(Z) (Z - b). ``S^T B`` (D x (D + 1)) is what the shared lengthscale's gradient
    needs (``shared_lengthscale_grad``), computed from the same Z in the same pass as the
    Gram, so an evaluation reads the rows once.
    """
    Z = phase(X, omega, b, ls)
    B = np.empty((Z.shape[0], Z.shape[1] + 1))
    np.cos(Z, out=B[:, :-1])
    B[:, -1] = y
    gram = B.T @ B                     # numpy hands A^T A to BLAS syrk
    if not with_dls:
        return gram, None
    S = np.sin(Z)
    Z -= b
    S *= Z
    return gram, S.T @ B


def shared_lengthscale_grad(dstats: np.ndarray, fit: Fit) -> float:
    """Return d lml / d log l of a shared lengthscale from the summed S^T [F, y] (D x (D + 1)).

    dP / d log l = amp^2 (S^T F + F^T S) and dr / d log l = amp S^T y, so with M symmetric
    the derivative is 2 amp^2 sum(M * S^T F) + amp v . S^T y (as ``lengthscale_grad_rows``).
    """
    D = dstats.shape[0]
    return float(2.0 * fit.amp ** 2 * np.einsum("ij,ij->", fit.M, dstats[:, :D]) + fit.amp * (fit.v @ dstats[:, D]))


@dataclass
class GpModel:
    """A fitted random-feature GP: predicts mean and standard deviation in y's units."""

    kernel: str
    omega: np.ndarray          # (D, d) unit-lengthscale frequencies
    b: np.ndarray              # (D,) phases
    theta: np.ndarray          # log lengthscales, log signal variance, log noise variance
    mean_w: np.ndarray         # (D,) posterior mean weights
    chol: np.ndarray           # (D, D) lower Cholesky factor of A
    y_mean: float
    y_std: float

    task = "regression"

    @property
    def d(self) -> int:
        return int(self.omega.shape[1])

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (mean, std) of the predictive distribution of y (noise included) at X's rows, in y's units."""
        ls, s, e = split_theta(self.theta)
        D = self.omega.shape[0]
        Phi = math.sqrt(2.0 * s / D) * np.cos(phase(X, self.omega, self.b, ls))
        mean = Phi @ self.mean_w
        V = np.linalg.solve(self.chol, Phi.T)          # L^-1 phi: var = phi^T A^-1 phi + e
        var = np.einsum("ij,ij->j", V, V) + e
        return self.y_mean + self.y_std * mean, self.y_std * np.sqrt(var)

    def valid_sums(self, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Return summed squared error and summed negative log predictive density (nats) over the rows."""
        if X.shape[0] == 0:
            return {"mse": 0.0, "nlpd": 0.0}
        mu, sd = self.predict(X)
        r = np.asarray(y, np.float64) - mu
        nlpd = 0.5 * np.log(2.0 * math.pi * sd * sd) + 0.5 * (r / sd) ** 2
        return {"mse": float(r @ r), "nlpd": float(nlpd.sum())}

    def meta(self) -> dict[str, Any]:
        ls, s, e = split_theta(self.theta)
        return {"kind": "gp", "task": "regression", "d": self.d, "features": int(self.omega.shape[0]),
                "kernel": self.kernel, "lengthscale": ls.tolist(), "signal_variance": s, "noise_variance": e,
                "y_mean": self.y_mean, "y_std": self.y_std}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"omega": self.omega, "b": self.b, "theta": self.theta, "mean_w": self.mean_w, "chol": self.chol}

    def write(self, path: Path, meta: dict[str, Any]) -> None:
        """Write the model file atomically with the run's ``meta``."""
        from fleetmpi.h5store import write_h5_atomic
        write_h5_atomic(path, self.arrays(), {**self.meta(), **meta}, kind="model")

    @classmethod
    def from_file(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> GpModel:
        """Rebuild from a model file's arrays and meta; ValueError/KeyError when they do not fit."""
        omega = np.asarray(arrays["omega"], np.float64)
        D, d = omega.shape
        theta = np.asarray(arrays["theta"], np.float64)
        shapes = {"b": (D,), "mean_w": (D,), "chol": (D, D)}
        for name, shape in shapes.items():
            if arrays[name].shape != shape:
                raise ValueError(f"{name} has shape {arrays[name].shape}, expected {shape}")
        if theta.shape not in ((3,), (d + 2,)):
            raise ValueError(f"theta has shape {theta.shape}, expected (3,) or ({d + 2},)")
        return cls(str(meta["kernel"]), omega, np.asarray(arrays["b"], np.float64), theta,
                   np.asarray(arrays["mean_w"], np.float64), np.asarray(arrays["chol"], np.float64),
                   float(meta["y_mean"]), float(meta["y_std"]))
