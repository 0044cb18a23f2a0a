"""Low layer: write named arrays + JSON meta to HDF5 atomically; read them back verified.

File format ``fleetmpi-h5/1``:

- root attribute ``fleetmpi_format`` = ``"fleetmpi-h5/1"``
- root attribute ``kind``            = what the file holds (``"checkpoint"``, ``"model"``, ...)
- root attribute ``meta``            = ``json.dumps(meta, sort_keys=True)``
- root attribute ``sha256``          = hex digest of the canonical serialisation below
- one dataset per array at ``/arrays/<name>`` (flat: names never contain ``/``), stored
  contiguous, little-endian, C order.

Canonical serialisation hashed into ``sha256``: for every array name in sorted (code
point) order the UTF-8 header ``"<name>\\t<dtype.str>\\t<d0,d1,...>\\t<nbytes>\\n"``
followed by the array's raw little-endian C-order bytes; then ``"meta\\t<len>\\n"`` and
the UTF-8 meta JSON. Lengths in the headers make the framing unambiguous.

Writes go to ``.<name>.tmp.<pid>`` in the target folder (created exclusively, never
through a symbolic link, mode 0o644 at most whatever the umask), are fsynced, renamed
onto the final name with ``os.replace`` and the folder is fsynced, so a reader sees either the
old file or the complete new one. Read failures of any kind become ``CheckpointError``
with one line ``"PATH: <what is wrong> (<what is expected>)"``; a missing file stays
``FileNotFoundError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fleetmpi.errors import CheckpointError, one_line
from fleetmpi.jobdir import fsync_dir, open_new

__all__ = ["FORMAT", "read_h5_header", "read_h5_verified", "write_h5_atomic"]

FORMAT = "fleetmpi-h5/1"
_ARRAYS_GROUP = "arrays"
# bool, signed/unsigned int, float, complex: what HDF5 stores natively and round-trips.
_DTYPE_KINDS = "biufc"
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:+\-]*$")
_NAME_RULE = "letters, digits and _ . : + -, not starting with . : + -, no '/'"
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
# What h5py raises for unreadable, truncated or malformed files; converted at this boundary.
_H5_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError)


def write_h5_atomic(
    path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], kind: str
) -> None:
    """Write ``arrays`` and JSON ``meta`` to ``path`` as a verified fleetmpi-h5/1 file.

    Raises ``ValueError``/``TypeError`` for bad names, dtypes, meta or kind (nothing is
    written then), ``FileNotFoundError`` when the folder does not exist, ``OSError``
    when the disk refuses; the previous file at ``path``, if any, is never damaged.
    """
    path = Path(path)
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(
            f"{path}: file kind {kind!r} is not valid "
            "(expected lowercase letters, digits, _ or -, e.g. 'checkpoint')"
        )
    meta_json = _meta_to_json(path, meta)
    prepared = _prepare_arrays(path, arrays)
    digest = _digest(prepared, meta_json)

    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: folder does not exist (create it before writing {path.name})"
        )
    tmp = folder / f".{path.name}.tmp.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()  # left by a crashed process with the same pid
    # HDF5 creates files 0o666 & ~umask; a file made here first keeps this mode when h5py
    # truncates it, and O_EXCL | O_NOFOLLOW means it is ours, not a planted link.
    os.close(open_new(tmp))
    try:
        # locking=False: the temp name is private to this process, and HDF5's own file
        # locks fail on some parallel file systems.
        with h5py.File(tmp, "w", locking=False) as f:
            f.attrs["fleetmpi_format"] = FORMAT
            f.attrs["kind"] = kind
            f.attrs["meta"] = meta_json
            f.attrs["sha256"] = digest
            group = f.create_group(_ARRAYS_GROUP)
            for name, arr in prepared.items():
                group.create_dataset(name, data=arr)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(folder)


def read_h5_verified(
    path: Path, kind: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a fleetmpi-h5/1 file; return ``(arrays, meta)`` after checking its sha256.

    ``kind``, when given, must match the file's ``kind`` attribute. Raises
    ``FileNotFoundError`` for a missing file and ``CheckpointError`` for anything else
    wrong with it (not HDF5, truncated, wrong format or kind, bad meta, bad checksum).
    """
    path = Path(path)
    with _open(path) as f:
        file_kind, meta_json, stored = _read_attrs(path, f)
        if kind is not None and file_kind != kind:
            raise _bad(path, f"file kind is {file_kind!r}", f"kind {kind!r}")
        try:
            meta = json.loads(meta_json)
        except json.JSONDecodeError as exc:
            raise _bad(path, f"meta attribute is not valid JSON: {exc}", "a JSON object") from exc
        if not isinstance(meta, dict):
            raise _bad(path, f"meta attribute is a JSON {type(meta).__name__}", "a JSON object")
        arrays = _read_arrays(path, f)
    actual = _digest(arrays, meta_json)
    if actual != stored:
        raise _bad(
            path,
            f"checksum mismatch: stored sha256 {stored[:12]}..., "
            f"content hashes to {actual[:12]}...",
            "the content written with the file; it is corrupt or was modified",
        )
    return arrays, meta


