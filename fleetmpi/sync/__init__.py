"""Gradient synchronisation: combine per-rank gradient sums and count the bytes it costs."""

from __future__ import annotations

from typing import Any

from fleetmpi.spec import SyncSpec
from fleetmpi.sync.base import N_EXTRAS, Extra, Extras, Sync
from fleetmpi.sync.dense import DenseSync
from fleetmpi.sync.exact import ExactSync
from fleetmpi.sync.sparse import SparseSync
from fleetmpi.sync.threshold import ThresholdSync

DEFAULT_TARGET_DENSITY = 0.01


def build_sync(spec: SyncSpec, comm: Any, n_params: int, n_extras: int = N_EXTRAS) -> Sync:
    """Return the sync object for ``spec`` over ``comm``."""
    if spec.kind == "threshold":
        if spec.tau is None:
            raise ValueError("threshold sync needs tau (SyncSpec.validate rejects a spec without it)")
        target = spec.target_density if spec.target_density is not None else DEFAULT_TARGET_DENSITY
        return ThresholdSync(comm, n_params, n_extras, spec.tau, spec.adaptive, target, spec.extras_every or 1)
    if spec.kind == "exact":
        return ExactSync(comm, n_params, n_extras)
    if spec.kind == "sparse":
        return SparseSync(comm, n_params, n_extras)
    return DenseSync(comm, n_params, n_extras)


__all__ = ["N_EXTRAS", "DenseSync", "ExactSync", "Extra", "Extras", "SparseSync", "Sync", "ThresholdSync", "build_sync"]
