"""Arrays whose data start on a cache-line boundary, for the kernels' row buffers.

The GLM and softmax kernels read X a 64-byte vector at a time (``kernels.simd``: a zmm of
float32, or two ymm). numpy puts a large array 16 bytes past a page boundary (glibc's
mmap'ed chunk header), so with 512-byte rows (d = 128) every such load spans two cache
lines and costs two L1 accesses. Allocated on a 64-byte boundary instead, each row of a
d that is a multiple of 16 float32 starts on a line and each load touches one.

Measured (one thread, Zen 4 VM, X float32 x 128, best of 20+ calls interleaved, of the
bench's flat float32 read loop in the same run):
- in L2 (1536 rows, what a batch is right after the reader wrote it): float32 linear 32 -> 39
  GB/s and logistic 30 -> 36 (0.31 -> 0.38 and 0.29 -> 0.35 of the read), in every run;
- from DRAM (200k rows) the placement moved the rate both ways on this VM: in the first
  runs 0.83 -> 0.93 (linear) and 0.77 -> 0.89 (logistic); for the next forty minutes
  starts 16 or 48 bytes past a line ran 0.83-0.92 and starts on 0, 32 or 64 bytes
  0.69-0.83, whatever the prefetch distance (32 to 192 rows); then the two kernels split
  (aligned logistic 0.88 against 0.84, aligned linear 0.80 against 0.89). The rows-ahead
  prefetch (kernels.cpu_glm) was tuned on numpy-placed arrays. Not understood yet.
  End to end (bench_throughput, d = 64, batches 256-4096) the reader's placement moved
  samples/s by less than the run-to-run spread.
The reader's batches are aligned for the in-cache case. The kernels' results do not
depend on where X starts (tests/unit/test_aligned.py compares them bit for bit).
"""

from __future__ import annotations

import numpy as np

ALIGN = 64   # bytes: one cache line, one AVX-512 vector


def aligned_empty(shape: int | tuple[int, ...], dtype: np.dtype | type, align: int = ALIGN) -> np.ndarray:
    """Return an uninitialised C-contiguous array whose data start on an ``align``-byte boundary.

    A view into a slightly larger byte buffer (the view keeps it alive); writable, and
    slices of its leading rows (``a[:m]``) start on the same boundary. (An empty array has
    no data: numpy may report any address for it.)
    """
    if align < 1 or align & (align - 1):
        raise ValueError(f"align must be a power of two, got {align}")
    dt = np.dtype(dtype)
    shape_t = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    count = int(np.prod(shape_t, dtype=np.int64))
    raw = np.empty(count * dt.itemsize + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + count * dt.itemsize].view(dt).reshape(shape_t)
