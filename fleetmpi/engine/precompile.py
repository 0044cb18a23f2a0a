"""Fill numba's on-disk cache for every CPU kernel signature training uses (install step).

Run as ``python -m fleetmpi.engine.precompile`` (the Makefile's install target does) so that the
first ``fleetmpi run`` loads compiled kernels (~0.6 s) instead of compiling them on every
rank at once (5-15 s on a loaded 2-core box). Compilation lands where the run will look:
``kernels/__pycache__`` and ``fleetmpi/engine/__pycache__`` (or ``NUMBA_CACHE_DIR``).
GPU kernels are not touched: they compile per device at run time. It also writes the
bytecode of fleetmpi and kernels: where PYTHONDONTWRITEBYTECODE is set (containers often set
it) no import writes it, and every rank and driver compiled some 45 modules from source at each
start (0.1-0.35 s per process, 2-core box).

``--fresh`` (the Makefile passes it; the install step reruns when any kernel source changed)
first removes the packages' numba cache files. numba checks a cached function only against
its own source file, not the files of the kernels it calls or inlines (a ``kernels.simd``
intrinsic in ``kernels.cpu_glm``, ``kernels.vmath`` in the softmax): after an update that
changed only those, it would load the old machine code.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

# y is read into float32 buffers whatever its stored dtype; the memory-mapped path hands
# the stored dtype to numba, so each one make-data or a user's h5py script writes is a
# separate signature of the gather kernel.
Y_DTYPES = (np.float32, np.float64, np.int64, np.int32)


def _data_kernels() -> None:
    """Read a few rows of tiny HDF5 files through the engine's reader, one per y dtype, with
    the one-thread and the threaded copy kernel (kernels.gather), the same as CSR rows, and
    a batch's ranges."""
    import h5py

    from fleetmpi.engine.csr_data import CsrReader
    from fleetmpi.engine.data import RankReader, SampleOrder

    SampleOrder(6, 4, 0, 2).bounds(2, 9)   # the sample order's ranges (an epoch boundary inside)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for dt in Y_DTYPES:
            path = Path(tmp) / f"y-{np.dtype(dt).name}.h5"
            with h5py.File(path, "w") as f:
                f.create_dataset("X", data=rng.standard_normal((6, 3)).astype(np.float32))
                f.create_dataset("y", data=rng.integers(0, 3, 6).astype(dt))
            reader = RankReader(path)
            try:
                for threads in (False, True):   # the copy kernel of one thread and of threads_per_rank > 1
                    reader.read([(0, 2), (3, 5)], threads=threads)
            finally:
                reader.close()
            path = Path(tmp) / f"csr-y-{np.dtype(dt).name}.h5"   # make-data's CSR (text, libsvm)
            with h5py.File(path, "w") as f:
                f["indptr"], f["indices"] = np.array([0, 1, 1, 3], np.int64), np.array([2, 0, 1], np.int32)
                f["data"], f["y"] = np.ones(3, np.float32), np.arange(3).astype(dt)
                f.attrs["format"], f.attrs["n_features"] = "csr", 4
            csr = CsrReader(path)
            try:
                csr.read([(0, 2), (2, 3)])
            finally:
                csr.close()


def _text_kernels() -> None:
    """Hash two tiny documents: make-data's tokenising and MurmurHash3 kernels compile here."""
    from fleetmpi.texthash import hash_texts
    hash_texts(["warm up the hashing", "caf\u00e9 na\u00efve"], 2 ** 10, (1, 2))


def _bytecode() -> None:
    """Write __pycache__ bytecode for the fleetmpi and kernels packages (py_compile writes it
    whatever PYTHONDONTWRITEBYTECODE says; a source edited later is recompiled as usual)."""
    import compileall

    root = Path(__file__).resolve().parents[2]   # the checkout: fleetmpi/engine/precompile.py
    for pkg in ("fleetmpi", "kernels"):
        compileall.compile_dir(str(root / pkg), quiet=1)


def _numba_cache_dirs(root: Path) -> list[Path]:
    """Return every folder numba may cache root's fleetmpi and kernels modules in: each
    source folder's __pycache__, and (asked of numba's own locators, which name a folder
    by the source folder's path hash) its folder under NUMBA_CACHE_DIR where that is set
    and in the user-wide cache numba falls back to when __pycache__ is not writable."""
    from numba.core import caching
    out = []
    for pkg in ("fleetmpi", "kernels"):
        for src in sorted({f.parent for f in (root / pkg).rglob("*.py")}):
            out.append(src / "__pycache__")
            probe = str(src / "__init__.py")
            locators: list[type] = [caching.UserWideCacheLocator]
            if getattr(caching.config, "CACHE_DIR", None):
                locators.append(caching.UserProvidedCacheLocator)
            for loc in locators:
                out.append(Path(loc(_numba_cache_dirs, probe).get_cache_path()))
    return out


def clear_numba_cache(root: Path) -> int:
    """Remove numba's cache files (index .nbi, code .nbc) of root's fleetmpi and kernels
    modules wherever numba keeps them (``_numba_cache_dirs``); return how many. Other
    files stay (bytecode). A file that cannot be removed (a read-only install) is left
    with a warning: the compile that follows still runs."""
    n = 0
    for d in _numba_cache_dirs(root):
        if not d.is_dir():
            continue
        for f in d.glob("*.nb[ic]"):
            try:
                f.unlink()
                n += 1
            except OSError as e:
                print(f"precompile: could not remove {f}: {e.strerror}", file=sys.stderr, flush=True)
    return n


def steps() -> list[tuple[str, Callable[[], None]]]:
    """Return (name, warm-up) for each kernel module training loads, in load order, then the bytecode."""
    from kernels import compress, cpu, exact, sparse, trees, update
    return [("kernels.cpu", cpu.warmup), ("kernels.update", update.warmup), ("kernels.sparse", sparse.warmup),
            ("kernels.exact", exact.warmup), ("kernels.compress", compress.warmup), ("kernels.trees", trees.warmup),
            ("fleetmpi.engine.data", _data_kernels), ("fleetmpi.texthash", _text_kernels), ("bytecode", _bytecode)]


def main(argv: list[str] | None = None) -> int:
    """Compile (or load) every CPU kernel and print the seconds each module took; return 0."""
    args = sys.argv[1:] if argv is None else argv
    quiet = "--quiet" in args
    t_all = time.perf_counter()
    if "--fresh" in args:
        n = clear_numba_cache(Path(__file__).resolve().parents[2])
        if not quiet:
            print(f"precompile: removed {n} numba cache files (a kernel source changed)", flush=True)
    from kernels import lean_numba_start
    lean_numba_start()   # as a rank does, so this process loads what a rank loads
    for name, warm in steps():
        t0 = time.perf_counter()
        warm()
        if not quiet:
            print(f"precompile: {name} {time.perf_counter() - t0:.1f} s", flush=True)
    if not quiet:
        print(f"precompile: numba cache filled in {time.perf_counter() - t_all:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
