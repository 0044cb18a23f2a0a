"""Compile every numba.cuda kernel of ``kernels.gpu`` for real GPUs, on a machine without one.

numba's CUDA simulator runs a kernel's Python on the CPU, so it never sees what only the
CUDA target rejects: a shared-array shape written as an expression, an intrinsic given a
bool where it takes int32, a device function that can only be compiled against a live
context. This compiles each kernel with the argument types its launcher in
``kernels.gpu`` passes, through NVVM to PTX, for each compute capability asked for; where
ptxas is found it assembles the PTX to machine code and reads registers, spills, stack
and shared memory off its ``-v`` report.

Needs numba-cuda with NVVM and NVRTC (``pip install -e '.[gpu-compile]'``: the wheels,
no CUDA install and no GPU). Must run with NUMBA_ENABLE_CUDASIM unset: the simulator
compiles nothing.

    python -m kernels.gpu_compile [--cc 9.0 --cc 8.0] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CCS = ((8, 0), (9, 0))          # A100 and H100/H200, the GPUs of the clusters we target
SOFTMAX_CLASSES = (2, 10)       # softmax kernels are specialised per class count


@dataclass(frozen=True)
class Compiled:
    """One kernel compiled for one compute capability."""

    kernel: str
    cc: str
    ptx_lines: int
    fma: int                    # fused multiply-adds in the PTX (fma.rn.*)
    registers: int | None       # from ptxas -v; None where ptxas was not found
    spill_bytes: int | None     # spill stores + spill loads
    stack_bytes: int | None
    smem_bytes: int | None


def signatures() -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """Return {name: (kernel, argument types)}: each kernel with the types its launcher passes.

    Python ints and floats reach a kernel as int64 / float64; every device array the
    launchers make or slice is C-contiguous.
    """
    from numba import float32, float64, int32, int64, uint8, uint32

    from kernels import gpu as g
    from kernels import gpu_trees as gt

    f64, f32, i32, i64 = float64[::1], float32[::1], int32[::1], int64[::1]
    X, part = float32[:, ::1], float64[:, ::1]
    table: dict[str, tuple[Any, tuple[Any, ...]]] = {
        "_glm_partials": (g._glm_partials, (X, f32, f64, int64, int64, part)),
        "_sum_blocks": (g._sum_blocks, (part, int64, f64)),
        "_threshold_flags": (g._threshold_flags, (f64, f64, float64, uint8[::1], i32)),
        "_exclusive_scan": (g._exclusive_scan, (i32, int64, i32)),
        "_threshold_pack": (g._threshold_pack, (uint8[::1], i32, uint32[::1])),
        "_decode_counts": (g._decode_counts, (uint32[::1], int64, i32, i32)),
        "_counts_to_grad": (g._counts_to_grad, (i32, float64, f64)),
        "_sgd": (g._sgd, (f64, f64, f64, f64, float64, float64, float64, float64)),
    }
    for k in SOFTMAX_CLASSES:
        table[f"softmax[k={k}]"] = (g._softmax_kernel(k), (X, f32, f64, int64, part, part))
    # kernels.gpu_trees: codes uint8 (n, d), gh int64 (n, 2), order int32, the rest int64.
    codes, gh = uint8[:, ::1], int64[:, ::1]
    table["_zero"] = (gt._zero, (i64, i32))
    table["_hist_shared"] = (gt._hist_shared, (codes, gh, i32, int64, i64, i64, i64, i64, i64, i32))
    table["_hist_global"] = (gt._hist_global, (codes, gh, i32, int64, i64, i64, i64, i64, i32))
    return table


def module_kernels() -> set[str]:
    """Return the names of the module-level numba.cuda kernels of kernels.gpu and kernels.gpu_trees."""
    from kernels import gpu as g
    from kernels import gpu_trees as gt
    return {name for module in (g, gt) for name, obj in vars(module).items()
            if type(obj).__name__ == "CUDADispatcher" and not obj.targetoptions.get("device")}


def find_ptxas() -> str | None:
    """Return a ptxas: the nvidia-cuda-nvcc wheel's, else one on PATH; None if neither."""
    try:
        from cuda.pathfinder import find_nvidia_binary_utility
        found = find_nvidia_binary_utility("ptxas")
        if found:
            return str(found)
    except ImportError:
        pass
    return shutil.which("ptxas")


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def assemble(ptxas: str, ptx: str, cc: tuple[int, int]) -> dict[str, int]:
    """Assemble PTX to machine code for sm_<cc>; return registers, spills, stack, smem (bytes)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "k.ptx")
        src.write_text(ptx)
        proc = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", "-o", str(Path(tmp, "k.cubin")), str(src)],
                              capture_output=True, text=True, timeout=300)
    report = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas -arch=sm_{cc[0]}{cc[1]} failed ({proc.returncode}): {report.strip()[-2000:]}")
    got = {key: [int(v) for v in rx.findall(report)] for key, rx in _PTXAS.items()}
    if not got["registers"]:
        raise RuntimeError(f"ptxas -v printed no register count: {report.strip()[-2000:]}")
    return {"registers": max(got["registers"]), "spill_bytes": sum(got["spill_stores"]) + sum(got["spill_loads"]),
            "stack_bytes": max(got["stack"], default=0), "smem_bytes": max(got["smem"], default=0)}


def compile_all(ccs: tuple[tuple[int, int], ...] = CCS, ptxas: str | None = None) -> tuple[list[Compiled], dict[str, str]]:
    """Compile every kernel for every cc; return the rows and {"<kernel>@<cc>": ptx}.

    Raises RuntimeError naming the kernel and cc on the first failure.
    """
    from numba import config, cuda

    if getattr(config, "ENABLE_CUDASIM", 0):
        raise RuntimeError("NUMBA_ENABLE_CUDASIM=1: the simulator compiles nothing; unset it")
    rows, texts = [], {}
    for name, (kernel, sig) in signatures().items():
        for cc in ccs:
            label = f"{cc[0]}.{cc[1]}"
            try:
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
            except Exception as exc:
                raise RuntimeError(f"{name} for compute capability {label}: {type(exc).__name__}: "
                                   f"{str(exc).strip()[:1500]}") from exc
            stats: dict[str, int | None] = dict.fromkeys(("registers", "spill_bytes", "stack_bytes", "smem_bytes"))
            if ptxas:
                stats.update(assemble(ptxas, ptx, cc))
            fma = len(re.findall(r"^\s*fma\.rn\.", ptx, re.M))
            rows.append(Compiled(name, label, ptx.count("\n"), fma, **stats))   # type: ignore[arg-type]
            texts[f"{name}@{label}"] = ptx
    return rows, texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels.gpu_compile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cc", action="append", metavar="MAJOR.MINOR",
                    help="compute capability to compile for (repeatable; default 8.0 and 9.0)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    ccs = CCS
    if args.cc:
        try:
            ccs = tuple((int(a), int(b)) for a, b in (c.split(".") for c in args.cc))
        except ValueError:
            print(f"gpu_compile: --cc takes MAJOR.MINOR such as 9.0, got {args.cc}", file=sys.stderr)
            return 2
    ptxas = find_ptxas()
    rows, _ = compile_all(ccs, ptxas)
    if args.json:
        print(json.dumps({"ptxas": ptxas, "kernels": [asdict(r) for r in rows]}, indent=1))
        return 0
    print(f"ptxas: {ptxas or 'not found (PTX only)'}")
    print(f"{'kernel':<18} {'cc':>4} {'ptx lines':>9} {'fma':>5} {'regs':>5} {'spill B':>7} {'stack B':>7} {'smem B':>7}")
    for r in rows:
        print(f"{r.kernel:<18} {r.cc:>4} {r.ptx_lines:>9} {r.fma:>5} {r.registers!s:>5} {r.spill_bytes!s:>7} "
              f"{r.stack_bytes!s:>7} {r.smem_bytes!s:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
