"""Checkpoints of one job: ``JOB_DIR/ckpt/step-NNNNNNNN.h5``, written atomically, read verified.

Each checkpoint is a fleetmpi-h5/1 file of kind ``"checkpoint"`` (see ``h5store``) whose
meta records the training step under the key ``"step"``. Only files named
``step-<8 or more digits>.h5`` count; temp files left by a crash (``.step-*.h5.tmp.<pid>``)
are ignored by readers and removed by the launcher at the next start once their writer's pid
is dead (:func:`remove_stale_temps`); anything else in the folder is never deleted.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetmpi.errors import CheckpointError
from fleetmpi.h5store import FORMAT, read_h5_header, read_h5_verified, write_h5_atomic

__all__ = [
    "KIND",
    "Checkpoint",
    "check_compatible",
    "checkpoint_path",
    "latest_valid",
    "list_checkpoints",
    "load",
    "remove_stale_temps",
    "restart_note",
    "save",
    "summary",
]

KIND = "checkpoint"
_NAME_RE = re.compile(r"^step-(\d{8,})\.h5$")
_TEMP_RE = re.compile(r"^\.step-\d{8,}\.h5\.tmp\.(\d+)$")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: its file, training step, arrays and meta (meta has "step")."""

    path: Path
    step: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    """Return the file name a checkpoint of ``step`` gets in ``ckpt_dir``."""
    _check_step(step)
    return Path(ckpt_dir) / f"step-{step:08d}.h5"


