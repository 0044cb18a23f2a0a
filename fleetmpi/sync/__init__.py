"""Gradient synchronisation: combine per-rank gradient sums and count the bytes it costs.

The sync classes are imported when first named (module ``__getattr__``) or built: a rank
loads only its spec's kind, not the exact and sparse ones' kernel modules (their numba
dispatchers), which cost each rank's start-up CPU time whether used or not.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fleetmpi.spec import SyncSpec
from fleetmpi.sync.base import N_EXTRAS, Extra, Extras, Sync

if TYPE_CHECKING:
    from fleetmpi.sync.dense import DenseSync
    from fleetmpi.sync.exact import ExactSync
    from fleetmpi.sync.sparse import SparseSync
    from fleetmpi.sync.threshold import ThresholdSync

DEFAULT_TARGET_DENSITY = 0.01
_CLASSES = {"DenseSync": "dense", "ExactSync": "exact", "SparseSync": "sparse", "ThresholdSync": "threshold"}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(f"fleetmpi.sync.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_sync(spec: SyncSpec, comm: Any, n_params: int, n_extras: int = N_EXTRAS) -> Sync:
    """Return the sync object for ``spec`` over ``comm``."""
    if spec.kind == "threshold":
        from fleetmpi.sync.threshold import ThresholdSync
        if spec.tau is None:
            raise ValueError("threshold sync needs tau (SyncSpec.validate rejects a spec without it)")
        target = spec.target_density if spec.target_density is not None else DEFAULT_TARGET_DENSITY
        return ThresholdSync(comm, n_params, n_extras, spec.tau, spec.adaptive, target, spec.extras_every or 1)
    if spec.kind == "exact":
        from fleetmpi.sync.exact import ExactSync
        return ExactSync(comm, n_params, n_extras)
    if spec.kind == "sparse":
        from fleetmpi.sync.sparse import SparseSync
        return SparseSync(comm, n_params, n_extras)
    from fleetmpi.sync.dense import DenseSync
    return DenseSync(comm, n_params, n_extras)


__all__ = ["N_EXTRAS", "DenseSync", "ExactSync", "Extra", "Extras", "SparseSync", "Sync", "ThresholdSync", "build_sync"]