def read_h5_header(path: Path) -> tuple[str, str]:
    """Return a fleetmpi-h5/1 file's ``(kind, sha256)`` without reading or verifying arrays."""
    path = Path(path)
    with _open(path) as f:
        kind, _meta_json, stored = _read_attrs(path, f)
    return kind, stored


def _open(path: Path) -> h5py.File:
    """Open ``path`` read-only; missing -> FileNotFoundError, unreadable -> CheckpointError."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected a {FORMAT} file)")
    if not path.is_file():
        raise _bad(path, "is not a regular file", f"a {FORMAT} file")
    try:
        # locking=False: files are replaced by rename, never changed in place, and HDF5's
        # own file locks fail on some parallel file systems.
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (expected a {FORMAT} file)") from None
    except _H5_ERRORS as exc:
        raise _bad(
            path, f"not a readable HDF5 file: {one_line(exc)}", f"a complete {FORMAT} file"
        ) from exc


def _bad(path: Path, what: str, expected: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what} (expected {expected})")


def _meta_to_json(path: Path, meta: Mapping[str, Any]) -> str:
    if not isinstance(meta, Mapping):
        raise TypeError(f"{path}: meta is a {type(meta).__name__} (expected a dict)")
    _check_json_value(path, dict(meta), "meta")
    return json.dumps(dict(meta), sort_keys=True)


def _check_json_value(path: Path, value: Any, where: str) -> None:
    """Refuse values that JSON would reject or silently change (non-str keys, numpy)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{path}: {where} has key {key!r} of type {type(key).__name__} "
                    "(expected str keys only)"
                )
            _check_json_value(path, item, f"{where}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_value(path, item, f"{where}[{i}]")
        return
    is_numpy = type(value).__module__ == "numpy"
    hint = "; convert numpy values with .item() or .tolist()" if is_numpy else ""
    raise TypeError(
        f"{path}: {where} is a {type(value).__module__}.{type(value).__qualname__} "
        f"(expected dict, list, str, int, float, bool or None{hint})"
    )


def _prepare_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check names and dtypes; return little-endian C-order arrays, sorted by name."""
    if not isinstance(arrays, Mapping):
        raise TypeError(f"{path}: arrays is a {type(arrays).__name__} (expected a dict)")
    prepared: dict[str, np.ndarray] = {}
    for name in sorted(arrays, key=str):
        value = arrays[name]
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise ValueError(f"{path}: array name {name!r} is not valid (expected {_NAME_RULE})")
        if not isinstance(value, np.ndarray):
            raise TypeError(
                f"{path}: array {name!r} is a {type(value).__module__}.{type(value).__qualname__} "
                "(expected a numpy.ndarray; copy device arrays to the host first)"
            )
        if value.dtype.kind not in _DTYPE_KINDS:
            raise ValueError(
                f"{path}: array {name!r} has dtype {value.dtype} "
                "(expected a bool, integer, float or complex dtype)"
            )
        prepared[name] = _canonical(value)
    return prepared


def _canonical(arr: np.ndarray) -> np.ndarray:
    """Return ``arr`` little-endian and C-contiguous (no copy when it already is)."""
    return arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)


def _digest(arrays: Mapping[str, np.ndarray], meta_json: str) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        arr = _canonical(arrays[name])
        shape = ",".join(str(d) for d in arr.shape)
        h.update(f"{name}\t{arr.dtype.str}\t{shape}\t{arr.nbytes}\n".encode())
        h.update(arr.reshape(-1).view(np.uint8).data)  # a view: no copy of the array
    meta_bytes = meta_json.encode()
    h.update(f"meta\t{len(meta_bytes)}\n".encode())
    h.update(meta_bytes)
    return h.hexdigest()


def _read_attrs(path: Path, f: h5py.File) -> tuple[str, str, str]:
    """Return the file's ``(kind, meta_json, sha256)`` after checking the format."""
    fmt = _str_attr(path, f, "fleetmpi_format", f"{FORMAT!r}; the file was not written by fleetmpi")
    if fmt != FORMAT:
        raise _bad(path, f"format is {fmt!r}", f"{FORMAT!r}")
    kind = _str_attr(path, f, "kind", "a file kind such as 'checkpoint'")
    meta_json = _str_attr(path, f, "meta", "a JSON object")
    stored = _str_attr(path, f, "sha256", "a hex sha256 digest")
    if not _HEX64_RE.match(stored):
        raise _bad(path, f"attribute 'sha256' is {stored[:80]!r}", "64 lowercase hex digits")
    return kind, meta_json, stored


def _str_attr(path: Path, f: h5py.File, name: str, expected: str) -> str:
    try:
        present = name in f.attrs
        value = f.attrs[name] if present else None
    except _H5_ERRORS as exc:
        raise _bad(path, f"cannot read attribute {name!r}: {one_line(exc)}", expected) from exc
    if not present:
        raise _bad(path, f"attribute {name!r} is missing", expected)
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError as exc:
            raise _bad(path, f"attribute {name!r} is not UTF-8", expected) from exc
    if not isinstance(value, str):
        raise _bad(path, f"attribute {name!r} is a {type(value).__name__}, not a string", expected)
    return value


def _read_arrays(path: Path, f: h5py.File) -> dict[str, np.ndarray]:
    try:
        group = f.get(_ARRAYS_GROUP)
        names = list(group.keys()) if isinstance(group, h5py.Group) else None
    except _H5_ERRORS as exc:
        what = f"cannot list /{_ARRAYS_GROUP}: {one_line(exc)}"
        raise _bad(path, what, "a complete file") from exc
    if names is None:
        raise _bad(path, f"group /{_ARRAYS_GROUP} is missing", "one dataset per array in it")
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        where = f"/{_ARRAYS_GROUP}/{name}"
        try:
            obj = group.get(name)
            is_dataset = isinstance(obj, h5py.Dataset)
            dtype = obj.dtype if is_dataset else None
            arr = np.asarray(obj[()]) if is_dataset else None
        except _H5_ERRORS as exc:
            what = f"cannot read {where}: {one_line(exc)}"
            raise _bad(path, what, "a complete, uncorrupted file") from exc
        if dtype is None or arr is None:
            raise _bad(path, f"{where} is not a dataset", f"only datasets in /{_ARRAYS_GROUP}")
        if dtype.kind not in _DTYPE_KINDS or arr.dtype.kind not in _DTYPE_KINDS:
            expected = "a bool, integer, float or complex dataset"
            raise _bad(path, f"{where} has dtype {dtype}", expected)
        arrays[name] = _canonical(arr)
    return arrays


def _fsync_path(path: Path) -> None:
    """Flush ``path`` (a file or a folder) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
