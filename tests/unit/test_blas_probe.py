"""kernels.skip_blas_probe: numba's registry loads without scipy.linalg, and numba BLAS still works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Each check runs in a fresh interpreter: the registry loads once per process.
PROBE = """
import sys
import numpy as np
from kernels import skip_blas_probe
assert skip_blas_probe() is True
assert skip_blas_probe() is False          # once loaded, a no-op
from numba.np import arraymath
assert arraymath._HAVE_BLAS                 # scipy is installed: numba's dot stays enabled
from kernels import sparse
rng = np.random.default_rng(0)
W = rng.standard_normal((8, 3))   # (d + 1, k): weights, then the bias row
X = sparse.CsrBatch(np.array([0, 2, 3], np.int64), np.array([1, 5, 0], np.int32), np.array([0.5, -2.0, 3.0], np.float32), 7)
P = sparse.softmax_predict_proba(X, W.ravel(), 3)     # a cached kernel load, then a run
Z = np.array([0.5 * W[1] - 2.0 * W[5], 3.0 * W[0]]) + W[7]
E = np.exp(Z - Z.max(axis=1, keepdims=True))
assert np.allclose(P, E / E.sum(axis=1, keepdims=True), rtol=1e-12, atol=0)
print("scipy.linalg" in sys.modules)
"""

DOT = """
import numpy as np
from numba import njit
from kernels import skip_blas_probe
skip_blas_probe()

@njit
def dot(a, b):
    return np.dot(a, b)

rng = np.random.default_rng(1)
a, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3))
assert np.allclose(dot(a, b), a @ b, rtol=1e-12, atol=1e-12)
print("ok")
"""


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_a_kernel_loads_and_runs_without_importing_scipy_linalg() -> None:
    assert _run(PROBE) == "False"


def test_numba_blas_still_works_after_the_probe_was_skipped() -> None:
    assert _run(DOT) == "ok"
