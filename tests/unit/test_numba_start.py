"""kernels.lean_numba_start, skip_cffi_support, num_threads: a rank's numba set-up without cffi or a
thread pool it cannot use, and numba still works."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Each check runs in a fresh interpreter: numba's registry loads once per process.
LEAN = """
import sys
import numpy as np
from numba import njit
from kernels import lean_numba_start, skip_cffi_support
lean_numba_start()
assert skip_cffi_support() is False         # once loaded, a no-op
from numba.core.typing import cffi_utils
assert cffi_utils.SUPPORTED is False
from kernels import cpu, reference
rng = np.random.default_rng(3)
X = rng.standard_normal((37, 6)).astype(np.float32)
y = rng.integers(0, 4, 37).astype(np.float32)
W = rng.standard_normal(7 * 4)
P = np.empty((37, 4))
cpu.softmax_predict_proba(X, W, 4, P)         # cached kernels load, then run
assert np.allclose(P, reference.softmax_predict_proba(X, W, 4), rtol=1e-9, atol=1e-12)
g = np.empty_like(W)
loss = cpu.softmax_grad(X, y, W, 4, g)
assert np.isclose(loss, -np.log(P[np.arange(37), y.astype(int)]).sum(), rtol=1e-9)
from numba.np.ufunc import parallel
assert not parallel._is_initialized         # NUMBA_NUM_THREADS=1: numba's thread pool was not started

@njit
def fresh(a):                               # compiled here: typing and lowering still work
    s = 0.0
    for v in a:
        s += v * v
    return s

assert fresh(np.arange(4.0)) == 14.0
print("cffi" in sys.modules, end=" ")
import cffi                                 # still importable for anyone else
print(cffi.FFI().sizeof("int"))
"""

# cffi loaded before: nothing to save, numba keeps its cffi support.
LOADED = """
import cffi
from kernels import skip_cffi_support
assert skip_cffi_support() is False
from numba.core.typing import cffi_utils
print(cffi_utils.SUPPORTED)
"""

# A numba whose cffi module does not catch the missing cffi: it is imported again, with cffi.
OTHER = """
import importlib.abc, importlib.util, sys

class Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "numba.core.typing.cffi_utils":
            return importlib.util.spec_from_loader(name, self)
        return None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        exec("import cffi\\nffi = cffi.FFI()\\nSUPPORTED = True", module.__dict__)

sys.meta_path.insert(0, Stub())
from kernels import skip_cffi_support
assert skip_cffi_support() is False
print(sys.modules["numba.core.typing.cffi_utils"].SUPPORTED, "cffi" in sys.modules)
"""


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "NUMBA_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_kernels_load_compile_and_agree_without_importing_cffi() -> None:
    assert _run(LEAN) == "False 4"


def test_cffi_already_imported_leaves_numba_cffi_support_on() -> None:
    assert _run(LOADED) == "True"


def test_a_numba_that_needs_cffi_gets_it() -> None:
    assert _run(OTHER) == "True True"


LAZY = """
import sys
import numpy as np
import fleetmpi.engine.data, fleetmpi.models.base, fleetmpi.optim, fleetmpi.sync.base
from kernels import lazy_function
assert "numba" not in sys.modules, "importing the step's modules imported numba"
within = lazy_function("kernels.cpu", "labels_within")
assert within.__name__ == "labels_within" and "numba" not in sys.modules
y = np.array([0, 1, 2, 1], np.float32)
print(within(y, 3), within(y, k=2), "numba" in sys.modules)
"""


def test_the_steps_kernels_load_at_their_first_call_not_at_import() -> None:
    # The CLI's checks import the reader, models, optimizers and syncs, and run without numba
    # (0.15-0.2 s); the step calls their kernels through kernels.lazy_function, which imports
    # at the first call and forwards positional and keyword arguments.
    proc = subprocess.run([sys.executable, "-c", LAZY], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "False", "True"]
