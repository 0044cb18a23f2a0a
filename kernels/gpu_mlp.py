"""MLP gradient for any array module sharing numpy's API (cupy on a GPU phase, numpy in tests)."""

from __future__ import annotations

from typing import Any


def mlp_grad_xp(xp: Any, X: Any, y: Any, params: Any, sizes: tuple[int, ...], out: Any) -> None:
    """Fill ``out`` (n_params + 1,) with the summed ReLU-MLP cross-entropy gradient, then the loss sum.

    Written against the array API numpy and cupy share (``xp`` is the module): on a GPU
    phase cupy's BLAS does the matrix products on views of numba device arrays; tests
    run the same code with numpy against ``kernels.reference``.
    """
    n = X.shape[0]
    shapes = list(zip(sizes[:-1], sizes[1:]))
    count = sum(a * b + b for a, b in shapes)

    def unpack(flat: Any) -> list[tuple[Any, Any]]:
        layers, off = [], 0
        for a, b in shapes:
            layers.append((flat[off:off + a * b].reshape(a, b), flat[off + a * b:off + a * b + b]))
            off += a * b + b
        return layers

    layers, grads = unpack(params), unpack(out[:count])
    if n == 0:
        out[...] = 0.0
        return
    acts = [X.astype(xp.float64)]
    for W, b in layers[:-1]:
        h = acts[-1] @ W
        h += b
        xp.maximum(h, 0.0, out=h)
        acts.append(h)
    W, b = layers[-1]
    Z = acts[-1] @ W
    Z += b
    rows, labels = xp.arange(n), y.astype(xp.int64)
    mx = Z.max(axis=1, keepdims=True)
    zl = Z[rows, labels] - mx[:, 0]     # before exp: exp(z_label - max) may underflow
    E = xp.exp(Z - mx)
    s = E.sum(axis=1, keepdims=True)
    loss = (xp.log(s[:, 0]) - zl).sum()
    dZ = E / s
    dZ[rows, labels] -= 1.0
    for i in range(len(layers) - 1, -1, -1):
        gW, gb = grads[i]
        gW[...] = acts[i].T @ dZ
        gb[...] = dZ.sum(axis=0)
        if i > 0:
            dZ = (dZ @ layers[i][0].T) * (acts[i] > 0.0)   # ReLU passes gradient where it was positive
    out[count] = loss
