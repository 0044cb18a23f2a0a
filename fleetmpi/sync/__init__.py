"""Gradient synchronisation: combine per-rank gradient sums and count the bytes it costs."""

from __future__ import annotations

from typing import Any

from ..spec import SyncSpec
from .base import Sync
from .dense import DenseSync


def build_sync(spec: SyncSpec, comm: Any, n_params: int, n_extras: int) -> Sync:
    """Return the sync object for ``spec`` over ``comm``."""
    return DenseSync(comm, n_params, n_extras)


__all__ = ["DenseSync", "Sync", "build_sync"]
