"""A user's own model (``model: {kind: custom, class: ...}``) through the real CLI and real mpiexec.

The example Poisson regression (examples/custom_model/poisson.py) is checked against a
numpy reference and finite differences on random data; trained by L-BFGS at 1 and 2
ranks against a numpy Newton fit; trained with exact sync through a 2 -> 3 rank rescale
bitwise against a 1-rank run; served by `fleetmpi predict`. Broken classes exit 2 with
one line naming model.class.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from fleetmpi.models import build_model, task_of
from fleetmpi.spec import ModelSpec
from tests.conftest import ROOT, cli, events, run_rescaled_and_solo, write_spec

EXAMPLE = ROOT / "examples" / "custom_model"
CLASS = "poisson:PoissonRegression"
L2 = 1e-3


def _make_data_module() -> Any:
    spec = importlib.util.spec_from_file_location("custom_model_make_data", EXAMPLE / "make_data.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Poisson counts written by the example's own data maker (600 rows, 5 features, seeded)."""
    out = tmp_path_factory.mktemp("counts")
    _make_data_module().make(out, 600, 5, seed=4)
    return out


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f["X"][...], f["y"][...]


def _model(d: int, **options: Any) -> Any:
    spec = ModelSpec(kind="custom", class_path=CLASS, path=str(EXAMPLE), options=options, l2=L2)
    return build_model(spec, d, None)


def _reference(X: np.ndarray, y: np.ndarray, w: np.ndarray, full_nll: bool) -> tuple[float, np.ndarray]:
    """Return (summed loss, summed gradient) of Poisson regression in plain numpy float64."""
    X1 = np.hstack([X.astype(np.float64), np.ones((X.shape[0], 1))])
    eta = X1 @ w
    mu = np.exp(eta)
    loss = float(np.sum(mu - y * eta))
    if full_nll:
        loss += sum(math.lgamma(v + 1.0) for v in y.astype(np.float64))
    return loss, X1.T @ (mu - y)


@pytest.mark.parametrize("full_nll", [False, True])
def test_poisson_kernels_match_numpy_and_finite_differences(full_nll: bool) -> None:
    rng = np.random.default_rng(11)
    n, d = 97, 6
    X = rng.normal(0.0, 1.0, (n, d)).astype(np.float32)
    w = rng.normal(0.0, 0.3, d + 1)
    y = rng.poisson(np.exp(X @ w[:d] + w[d])).astype(np.float32)
    model = _model(d, full_nll=full_nll)
    assert task_of(model.spec) == "regression" and model.n_params == d + 1
    ref_loss, ref_grad = _reference(X, y, w, full_nll)

    g = rng.normal(size=d + 1)                       # garbage in: the kernel must overwrite it
    loss = model.loss_grad_sum(X, y, w, g)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(g, ref_grad, rtol=1e-10, atol=1e-10)

    rloss, factors = model.row_factors(X, y, w)
    ((U, V),) = factors
    assert U.shape == (n, d) and V.shape == (n, 1)
    from_rows = np.vstack([U.astype(np.float64).T @ V, V.sum(axis=0, keepdims=True)]).ravel()
    np.testing.assert_allclose(rloss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(from_rows, ref_grad, rtol=1e-10, atol=1e-10)

    h = 1e-6
    fd = np.empty(d + 1)
    for j in range(d + 1):
        e = np.zeros(d + 1)
        e[j] = h
        fd[j] = (_reference(X, y, w + e, full_nll)[0] - _reference(X, y, w - e, full_nll)[0]) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-6)

    g0 = rng.normal(size=d + 1)
    assert model.loss_grad_sum(X[:0], y[:0], w, g0) == 0.0 and not g0.any()


