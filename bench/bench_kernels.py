"""Gradient kernels: fused numba single pass vs the numpy two-pass reference, in GB/s of X.

Baselines measured in the same run on the same arrays: the numpy two-pass gradient as a
numpy user writes it (float32 X, float64 weights), the same with X cast to float64 once
beforehand (cast not timed: numpy's best case), a plain numba read of X summed with
reassociation allowed, so it vectorises, into a float64 accumulator (read64: at L2 size
it is bound by the float32 -> float64 conversion and each row's reduction) and as one
flat float32 stream into float32 accumulators (read32: no conversion); the read limit
(of_read) is the faster of the two,
and one core's FMA peak from a numba FMA loop on L1-resident data (float64 and float32).
The roofline (of_bound): a kernel cannot beat min(read limit, FMA peak of its compute
dtype / its FLOPs per byte of X) (``attainable_GBps``). Linear and logistic do 2 FMAs
(4 FLOPs) per float32 element (logit dot, gradient update): 1 FLOP per byte; softmax
4k. At L2 size the flat read runs near 97 GB/s, so 0.85 of it would need ~97 GFLOP/s:
above one core's float64 FMA peak (~53), near its float32 peak (~96). of_read alone
would then ask the impossible of a float64 kernel; of_bound is what is left to win.
Linear and logistic run in both compute precisions ("f32" rows: ``compute="float32"``,
kernels.cpu_glm). Sizes: 200000 x 128 (X from DRAM) and 1536 x 128 (768 KiB, fits in L2). Kernels on one
numba thread. Timings are best-of, interleaved between the kernels, so a loaded machine
hurts every row alike. X starts on a 64-byte boundary, as the engine's reader holds a
batch (kernels.memory); the "(numpy-placed X)" rows run the float32 GLM kernels on the
same values where numpy put them (x_offset: the start mod 64; 16 for a large array).
``--gradients-only`` prints just that table (no results file). The float32 GLM rows from
DRAM are also run in five fresh processes (``dram_spread``): one process's figure moves by
+-5-10% on the bench VM, so the median over them is the one to read.
Also: the MLP training step (784-128-10, batch 128, one thread, float64 and float32
compute) against PyTorch CPU in both dtypes, and one rank with 2 numba threads against
1 thread (the 2-ranks-x-1-thread side is bench_scaling's): the softmax gradient and the
reader's batch copy (against numpy's copy of the same row ranges), run in a child process
with NUMBA_NUM_THREADS=2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # one BLAS thread, as in a rank; before numpy loads

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import save, table

from kernels import cpu, cpu_mlp, reference
from kernels.memory import aligned_empty


@numba.njit(cache=True, nogil=True, fastmath=True)
def _read_all(X: np.ndarray) -> float:
    s = 0.0
    for i in range(X.shape[0]):
        for j in range(X.shape[1]):
            s += X[i, j]
    return s


@numba.njit(cache=True, nogil=True, fastmath=True)
def _read_all32(X: np.ndarray) -> float:
    """Sum X as one flat float32 stream: no conversion, no per-row reduction."""
    # float32 accumulators, reassociated (fastmath), so LLVM keeps several vectors of
    # partial sums in flight: the plain read rate of the array.
    x = X.reshape(-1)
    s = np.float32(0.0)
    for j in range(x.shape[0]):
        s += x[j]
    return float(s)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _fma_loop(x: np.ndarray, reps: int) -> float:
    """Return sum over reps of x . c: one load and one FMA per element (L1-resident x)."""
    # Reassociated, so LLVM keeps several vector accumulators in flight (hides FMA latency).
    s = x[0] - x[0]
    c = x[1]
    for _ in range(reps):
        for j in range(x.shape[0]):
            s += x[j] * c
    return float(s)


def _best_interleaved(fns: dict, rounds: int, per: int) -> dict:
    """Return each fn's best single-call time (s) over rounds x per calls, interleaved."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            for _ in range(per):
                t0 = time.perf_counter()
                fn()
                best[k] = min(best[k], time.perf_counter() - t0)
    return best


