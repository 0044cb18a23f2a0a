"""Random-feature GP on one process: features against the kernels they approximate, the posterior
and log marginal likelihood against a direct n x n numpy computation, the LML gradient against
finite differences, the chunk split, and the spec's gp keys (bad values: one line each)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleetmpi import spec as specmod
from fleetmpi.engine.gp import CHUNK_ROWS, chunk_share
from fleetmpi.errors import BadInput
from fleetmpi.models.gp import GpModel, draw_frequencies, fit_stats, lengthscale_grad_rows, phase, split_theta


def kernel(name: str, r: np.ndarray) -> np.ndarray:
    """Return the unit-variance kernel at scaled distances r (the closed forms the features approximate)."""
    if name == "rbf":
        return np.exp(-0.5 * r * r)
    if name == "matern32":
        return (1 + math.sqrt(3) * r) * np.exp(-math.sqrt(3) * r)
    return (1 + math.sqrt(5) * r + 5 * r * r / 3) * np.exp(-math.sqrt(5) * r)


@pytest.mark.parametrize("name", ["rbf", "matern32", "matern52"])
def test_features_approximate_their_kernel(name: str) -> None:
    rng = np.random.default_rng(11)
    X = rng.standard_normal((30, 3))
    ls = np.array([1.7])
    omega, b = draw_frequencies(name, 3, 40000, seed=5)
    F = math.sqrt(2 / 40000) * np.cos(phase(X, omega, b, ls))
    r = np.linalg.norm(X[:, None] - X[None], axis=2) / ls[0]
    err = np.abs(F @ F.T - kernel(name, r)).max()
    assert err < 0.04, err     # Monte Carlo error ~ 1/sqrt(D)


def test_frequencies_come_from_the_seed_alone() -> None:
    a = draw_frequencies("matern32", 4, 64, seed=9)
    b = draw_frequencies("matern32", 4, 64, seed=9)
    c = draw_frequencies("matern32", 4, 64, seed=10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="valid: rbf, matern32, matern52"):
        draw_frequencies("cauchy", 4, 8, seed=0)


def problem(ard: bool, seed: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((60, 3))
    y = np.sin(X @ rng.standard_normal(3)) + 0.1 * rng.standard_normal(60)
    omega, b = draw_frequencies("rbf", 3, 40, seed=seed)
    ls = rng.uniform(0.5, 2.0, 3 if ard else 1)
    theta = np.r_[np.log(ls), math.log(0.8), math.log(0.05)]
    return X, y, omega, b, theta


def gram(X: np.ndarray, y: np.ndarray, omega: np.ndarray, b: np.ndarray, ls: np.ndarray) -> np.ndarray:
    B = np.c_[np.cos(phase(X, omega, b, ls)), y]
    return B.T @ B


def lml_direct(X: np.ndarray, y: np.ndarray, omega: np.ndarray, b: np.ndarray, theta: np.ndarray) -> float:
    """Return log N(y | 0, Phi Phi^T + e I) by the n x n formula."""
    ls, s, e = split_theta(theta)
    Phi = math.sqrt(2 * s / omega.shape[0]) * np.cos(phase(X, omega, b, ls))
    C = Phi @ Phi.T + e * np.eye(len(y))
    _sign, logdet = np.linalg.slogdet(C)
    return float(-0.5 * y @ np.linalg.solve(C, y) - 0.5 * logdet - 0.5 * len(y) * math.log(2 * math.pi))


@pytest.mark.parametrize("ard", [False, True])
def test_posterior_and_lml_match_the_direct_gp(ard: bool) -> None:
    X, y, omega, b, theta = problem(ard)
    ls, s, e = split_theta(theta)
    fit = fit_stats(gram(X, y, omega, b, ls), len(y), s, e)
    assert fit.lml == pytest.approx(lml_direct(X, y, omega, b, theta), rel=1e-10)
    Xs = np.random.default_rng(4).standard_normal((7, 3))
    model = GpModel("rbf", omega, b, theta, fit.mean_w, fit.chol, y_mean=0.3, y_std=2.0)
    mean, std = model.predict(Xs)
    D = omega.shape[0]
    Phi = math.sqrt(2 * s / D) * np.cos(phase(X, omega, b, ls))
    Ps = math.sqrt(2 * s / D) * np.cos(phase(Xs, omega, b, ls))
    C = Phi @ Phi.T + e * np.eye(len(y))
    Ks = Ps @ Phi.T
    mu = Ks @ np.linalg.solve(C, y)
    var = np.einsum("ij,ij->i", Ps, Ps) - np.einsum("ij,ji->i", Ks, np.linalg.solve(C, Ks.T)) + e
    np.testing.assert_allclose(mean, 0.3 + 2.0 * mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std, 2.0 * np.sqrt(var), rtol=1e-9)


@pytest.mark.parametrize("ard", [False, True])
def test_lml_gradient_matches_finite_differences(ard: bool) -> None:
    X, y, omega, b, theta = problem(ard, seed=8)

    def grad(th: np.ndarray) -> np.ndarray:
        ls, s, e = split_theta(th)
        fit = fit_stats(gram(X, y, omega, b, ls), len(y), s, e)
        return np.r_[lengthscale_grad_rows(X, y, omega, b, ls, fit), fit.grad_se]

    g = grad(theta)
    h = 1e-5
    for i in range(theta.size):
        up, dn = theta.copy(), theta.copy()
        up[i] += h
        dn[i] -= h
        fd = (lml_direct(X, y, omega, b, up) - lml_direct(X, y, omega, b, dn)) / (2 * h)
        assert g[i] == pytest.approx(fd, rel=1e-5, abs=1e-6), (i, g[i], fd)


def test_valid_sums_are_squared_error_and_gaussian_nlpd() -> None:
    X, y, omega, b, theta = problem(False, seed=2)
    ls, s, e = split_theta(theta)
    fit = fit_stats(gram(X, y, omega, b, ls), len(y), s, e)
    model = GpModel("rbf", omega, b, theta, fit.mean_w, fit.chol, 0.0, 1.0)
    rng = np.random.default_rng(6)
    Xv, yv = rng.standard_normal((9, 3)), rng.standard_normal(9)
    mu, sd = model.predict(Xv)
    sums = model.valid_sums(Xv, yv)
    assert sums["mse"] == pytest.approx(float(((yv - mu) ** 2).sum()))
    nlpd = -sum(math.log(math.exp(-0.5 * ((t - m) / v) ** 2) / (v * math.sqrt(2 * math.pi)))
                for t, m, v in zip(yv, mu, sd))
    assert sums["nlpd"] == pytest.approx(nlpd)
    assert model.valid_sums(Xv[:0], yv[:0]) == {"mse": 0.0, "nlpd": 0.0}


@pytest.mark.parametrize("n", [1, 1023, 1024, 5000, 7 * CHUNK_ROWS + 3])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_chunk_share_covers_rows_in_whole_chunks(n: int, size: int) -> None:
    shares = [chunk_share(n, r, size) for r in range(size)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert all(lo % CHUNK_ROWS == 0 and (hi % CHUNK_ROWS == 0 or hi == n) for lo, hi in shares)


BASE: dict[str, Any] = {"name": "t", "data": {"train": "train.h5"}, "goal": {"max_steps": 5},
                        "fleet": {"start": "a", "phases": {"a": {}}}}


def load(tmp_path: Path, **sections: Any) -> Any:
    import yaml
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**BASE, **sections}))
    return specmod.load(path)


def test_gp_section_defaults_and_hash(tmp_path: Path) -> None:
    sp = load(tmp_path, model={"kind": "gp"})
    assert sp.model.plain() == {"kind": "gp", "l2": 0.0, "hidden": [], "classes": None, "init_scale": 0.01,
                                "features": 1024, "kernel": "rbf", "lengthscale": "auto", "ard": False,
                                "signal": "auto", "noise": "auto"}
    # Other kinds' sections (and so their checkpoints' model hashes) do not carry gp keys.
    assert "features" not in load(tmp_path, model={"kind": "linear"}).model.plain()
    assert load(tmp_path, model={"kind": "gp", "features": 64}).model_hash() != sp.model_hash()


@pytest.mark.parametrize(("sections", "key", "valid"), [
    ({"model": {"kind": "gp", "features": 0}}, "model.features", "1..16384"),
    ({"model": {"kind": "gp", "features": 100000}}, "model.features", "1..16384"),
    ({"model": {"kind": "gp", "kernel": "cauchy"}}, "model.kernel", "'rbf' | 'matern32' | 'matern52'"),
    ({"model": {"kind": "gp", "lengthscale": -1.0}}, "model.lengthscale", "auto or a number in"),
    ({"model": {"kind": "gp", "lengthscale": "fit"}}, "model.lengthscale", "'auto'"),
    ({"model": {"kind": "gp", "noise": 0}}, "model.noise", "auto or a number in"),
    ({"model": {"kind": "gp", "signal": 1e9}}, "model.signal", "auto or a number in"),
    ({"model": {"kind": "gp", "ard": True, "lengthscale": 2.0}}, "model.ard", "lengthscale: auto"),
    ({"model": {"kind": "gp", "hidden": [8]}}, "model.hidden", "kind gp takes features"),
    ({"model": {"kind": "linear", "kernel": "rbf"}}, "model.kernel", "only kind gp"),
    ({"model": {"kind": "gp"}, "optimizer": {"kind": "sgd", "lr": 0.5}}, "optimizer", "leave the optimizer"),
    ({"model": {"kind": "gp"}, "sync": {"kind": "exact"}}, "sync", "leave the sync"),
])
def test_bad_gp_keys_are_one_line(tmp_path: Path, sections: dict[str, Any], key: str, valid: str) -> None:
    with pytest.raises(BadInput) as err:
        load(tmp_path, **sections)
    msg = str(err.value)
    assert "\n" not in msg and f"spec.yaml: {key}:" in msg and valid in msg, msg