def _newton_fit(X: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Return the minimiser of mean Poisson loss + l2/2 |weights|^2 (bias unpenalised) by Newton's method."""
    n, d = X.shape
    X1 = np.hstack([X.astype(np.float64), np.ones((n, 1))])
    mask = np.append(np.ones(d), 0.0)
    w = np.zeros(d + 1)
    for _ in range(50):
        mu = np.exp(X1 @ w)
        grad = X1.T @ (mu - y) / n + l2 * mask * w
        hess = (X1.T * mu) @ X1 / n + l2 * np.diag(mask)
        w -= np.linalg.solve(hess, grad)
    return w


def _params(job: Path) -> np.ndarray:
    with h5py.File(job / "model.h5", "r") as f:
        return np.asarray(f["arrays/params"][...])


MODEL = {"kind": "custom", "class": CLASS, "path": str(EXAMPLE), "l2": L2, "full_nll": True}


def test_lbfgs_fit_at_1_and_2_ranks_matches_newton(tmp_path: Path, counts: Path) -> None:
    X, y = _read(counts / "train.h5")
    ref = _newton_fit(X, y.astype(np.float64), L2)
    fits = []
    for ranks in (1, 2):
        fleet = {"start": "p", "phases": {"p": {"ranks_per_node": ranks}}}
        spec = write_spec(tmp_path / f"lbfgs{ranks}.yaml", counts, model=MODEL, fleet=fleet,
                          optimizer={"kind": "lbfgs", "lbfgs": {"batch": "full"}}, goal={"max_steps": 40},
                          checkpoint={"every_steps": 20, "keep": 3, "keep_best": False})   # the optimizer's end point
        proc = cli("run", str(spec), "--job-dir", str(tmp_path / f"lbfgs{ranks}"))
        assert proc.returncode == 0, proc.stderr
        fits.append(_params(tmp_path / f"lbfgs{ranks}"))
    for w in fits:
        np.testing.assert_allclose(w, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(fits[0], fits[1], rtol=0, atol=1e-7)


def test_exact_sync_rescaled_2_to_3_is_bitwise_solo_and_predicts(tmp_path: Path, counts: Path) -> None:
    fleet = {"start": "two", "phases": {"two": {"ranks_per_node": 2}, "three": {"ranks_per_node": 3}},
             "rules": [{"in": "two", "when": "step >= 12", "then": {"goto": "three"}}]}
    rescaled, solo = run_rescaled_and_solo(
        tmp_path, counts, fleet, model=MODEL, sync={"kind": "exact"}, goal={"max_steps": 30},
        optimizer={"kind": "sgd", "lr": 0.05, "momentum": 0.9, "batch": 48})
    assert [(e["from_ranks"], e["to_ranks"]) for e in events(rescaled) if e["event"] == "rescale"] == [(2, 3)]
    w = _params(rescaled)
    assert np.array_equal(w, _params(solo))
    assert np.all(np.isfinite(w)) and np.any(w != 0.0)

    proc = cli("predict", str(rescaled / "model.h5"), str(counts / "valid.h5"), "--out", str(tmp_path / "p.h5"))
    assert proc.returncode == 0, proc.stderr
    X, _ = _read(counts / "valid.h5")
    with h5py.File(tmp_path / "p.h5", "r") as f:
        pred = f["arrays/pred"][...]
    np.testing.assert_allclose(pred, np.exp(X.astype(np.float64) @ w[:-1] + w[-1]), rtol=1e-12)


BAD_MODULE = '''
import numpy as np
from fleetmpi.models.base import Model
from poisson_copy import PoissonRegression


class NotAModel:
    task = "regression"


class Half(Model):
    task = "regression"

    @property
    def n_params(self):
        return 3


class Counting(PoissonRegression):
    task = "counting"


class ShortInit(PoissonRegression):
    def init(self, rng, scale):
        return np.ones(self.d)


class NoRows(PoissonRegression):
    row_factors = Model.row_factors
'''


def assert_one_line_exit_2(proc: Any, *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("fleetmpi: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(("model", "needles"), [
    ({"class": "no_such_module:M"}, ["model.class", "'no_such_module' is not importable", "searched"]),
    ({"class": "poisson_copy:Poison"}, ["has no attribute 'Poison'", "PoissonRegression"]),
    ({"class": "broken:NotAModel"}, ["not a subclass of fleetmpi.models.base.Model"]),
    ({"class": "broken:Half"}, ["does not implement", "init", "loss_grad_sum", "predict", "weight_mask"]),
    ({"class": "broken:Counting"}, ["task is 'counting'", "regression | binary | multiclass"]),
    ({"class": "broken:ShortInit"}, ["init(rng, scale)", "shape (6,)", "got shape (5,)"]),
    ({"class": "poisson_copy:PoissonRegression", "bogus_option": 3}, ["PoissonRegression(", "bogus_option"]),
    ({"class": "poisson_copy:PoissonRegression", "d": 3}, ["model.d:", "passed by fleetmpi itself"]),
    ({"class": "poisson copy:PoissonRegression"}, ["model.class", "package.module:ClassName"]),
])
def test_bad_custom_class_exits_2_with_one_line(tmp_path: Path, counts: Path, model: dict[str, Any],
                                                needles: list[str]) -> None:
    shutil.copy(EXAMPLE / "poisson.py", tmp_path / "poisson_copy.py")
    (tmp_path / "broken.py").write_text(BAD_MODULE)
    spec = write_spec(tmp_path / "spec.yaml", counts, model={"kind": "custom", **model})   # no path: the spec's folder
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"))
    assert_one_line_exit_2(proc, *needles)
    assert not (tmp_path / "job").exists()


def test_options_stay_errors_for_built_in_kinds(tmp_path: Path, counts: Path) -> None:
    spec = write_spec(tmp_path / "spec.yaml", counts, model={"kind": "linear", "full_nll": True})
    assert_one_line_exit_2(cli("run", str(spec), "--job-dir", str(tmp_path / "job")), "model.full_nll", "unknown key")


def test_exact_sync_without_row_factors_and_changed_source(tmp_path: Path, counts: Path) -> None:
    shutil.copy(EXAMPLE / "poisson.py", tmp_path / "poisson_copy.py")
    (tmp_path / "broken.py").write_text(BAD_MODULE)
    spec = write_spec(tmp_path / "exact.yaml", counts, model={"kind": "custom", "class": "broken:NoRows"},
                      sync={"kind": "exact"}, goal={"max_steps": 5})
    assert_one_line_exit_2(cli("run", str(spec), "--job-dir", str(tmp_path / "exact")), "NoRows has no row_factors")
    assert not (tmp_path / "exact").exists()

    spec = write_spec(tmp_path / "ok.yaml", counts, model={"kind": "custom", "class": "poisson_copy:PoissonRegression"},
                      goal={"max_steps": 5})
    assert cli("run", str(spec), "--job-dir", str(tmp_path / "ok")).returncode == 0
    out = tmp_path / "p.h5"
    assert cli("predict", str(tmp_path / "ok" / "model.h5"), str(counts / "valid.h5"), "--out", str(out)).returncode == 0
    with (tmp_path / "poisson_copy.py").open("a") as f:
        f.write("# an edit changes the model's meaning as far as fleetmpi can tell\n")
    out.unlink()
    proc = cli("predict", str(tmp_path / "ok" / "model.h5"), str(counts / "valid.h5"), "--out", str(out))
    assert_one_line_exit_2(proc, "sha256", "restore the module")