def fma_peak() -> dict[str, float]:
    """Return one core's FMA-loop GFLOP/s (2 flops per FMA) in float64 and float32."""
    out = {}
    for dt in (np.float64, np.float32):
        # 16 / 8 KiB: L1. Aligned to 64 bytes: numpy's 16-byte alignment let half the runs
        # split every vector load over two cache lines (measured 35 against 52 GFLOP/s).
        x = aligned_empty(2048, dt)
        x[:] = np.random.default_rng(1).random(2048)
        reps = 4000
        _fma_loop(x, 1)
        t = _best_interleaved({"f": lambda: _fma_loop(x, reps)}, 7, 1)["f"]
        out[np.dtype(dt).name] = 2 * x.size * reps / t / 1e9
    return out


def flops_per_byte(kernel: str, k: int = 10) -> float:
    """Return the kernel's FLOPs per byte of float32 X (FMA = 2 FLOPs)."""
    # Linear / logistic: one FMA for the logit dot and one for the gradient update per
    # element, 4 bytes each. Softmax: both per class.
    per_element = 4.0 * k if kernel.startswith("softmax") else 4.0
    return per_element / 4.0


def attainable_GBps(read_GBps: float, peak_gflops: float, fpb: float) -> float:
    """Return the roofline bound in GB/s of X: min(read limit, FMA peak / FLOPs per byte)."""
    return min(read_GBps, peak_gflops / fpb)