def save(
    ckpt_dir: Path,
    step: int,
    arrays: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` atomically, then keep only the newest ``keep`` files.

    ``meta`` gets the key ``"step"`` added (it may already hold the same value). The file
    just written is never pruned, even when files with higher steps exist. Returns its path.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"checkpoint keep={keep!r} is not valid (expected an integer >= 1)")
    path = checkpoint_path(ckpt_dir, step)
    if not isinstance(meta, Mapping):
        raise TypeError(f"{path}: meta is a {type(meta).__name__} (expected a dict)")
    if "step" in meta and meta["step"] != step:
        raise ValueError(
            f"{path}: meta['step'] is {meta['step']!r} but step is {step} "
            "(expected them to agree, or no 'step' key in meta)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_h5_atomic(path, arrays, {**meta, "step": step}, KIND)
    _prune(path, keep)
    return path


def load(path: Path) -> Checkpoint:
    """Read and verify one checkpoint file; raise ``CheckpointError`` when it is not valid."""
    path = Path(path)
    arrays, meta = read_h5_verified(path, KIND)
    step = meta.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(
            f"{path}: meta['step'] is {step!r} (expected the non-negative training step)"
        )
    named = _step_of(path)
    if named is not None and named != step:
        raise CheckpointError(
            f"{path}: file name says step {named} but the file records step {step} "
            "(expected them to agree; was the file renamed or copied over another?)"
        )
    return Checkpoint(path=path, step=step, arrays=arrays, meta=meta)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Return the checkpoint files in ``ckpt_dir``, newest (highest step) first; [] if none."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        return []
    if not ckpt_dir.is_dir():
        raise NotADirectoryError(f"{ckpt_dir}: not a folder (expected the job's checkpoint folder)")
    found: list[tuple[int, str, Path]] = []
    for entry in ckpt_dir.iterdir():
        step = _step_of(entry)
        if step is not None and entry.is_file():
            found.append((step, entry.name, entry))
    found.sort(reverse=True)
    return [p for _, _, p in found]


def latest_valid(ckpt_dir: Path) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """Return the newest checkpoint that verifies, and ``(path, reason)`` for newer ones skipped."""
    skipped: list[tuple[Path, str]] = []
    for path in list_checkpoints(ckpt_dir):
        try:
            return load(path), skipped
        except (CheckpointError, FileNotFoundError) as exc:
            # FileNotFoundError: pruned by a concurrent save between listing and reading.
            skipped.append((path, str(exc).removeprefix(f"{path}: ")))
    return None, skipped


def restart_note(resumed: bool, skipped: list[tuple[Path, str]] | list[tuple[str, str]]) -> str | None:
    """Return the terminal line for a start that found checkpoints but none valid, else None."""
    if resumed or not skipped:
        return None
    return (f"fleetmpi: every checkpoint failed verification ({len(skipped)} set aside as *.corrupt); "
            "training restarts from step 0")


def remove_stale_temps(ckpt_dir: Path) -> list[tuple[Path, int]]:
    """Delete checkpoint temps (``.step-*.h5.tmp.<pid>``) whose writer pid is dead on this host.

    Call it while holding the job dir's lock, on the host the ranks ran on. Returns
    ``(path, pid)`` of each file removed; temps of live pids are left alone.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed: list[tuple[Path, int]] = []
    for entry in sorted(ckpt_dir.iterdir()):
        match = _TEMP_RE.match(entry.name)
        if not match or not entry.is_file():
            continue
        pid = int(match.group(1))
        if _pid_alive(pid):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue
        removed.append((entry, pid))
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def check_compatible(ckpt: Checkpoint, spec_model_hash: str) -> None:
    """Raise ``CheckpointError`` unless ``ckpt`` was written for the model spec hash given."""
    stored = ckpt.meta.get("model_hash")
    if stored == spec_model_hash:
        return
    if not isinstance(stored, str):
        written_for = "an unknown model spec (no 'model_hash' in its meta)"
        mine = spec_model_hash[:12]
    else:
        # Show full hashes in the rare case that their 12-character prefixes agree.
        same_prefix = stored[:12] == spec_model_hash[:12]
        width = max(len(stored), len(spec_model_hash)) if same_prefix else 12
        written_for = f"model spec {stored[:width]}"
        mine = spec_model_hash[:width]
    raise CheckpointError(
        f"{ckpt.path}: checkpoint was written for {written_for} but this job's model spec "
        f"is {mine}; use a fresh --job-dir or the original spec"
    )


def summary(path: Path) -> dict[str, Any]:
    """Describe a verified fleetmpi-h5 file (checkpoint or model) as JSON-ready data.

    Returns path, format, kind, step (``None`` if the meta has none), size_bytes, sha256, meta,
    and per array its dtype, shape, size and value statistics over finite entries.
    """
    path = Path(path)
    arrays, meta = read_h5_verified(path)
    kind, sha256 = read_h5_header(path)
    out = {
        "path": str(path),
        "format": FORMAT,
        "kind": kind,
        "step": meta.get("step"),
        "size_bytes": path.stat().st_size,
        "sha256": sha256,
        "meta": meta,
        "arrays": {name: _array_stats(arrays[name]) for name in sorted(arrays)},
    }
    model = meta.get("model") if kind == KIND else meta
    if isinstance(model, dict) and model.get("kind") in ("gbdt", "forest", "tree") and "offsets" in arrays:
        from fleetmpi.models.trees import tree_summary
        out["trees"] = tree_summary(arrays)
    return out


def _array_stats(arr: np.ndarray) -> dict[str, Any]:
    info: dict[str, Any] = {
        "dtype": arr.dtype.name,
        "shape": list(arr.shape),
        "size": int(arr.size),
        "nbytes": int(arr.nbytes),
    }
    kind = arr.dtype.kind
    # Overflow in a sum of squares is reported as inf rather than raised as a warning.
    with np.errstate(over="ignore", invalid="ignore"):
        if kind == "b":
            info["true_count"] = int(np.count_nonzero(arr))
        elif kind in "iu":
            if arr.size:
                info["min"] = int(arr.min())
                info["max"] = int(arr.max())
                info["mean"] = float(arr.mean(dtype=np.float64))
                info["std"] = float(arr.std(dtype=np.float64))
        elif kind in "fc":
            finite = arr[np.isfinite(arr)]
            info["nan_count"] = int(np.count_nonzero(np.isnan(arr)))
            info["inf_count"] = int(np.count_nonzero(np.isinf(arr)))
            if finite.size and kind == "f":
                wide = finite.astype(np.float64)
                info["min"] = float(wide.min())
                info["max"] = float(wide.max())
                info["mean"] = float(wide.mean())
                info["std"] = float(wide.std())
            if finite.size:
                wide_dtype = np.complex128 if kind == "c" else np.float64
                info["l2_norm"] = float(np.linalg.norm(finite.astype(wide_dtype)))
    return info


def _step_of(path: Path) -> int | None:
    match = _NAME_RE.match(path.name)
    return int(match.group(1)) if match else None


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step {step!r} is not valid (expected an integer >= 0)")


def _prune(written: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, always keeping ``written``."""
    others = [p for p in list_checkpoints(written.parent) if p.name != written.name]
    for old in others[keep - 1 :]:
        try:
            old.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            # The new checkpoint is safe on disk; a stale one left over is not worth failing for.
            _log.warning("could not delete old checkpoint %s: %s", old, exc)


def newest_valid_path(ckpt_dir: Path) -> str | None:
    """Return the path of the newest checkpoint that verifies, or None (named in the disk-full line)."""
    try:
        found, _ = latest_valid(Path(ckpt_dir))
    except (OSError, ValueError):
        return None
    return str(found.path) if found is not None else None
