"""Write datasets as fleetmpi HDF5 files (X float32, y): synthetic, or converted from a
dataset that an installed package bundles on disk (scikit-learn's digits, breast cancer)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from fleetmpi.errors import BadInput


def _write(path: Path, X: np.ndarray, y: np.ndarray, attrs: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("X", data=np.ascontiguousarray(X, dtype=np.float32))
            f.create_dataset("y", data=y)
            for k, v in attrs.items():
                f.attrs[k] = v
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def available_memory() -> int:
    """Return the bytes of memory available to new allocations (MemAvailable), else free pages."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_room(task: str, n: int, d: int, classes: int, out: Path) -> None:
    """Refuse sizes whose arrays would not fit in available memory, or whose files not on ``out``'s disk."""
    k = {"regression": 1, "binary": 2}.get(task, classes)
    # Peak while generating: X as float64 and as float32 (12 B), the split copy (4 B), the
    # teacher's logits and noise (16 B per class), y and the permutation (~32 B per row).
    need_mem = n * d * 16 + n * k * 16 + n * 32
    have_mem = available_memory()
    if need_mem > have_mem:
        raise BadInput(f"make-data: --n {n} --d {d} needs about {_gib(need_mem)} of memory, but {_gib(have_mem)} "
                       "is available; lower --n or --d")
    folder = out
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    need_disk = n * d * 4 + n * 8 + (1 << 20)
    have_disk = shutil.disk_usage(folder if folder.is_dir() else folder.parent).free
    if need_disk > have_disk:
        raise BadInput(f"make-data: --n {n} --d {d} writes about {_gib(need_disk)} to {out}, but {folder} has "
                       f"{_gib(have_disk)} free; lower --n or --d or choose another --out")


def synthetic(task: str, n: int, d: int, classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (X, y) drawn from a random linear teacher with noise (seeded)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    if task == "regression":
        w = rng.standard_normal(d) / np.sqrt(d)
        return X, (X @ w + noise * rng.standard_normal(n)).astype(np.float32)
    k = 2 if task == "binary" else classes
    W = rng.standard_normal((d, k)) * 2.0 / np.sqrt(d)
    logits = X @ W + noise * rng.gumbel(size=(n, k))
    return X, logits.argmax(axis=1).astype(np.float32)


def bundled(name: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Return (X, y, provenance) of a dataset scikit-learn ships on disk (no download)."""
    try:
        from sklearn import datasets
    except ImportError:
        raise BadInput(f"--from {name} needs scikit-learn installed (pip install scikit-learn)") from None
    if name == "digits":
        ds = datasets.load_digits()
        X = ds.data / 16.0  # pixel counts 0..16 -> [0, 1]
        prov = ("scikit-learn load_digits(): UCI ML Optical Recognition of Handwritten Digits, test set "
                "(1797 8x8 images, 10 classes); features scaled by 1/16")
    else:
        ds = datasets.load_breast_cancer()
        X = (ds.data - ds.data.mean(axis=0)) / ds.data.std(axis=0)
        prov = ("scikit-learn load_breast_cancer(): UCI Breast Cancer Wisconsin (Diagnostic), 569 rows, "
                "30 features, binary; features standardised")
    return X.astype(np.float32), ds.target.astype(np.float32), prov


def make_data(source: str, task: str, n: int, d: int, classes: int, noise: float,
              valid_fraction: float, seed: int, out: Path) -> dict[str, int]:
    """Write ``out/train.h5`` and ``out/valid.h5`` (none without validation rows: an old one goes); return {path: rows}."""
    if not 0.0 <= valid_fraction < 1.0:
        raise BadInput(f"--valid-fraction {valid_fraction}: expected a number in [0, 1)")
    if source == "synthetic":
        if n < 2 or d < 1 or (task == "multiclass" and classes < 2):
            raise BadInput(f"make-data: need --n >= 2, --d >= 1 and --classes >= 2; got n={n} d={d} classes={classes}")
        check_room(task, n, d, classes, out)
        X, y = synthetic(task, n, d, classes, noise, seed)
        prov = f"synthetic {task}: linear teacher, n={n} d={d} noise={noise} seed={seed}"
        k = {"binary": 2, "multiclass": classes}.get(task)
    else:
        # The bundled sets have one task each; relabelling them (digits even/odd, say) would
        # make a dataset nobody asked for, so another --task is refused.
        native = {"digits": "multiclass", "breast_cancer": "binary"}[source]
        if task != native:
            other = "--from breast_cancer" if native == "multiclass" else "--from digits --task multiclass"
            raise BadInput(f"--from {source} --task {task}: {source} is a {native} dataset "
                           f"({'10 classes' if source == 'digits' else '2 classes'}); use --task {native}, "
                           f"or {other}, or --from synthetic --task {task}")
        X, y, prov = bundled(source)
        k = int(y.max()) + 1
    out.mkdir(parents=True, exist_ok=True)
    perm = np.random.default_rng([seed, 7]).permutation(len(y))
    n_valid = int(round(valid_fraction * len(y)))
    parts = {"train.h5": perm[n_valid:], "valid.h5": perm[:n_valid]} if n_valid else {"train.h5": perm}
    written = {}
    for fname, idx in parts.items():
        idx = np.sort(idx)
        attrs: dict[str, object] = {"provenance": prov, "seed": seed}
        if k:
            attrs["classes"] = k
        _write(out / fname, X[idx], y[idx], attrs)
        written[str(out / fname)] = len(idx)
    if not n_valid:   # an earlier run's valid.h5 would pass for this data's validation part
        (out / "valid.h5").unlink(missing_ok=True)
    return written