def gradients(n: int, d: int = 128, k: int = 10, rounds: int = 5, threads: int = 1,
              peak: dict[str, float] | None = None) -> list[dict]:
    rng = np.random.default_rng(0)
    Xn = rng.standard_normal((n, d), dtype=np.float32)
    # X where the engine's reader puts a batch: on a 64-byte boundary (kernels.memory). The
    # float32 GLM kernels also run on Xn, the same values where numpy placed them (for
    # large arrays 16 bytes past one: every 64-byte load then spans two cache lines), so
    # the table shows what the placement is worth (x_offset: X's start, mod 64).
    X = aligned_empty(Xn.shape, Xn.dtype)
    X[...] = Xn
    yb = (rng.random(n) < 0.5).astype(np.float32)
    yk = rng.integers(0, k, n).astype(np.float32)
    w = 0.1 * rng.standard_normal(d + 1)
    W = 0.1 * rng.standard_normal((d + 1) * k)
    g, G = np.empty(d + 1), np.empty((d + 1) * k)
    cpu.warmup()
    _read_all(X[:10])
    _read_all32(X[:10])
    per = max(1, 200_000 // n * 4)
    # One numba thread by default, as the read loop and the FMA peak: the ratios are then
    # per core. (numba defaults to one thread per CPU, so a direct run used to time the
    # kernels on 2 threads against a 1-thread read; bench/run.py sets NUMBA_NUM_THREADS=1.)
    threads_before = numba.get_num_threads()
    numba.set_num_threads(threads)
    numpy_placed = " (numpy-placed X)"
    fns = {"read": lambda: _read_all(X), "read f32": lambda: _read_all32(X),
           "logistic": lambda: cpu.logistic_grad(X, yb, w, g),
           "logistic f32": lambda: cpu.logistic_grad(X, yb, w, g, "float32"),
           "linear": lambda: cpu.linear_grad(X, yb, w, g),
           "linear f32": lambda: cpu.linear_grad(X, yb, w, g, "float32"),
           "softmax k=10": lambda: cpu.softmax_grad(X, yk, W, k, G),
           "logistic f32" + numpy_placed: lambda: cpu.logistic_grad(Xn, yb, w, g, "float32"),
           "linear f32" + numpy_placed: lambda: cpu.linear_grad(Xn, yb, w, g, "float32")}
    t = _best_interleaved(fns, rounds, per)
    refs = {"logistic": lambda: reference.logistic_loss_grad_twopass(X, yb, w),
            "linear": lambda: reference.linear_loss_grad(X, yb, w),
            "softmax k=10": lambda: reference.softmax_loss_grad(X, yk, W, k)}
    tr = _best_interleaved(refs, 3, 1)
    numba.set_num_threads(threads_before)
    gb = X.nbytes / 1e9
    # The read limit is the faster of the two read loops (the float64-accumulating one
    # converts every element; the flat float32 one does not): ratios are against it.
    t_read = min(t["read"], t["read f32"])
    rows = []
    for name in fns:
        if name.startswith("read"):
            continue
        kernel = name.removesuffix(numpy_placed)
        base = kernel.removesuffix(" f32")
        fpb = flops_per_byte(name, k)
        flops = fpb * X.nbytes
        compute = "float32" if kernel.endswith("f32") else "float64"
        bound = attainable_GBps(gb / t_read, peak[compute], fpb) if peak else None
        rows.append({"kernel": name, "compute": compute, "n": n,
                     "x_offset": (Xn if name != kernel else X).ctypes.data % 64,
                     "fused_GBps": gb / t[name], "numpy_GBps": gb / tr[base],
                     "read64_GBps": gb / t["read"], "read32_GBps": gb / t["read f32"],
                     "vs_numpy": tr[base] / t[name], "of_read": t_read / t[name],
                     "GFLOPs": flops / t[name] / 1e9, "numba_threads": threads,
                     "bound_GBps": bound, "of_bound": (gb / t[name] / bound) if bound else None})
    return rows


def dram_spread(procs: int = 5) -> list[dict]:
    """Return the float32 GLM gradients' of_read from DRAM in ``procs`` fresh processes: median, min, max.

    Each process runs ``gradients`` at 200000 x 128 (``dram_child``). On the bench VM one
    process's figure for the same kernel moved by +-5-10% from the next (where its pages
    landed, the host's other work); the in-process ratio against the read loop does not
    remove that. So item 1's DRAM rows are judged by the median over processes.
    """
    runs = []
    for _ in range(procs):
        proc = subprocess.run([sys.executable, __file__, "--dram-child"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the DRAM child exited {proc.returncode}:\n{proc.stderr}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return [{"kernel": k, "processes": procs, "of_read_median": float(np.median([r[k] for r in runs])),
             "of_read_min": min(r[k] for r in runs), "of_read_max": max(r[k] for r in runs)} for k in runs[0]]


def mlp_vs_torch(batch: int = 128, sizes: tuple[int, ...] = (784, 128, 10), rounds: int = 7,
                 lr: float = 1e-6) -> list[dict]:
    """Return rows timing one MLP training step (forward, backward, SGD update), one thread.

    Equal work on each side: summed cross-entropy loss and gradient of the same layers on
    the same batch, then p -= lr * g on every parameter. fleetmpi keeps float64
    parameters in both rows; its "float32" row computes the products in float32
    (kernels.cpu_mlp). torch keeps its parameters in the row's dtype.
    """
    rng = np.random.default_rng(2)
    X = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch).astype(np.float32)
    p0 = 0.05 * rng.standard_normal(reference.mlp_param_count(sizes))
    fns = {}
    for dt in ("float64", "float32"):
        p, g = p0.copy(), np.empty_like(p0)

        def ours(p=p, g=g, dt=dt) -> None:
            cpu_mlp.mlp_grad(X, y, p, sizes, g, dt)
            p -= lr * g
        fns[f"fleetmpi {dt}"] = ours
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(1)
        for tdt, name in ((torch.float32, "torch float32"), (torch.float64, "torch float64")):
            net = torch.nn.Sequential(torch.nn.Linear(sizes[0], sizes[1]), torch.nn.ReLU(),
                                      torch.nn.Linear(sizes[1], sizes[2])).to(tdt)
            xt, yt = torch.from_numpy(X).to(tdt), torch.from_numpy(y.astype(np.int64))
            lossf = torch.nn.CrossEntropyLoss(reduction="sum")
            opt = torch.optim.SGD(net.parameters(), lr=lr)

            def step(net=net, xt=xt, yt=yt, opt=opt) -> None:
                opt.zero_grad(set_to_none=True)
                lossf(net(xt), yt).backward()
                opt.step()
            fns[name] = step
    for fn in fns.values():
        fn()
    t = _best_interleaved(fns, rounds, 50)
    ref = t.get("torch float32")
    return [{"step": k, "compute_dtype": k.split()[1], "batch": batch, "us": v * 1e6,
             "vs_torch_float32": (ref / v) if ref else None} for k, v in t.items()]


def threads(n: int = 200_000, d: int = 128, k: int = 10) -> list[dict]:
    """Return 1 vs 2 numba threads for the softmax gradient (bitwise-equal results checked)."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((n, d), dtype=np.float32)
    yk = rng.integers(0, k, n).astype(np.float32)
    W = 0.1 * rng.standard_normal((d + 1) * k)
    rows, outs = [], []
    for nt in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
        numba.set_num_threads(nt)
        G = np.empty((d + 1) * k)
        t = _best_interleaved({"s": lambda G=G: cpu.softmax_grad(X, yk, W, k, G)}, 5, 1)["s"]
        outs.append(G.tobytes())
        rows.append({"threads": nt, "ms": t * 1e3, "bitwise_equal_to_1": outs[-1] == outs[0]})
    numba.set_num_threads(1)
    return rows


def batch_copy(n: int = 200_000, d: int = 128, batch: int = 4096, batches: int = 200) -> list[dict]:
    """Return the engine's batch copy (RankReader.read through the file's memory map) at 1 and
    2 numba threads against numpy's copy of the same row ranges, ms per batch.

    The file is a make-data-sized HDF5 file (n x d float32, in the page cache); the batches'
    row ranges come from the engine's SampleOrder (shuffled 32-row blocks).
    """
    import tempfile

    import h5py

    from fleetmpi.engine.data import RankReader, SampleOrder
    rng = np.random.default_rng(5)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.h5")
        with h5py.File(path, "w") as f:
            f["X"] = rng.standard_normal((n, d), dtype=np.float32)
            f["y"] = rng.integers(0, 2, n).astype(np.float32)
        reader = RankReader(Path(path))
        assert reader.direct, "h5py wrote a contiguous dataset: the reader should map it"
        order = SampleOrder(n, batch, 0, 32)
        plans = [sorted(order.ranges(s * batch, (s + 1) * batch)) for s in range(batches)]
        X, y = reader._map   # the map the reader copies from: numpy's copy reads the same pages

        def numpy_copy() -> None:
            for p in plans:
                np.concatenate([X[a:b] for a, b in p])
                np.concatenate([y[a:b] for a, b in p])

        fns = {"numpy": numpy_copy}
        counts = sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)})
        def engine_copy(nt: int) -> None:
            numba.set_num_threads(nt)   # as a rank with threads_per_rank nt; the reader picks its kernel
            for p in plans:
                reader.read(p)

        for nt in counts:
            fns[f"t{nt}"] = lambda nt=nt: engine_copy(nt)
        for f in fns.values():
            f()   # maps every page, loads the kernels
        t = _best_interleaved(fns, 5, 1)
        want = np.concatenate([X[a:b] for a, b in plans[-1]])
        same = {}
        for nt in counts:
            engine_copy(nt)
            same[nt] = (reader.read(plans[-1])[0] == want).all()
        numba.set_num_threads(1)
        reader.close()
    mb = batch * d * 4 / 1e6
    return [{"copy": "numpy (concatenate slices)", "threads": 1, "ms_per_batch": t["numpy"] / batches * 1e3,
             "GBps": mb * batches / t["numpy"] / 1e3, "vs_numpy": 1.0, "rows_equal": True}] + [
            {"copy": "fleetmpi reader (kernels.gather)", "threads": nt, "ms_per_batch": t[f"t{nt}"] / batches * 1e3,
             "GBps": mb * batches / t[f"t{nt}"] / 1e3, "vs_numpy": t["numpy"] / t[f"t{nt}"], "rows_equal": bool(same[nt])}
            for nt in counts]


def csr_copy(n: int = 200_000, d: int = 1 << 18, batch: int = 4096, batches: int = 50) -> list[dict]:
    """Return the engine's CSR batch copy (CsrReader.read through the file's memory maps)
    against numpy doing what it did before (per range: slice indptr, indices, data and y,
    then concatenate), ms per batch, one thread.

    The file: n rows of 20-79 sorted column ids of d (a hashed text's shape), in the page
    cache; the ranges from the engine's SampleOrder (shuffled 32-row blocks).
    """
    import tempfile

    import h5py

    from fleetmpi.engine.csr_data import CsrReader
    from fleetmpi.engine.data import SampleOrder
    rng = np.random.default_rng(6)
    lens = rng.integers(20, 80, n)
    indptr = np.concatenate(([0], np.cumsum(lens))).astype(np.int64)
    cols = (np.repeat(np.arange(n) * 7919, lens) + np.arange(indptr[-1]) * 3) % d   # any ids; sorted below
    cols = np.concatenate([np.sort(cols[a:b]) for a, b in zip(indptr[:-1], indptr[1:])]).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.h5")
        with h5py.File(path, "w") as f:
            f["indptr"], f["indices"] = indptr, cols
            f["data"], f["y"] = rng.standard_normal(cols.size).astype(np.float32), rng.integers(0, 2, n).astype(np.float32)
            f.attrs["format"], f.attrs["n_features"] = "csr", d
        reader = CsrReader(Path(path))
        assert reader.direct, "h5py wrote contiguous datasets: the reader should map them"
        order = SampleOrder(n, batch, 0, 32)
        plans = [sorted(order.ranges(s * batch, (s + 1) * batch)) for s in range(batches)]
        ip_m, ix_m, dv_m, y_m = reader._arrays

        def numpy_copy(p: list) -> tuple:
            ips, ixs, dvs, ys, off = [np.zeros(1, np.int64)], [], [], [], 0
            for lo, hi in p:
                ip = np.asarray(ip_m[lo:hi + 1], np.int64)
                a, b = int(ip[0]), int(ip[-1])
                ips.append(ip[1:] - a + off)
                ixs.append(ix_m[a:b])
                dvs.append(dv_m[a:b])
                ys.append(y_m[lo:hi])
                off += b - a
            return np.concatenate(ips), np.concatenate(ixs), np.concatenate(dvs), np.concatenate(ys)

        fns = {"numpy": lambda: [numpy_copy(p) for p in plans], "engine": lambda: [reader.read(p) for p in plans]}
        for f in fns.values():
            f()   # maps every page, loads the kernels
        t = _best_interleaved(fns, 5, 1)
        want = numpy_copy(plans[-1])
        X, yy, _ = reader.read(plans[-1])
        same = all(np.array_equal(a, b) for a, b in zip((X.indptr, X.indices, X.data, yy), want))
        nnz = sum(int(ip_m[b] - ip_m[a]) for p in plans for a, b in p) / batches
        reader.close()
    return [{"copy": "numpy (slices a range, concatenate)", "ms_per_batch": t["numpy"] / batches * 1e3,
             "entries_per_batch": nnz, "vs_numpy": 1.0, "rows_equal": True},
            {"copy": "fleetmpi reader (kernels.gather.gather_csr)", "ms_per_batch": t["engine"] / batches * 1e3,
             "entries_per_batch": nnz, "vs_numpy": t["numpy"] / t["engine"], "rows_equal": bool(same)}]


def _two_thread_tables() -> dict:
    """Return threads() and batch_copy() as run in a child process with two numba threads.

    numba fixes its thread count at import, and the benchmarks run with NUMBA_NUM_THREADS=1
    (bench/fleetrun.ENV: every other row is per core), so the 2-thread rows come from a child.
    """
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, __file__, "--two-thread-child"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the two-thread child exited {proc.returncode}:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gradients-only", action="store_true",
                    help="only the FMA peak and the gradient table (no MLP, no threads); writes no results file")
    ap.add_argument("--two-thread-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dram-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, choices=range(1, numba.config.NUMBA_NUM_THREADS + 1),
                    metavar="N", help="numba threads for the gradient table (default 1: ratios per core)")
    args = ap.parse_args(argv)
    if args.two_thread_child:
        print(json.dumps({"threads": threads(), "copy": batch_copy()}))
        return
    if args.dram_child:
        print(json.dumps({r["kernel"]: r["of_read"] for r in gradients(200_000) if " f32" in r["kernel"]}))
        return
    peak = fma_peak()
    rows = (gradients(200_000, threads=args.threads, peak=peak)
            + gradients(1536, rounds=5, threads=args.threads, peak=peak))
    for r in rows:
        r["of_fma_peak_f64"] = r["GFLOPs"] / peak["float64"]
    print(f"FMA peak, one core (numba FMA loop): float64 {peak['float64']:.1f} GFLOP/s, "
          f"float32 {peak['float32']:.1f} GFLOP/s")
    print(table(f"gradient kernels, X float32 n x 128, {args.threads} numba thread(s) (GB/s of X; ratios"
                " measured in this run)", rows,
                [("kernel", "s"), ("compute", "s"), ("n", "d"), ("x_offset", "d"), ("fused_GBps", ".2f"), ("numpy_GBps", ".2f"),
                 ("read64_GBps", ".2f"), ("read32_GBps", ".2f"),
                 ("vs_numpy", ".2f"), ("of_read", ".2f"), ("GFLOPs", ".1f"), ("of_fma_peak_f64", ".2f"),
                 ("bound_GBps", ".2f"), ("of_bound", ".2f")]))
    print(f"load average {os.getloadavg()[0]:.2f}")
    if args.gradients_only:
        return
    spread = dram_spread()
    print(table("float32 GLM gradients from DRAM (200000 x 128), of_read in separate processes: item 1's"
                " figure is the median", spread,
                [("kernel", "s"), ("processes", "d"), ("of_read_median", ".2f"), ("of_read_min", ".2f"),
                 ("of_read_max", ".2f")]))
    mlp = mlp_vs_torch()
    print(table("MLP 784-128-10 training step (forward, backward, SGD update), batch 128, one thread;"
                " vs_torch_float32 > 1: faster than torch float32", mlp,
                [("step", "s"), ("compute_dtype", "s"), ("us", ".0f"), ("vs_torch_float32", ".2f")]))
    two = _two_thread_tables()
    thr, copy = two["threads"], two["copy"]
    print(table("softmax k=10 gradient, 200000 x 128, numba threads in one rank", thr,
                [("threads", "d"), ("ms", ".1f"), ("bitwise_equal_to_1", "")]))
    print(table("batch copy, 4096 rows x 128 float32 a batch (shuffled 32-row blocks of a 200k-row file in the"
                " page cache), numba threads in one rank", copy,
                [("copy", "s"), ("threads", "d"), ("ms_per_batch", ".3f"), ("GBps", ".1f"), ("vs_numpy", ".2f"),
                 ("rows_equal", "")]))
    csr = csr_copy()
    print(table("CSR batch copy, 4096 rows a batch (20-79 entries a row; shuffled 32-row blocks of a 200k-row"
                " file in the page cache), one thread", csr,
                [("copy", "s"), ("ms_per_batch", ".3f"), ("entries_per_batch", ".0f"), ("vs_numpy", ".2f"),
                 ("rows_equal", "")]))
    save("kernels", rows, fma_peak_gflops=peak, dram_spread=spread, mlp=mlp, threads=thr, batch_copy=copy, csr_copy=csr,
         threads_numba=numba.get_num_threads(), loadavg=os.getloadavg())


if __name__ == "__main__":
    main()
