"""Compute kernels: numpy references (reference) and numba CPU kernels (cpu)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from typing import Any


def skip_blas_probe() -> bool:
    """Load numba's array-math registry without its scipy.linalg import; return whether this call did.

    numba loads that registry at a process's first compile or cache load, and the registry
    probes for BLAS by importing scipy.linalg.cython_blas: all of scipy.linalg, which pulls in
    numpy.f2py, unittest and more (0.15-0.3 s of a rank's 0.4-0.8 s start-up on a 2-core box).
    No fleetmpi CPU kernel calls BLAS from numba code; one that does (``np.dot`` in an njit
    function) still works: typing it runs numba's own probe, and its compiled code imports
    scipy.linalg.cython_blas at its first call (numba's C helper looks the routines up then).
    So the probe here only asks whether scipy is installed. Call it before the first kernel
    loads (the rank entry, precompile and make-data do); a no-op once the registry is loaded.
    """
    if "numba.np.arraymath" in sys.modules:
        return False
    try:
        from numba.np import linalg
    except ImportError:
        return False
    probe = getattr(linalg, "ensure_blas", None)
    if probe is None:   # a numba whose registry no longer probes this way: leave it alone
        return False

    def installed() -> None:
        if importlib.util.find_spec("scipy") is None:
            raise ImportError("scipy 0.16+ is required for linear algebra")

    linalg.ensure_blas = installed
    try:
        import numba.np.arraymath  # noqa: F401  (its import runs the probe)
    finally:
        linalg.ensure_blas = probe
    return True


def skip_cffi_support() -> bool:
    """Load numba's cffi typing module with cffi reading as absent; return whether this call did.

    numba's typing registry imports numba.core.typing.cffi_utils at a process's first compile or
    cache load, and that module imports cffi and builds a ``cffi.FFI()``: cffi's C parser, pycparser
    and its lexer's regular expressions, 15-20 ms of a rank's CPU (4 ranks on 2 cores wait for the
    sum). No fleetmpi kernel takes a cffi function or FFI object, and numba copes without cffi:
    the module catches the ImportError and sets ``SUPPORTED = False``, which turns off only
    the typing of cffi objects in this process (cffi itself still imports for anyone else).
    Anything else leaves numba alone: cffi already imported (nothing to save), the module
    already loaded, or a numba whose module does not end up so (it is then imported as usual).
    """
    name = "numba.core.typing.cffi_utils"
    if name in sys.modules or "cffi" in sys.modules:
        return False
    try:
        # The module's own imports load first, so that only its cffi import sees cffi absent.
        import numba.core.typing.templates
        import numba.np.numpy_support  # noqa: F401
    except ImportError:
        return False
    sys.modules["cffi"] = None   # type: ignore[assignment]  # None there: "import cffi" raises ImportError
    try:
        import numba.core.typing.cffi_utils as cffi_utils
    except ImportError:
        cffi_utils = None
    finally:
        del sys.modules["cffi"]
    if cffi_utils is not None and getattr(cffi_utils, "SUPPORTED", None) is False \
            and getattr(cffi_utils, "ffi", 0) is None:
        return True
    # Not the numba this was written for: forget that load and import the module with cffi.
    sys.modules.pop(name, None)
    importlib.import_module(name)
    return False


def lean_numba_start() -> None:
    """Skip numba's one-off imports that no fleetmpi CPU kernel needs (cffi, scipy.linalg).

    Call it before the first kernel loads: the rank entry, precompile and make-data do.
    """
    skip_cffi_support()
    skip_blas_probe()


def num_threads() -> int:
    """Return ``numba.get_num_threads()``, without starting numba's thread pool where it can only be 1.

    The first get_num_threads() launches the threading layer (loads its library, takes a
    multiprocessing lock, starts the pool): 25-30 ms of CPU a rank, for nothing where
    NUMBA_NUM_THREADS is 1 (threads_per_rank 1, the default): set_num_threads accepts no more
    than that, so the answer is 1 and the threaded kernels are never called.
    """
    global _ONE_THREAD
    if _ONE_THREAD:   # known: no import statement a call (0.3 us of a ~2.5 us kernel call)
        return 1
    from numba import config
    if config.NUMBA_NUM_THREADS == 1:
        _ONE_THREAD = True   # numba reads NUMBA_NUM_THREADS once, at its import
        return 1
    from numba import get_num_threads
    return int(get_num_threads())


_ONE_THREAD = False


def lazy_function(module: str, name: str) -> Callable[..., Any]:
    """Return a stand-in for ``module.name`` that imports ``module`` at its first call.

    For modules that must import without numba (the CLI's checks import the reader, models,
    optimizers and syncs before they spawn mpiexec; numba's import takes 0.15-0.2 s) but call
    kernels on the training step's hot path: an import statement in a function costs
    0.4-0.6 us a call even with the module loaded, five of them about 10% of a batch-256
    logistic step; this stand-in's call costs ~0.1 us more than the function's own.
    """
    target: list[Callable[..., Any]] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not target:
            target.append(getattr(importlib.import_module(module), name))
        return target[0](*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call
