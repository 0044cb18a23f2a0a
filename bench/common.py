"""Helpers shared by the benchmarks: best-of timing and result files."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn: Callable[[], Any], repeat: int = 5, number: int = 1) -> float:
    """Return the best wall time of ``number`` calls of ``fn`` over ``repeat`` tries (s per call)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def save(name: str, rows: list[dict[str, Any]], **meta: Any) -> Path:
    """Write ``bench/results/NAME.json`` with the rows and where they were measured."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {"bench": name, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(),
           "processor": platform.processor() or platform.machine(), **meta, "rows": rows}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def table(title: str, rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    """Return a plain-text table: cols are (key, format) pairs."""
    head = [k for k, _ in cols]
    cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, f in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
