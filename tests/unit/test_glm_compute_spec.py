"""model.compute float32 for linear and logistic: accepted, built, out of the model identity, refused under exact sync."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from fleetmpi import spec as specmod
from fleetmpi.errors import BadInput
from fleetmpi.models import build_model

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_model" / "poisson.yaml"


def _load(tmp_path: Path, model: dict[str, object], name: str, sync: str) -> specmod.Spec:
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["model"], raw["sync"] = model, {"kind": sync}
    (tmp_path / name).write_text(yaml.safe_dump(raw))
    return specmod.load(tmp_path / name)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_linear_and_logistic_take_compute_float32(tmp_path: Path, kind: str) -> None:
    s64 = _load(tmp_path, {"kind": kind}, "a.yaml", "dense")
    s32 = _load(tmp_path, {"kind": kind, "compute": "float32"}, "b.yaml", "dense")
    m32, m64 = build_model(s32.model, 6, None), build_model(s64.model, 6, None)
    assert (m32.compute, m64.compute) == ("float32", "float64")
    assert "compute" not in yaml.safe_load(specmod.dump(s64))["model"]   # old model hashes stay as they were
    assert s32.spec_hash() != s64.spec_hash()
    assert s32.model.identity() == s64.model.identity()                  # same parameters: checkpoints resume
    # The model's gradient really is the float32 kernel's: close to float64, not equal.
    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 6)).astype(np.float32)
    y = (rng.random(300) < 0.5).astype(np.float32)
    p = 0.5 * rng.standard_normal(7)
    g32, g64 = np.empty(7), np.empty(7)
    l32, l64 = m32.loss_grad_sum(X, y, p, g32), m64.loss_grad_sum(X, y, p, g64)
    assert not np.array_equal(g32, g64)
    np.testing.assert_allclose(g32, g64, rtol=1e-5, atol=1e-5 * np.abs(g64).max())
    np.testing.assert_allclose(l32, l64, rtol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_exact_sync_refuses_compute_float32(tmp_path: Path, kind: str) -> None:
    with pytest.raises(BadInput, match=r"model\.compute: sync exact") as e:
        _load(tmp_path, {"kind": kind, "compute": "float32"}, "c.yaml", "exact")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("model", [{"kind": "softmax"}, {"kind": "ar", "lags": 3}])
def test_other_kinds_still_refuse_compute_float32(tmp_path: Path, model: dict[str, object]) -> None:
    with pytest.raises(BadInput, match=r"model\.compute: only kinds mlp, linear and logistic take compute"):
        _load(tmp_path, {**model, "compute": "float32"}, "d.yaml", "dense")


def test_exact_sync_refuses_ar_without_intercept_and_takes_it_with_one(tmp_path: Path) -> None:
    """Exact's row factors carry a bias row: refused before a job dir, not an abort mid-run."""
    def load(name: str, trend: str, sync: str) -> specmod.Spec:
        raw = yaml.safe_load(EXAMPLE.read_text())
        raw["model"], raw["sync"] = {"kind": "ar", "lags": 2, "trend": trend}, {"kind": sync}
        raw["data"] = {"train": "series.h5", "valid_tail": 0.2}
        (tmp_path / name).write_text(yaml.safe_dump(raw))
        return specmod.load(tmp_path / name)

    with pytest.raises(BadInput, match=r"sync\.kind: exact has no per-row factors for kind ar with trend none"):
        load("e.yaml", "none", "exact")
    assert load("f.yaml", "const", "exact").sync.kind == "exact"
    assert load("g.yaml", "none", "dense").model.trend == "none"
