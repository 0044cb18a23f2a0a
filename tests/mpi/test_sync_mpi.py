"""Dense, threshold and exact sync under real mpiexec at 1, 2 and 3 ranks.

One script runs every check at a world size (one mpiexec start per size keeps this
quick); each rank regenerates every rank's seeded inputs, so the expected results are
plain numpy sums computed locally. A failed check aborts the world with its message.
"""

from __future__ import annotations

import json
import textwrap

import pytest
from conftest import mpirun

SCRIPT = textwrap.dedent('''
    import hashlib, json, sys, traceback
    import numpy as np
    from mpi4py import MPI
    from fleetmpi.models import build_model
    from fleetmpi.sync import DenseSync, ExactSync, ThresholdSync
    from kernels import reference as ref

    comm = MPI.COMM_WORLD
    rank, P = comm.Get_rank(), comm.Get_size()
    N, E = 301, 3          # parameters (odd on purpose), extras


    def check(ok, what):
        if not ok:
            raise AssertionError(what)


    def grads(step, ranks=P, tag=0):
        return [np.random.default_rng([tag, step, r]).standard_normal(N) for r in range(ranks)]


    def extras(step, r):
        return np.array([0.5 + r + step, 10.0 * r, -1.0 * step])


    def ref_encode(res, g, tau):
        res += g
        send = np.abs(res) >= tau
        sign = np.where(res[send] < 0, -1.0, 1.0)
        res[send] -= sign * tau
        out = np.zeros(N)
        out[np.flatnonzero(send)] = sign * tau
        return out, int(send.sum())


    def ref_block_bytes(out):
        """Bytes of the gap-varint block for the entries of ``out`` (LEB128 of 2 * gap + sign)."""
        idx = np.flatnonzero(out)
        gaps = np.diff(np.concatenate([[-1], idx])) - 1
        syms = 2 * gaps + (out[idx] < 0)
        return sum(1 + (int(v).bit_length() - 1) // 7 if v else 1 for v in syms)


    def ref_payload(blocks, extras_bytes):
        """A rank's share of one call: header byte (+4-byte length round if a block is long) + blocks."""
        long_round = 4 if max(blocks) >= 127 else 0
        total = sum(1 + long_round + b + extras_bytes for b in blocks)
        return -(-total // len(blocks))


    def dense():
        s = DenseSync(comm, N, E)
        for step in range(3):
            g, ex = s.reduce(grads(step)[rank], extras(step, rank))
            check(np.allclose(g, np.sum(grads(step), axis=0), rtol=1e-13, atol=1e-13), "dense sum")
            check(np.allclose(ex, sum(extras(step, r) for r in range(P))), "dense extras")
            check(s.payload_bytes == 8 * (N + E), f"dense payload {s.payload_bytes}")
            check(abs(s.wire_bytes - 2 * (P - 1) / P * 8 * (N + E)) < 1e-9, "dense wire")


    def threshold(tau=0.8, steps=12):
        s = ThresholdSync(comm, N, E, tau)
        res = [np.zeros(N) for _ in range(P)]
        fed, got = np.zeros(N), np.zeros(N)
        for step in range(steps):
            gs = grads(step, tag=1)
            want = np.zeros(N)
            counts, blocks = [], []
            for r in range(P):
                out, m = ref_encode(res[r], gs[r], tau)
                want += out
                counts.append(m)
                blocks.append(ref_block_bytes(out))
            g, ex = s.reduce(gs[rank].copy(), extras(step, rank))
            check(np.allclose(g, want, rtol=0, atol=1e-12), f"threshold sum at step {step}")
            check(np.allclose(ex, sum(extras(step, r) for r in range(P))), "threshold extras")
            want_bytes = ref_payload(blocks, 8 * E)
            check(s.payload_bytes == want_bytes, f"threshold payload {s.payload_bytes}, want {want_bytes}")
            check(s.wire_bytes == (P - 1) * s.payload_bytes, "threshold wire")
            check(0 < counts[rank] < N, f"threshold sends some, not all: {counts[rank]}")
            fed += np.sum(gs, axis=0)
            got += g
        check(np.allclose(s.residual, res[rank], rtol=0, atol=1e-12), "threshold residual")
        return s, fed, got


    def rescale(s, fed, got):
        """Checkpoint at P ranks, load at max(P - 1, 1), go on: no gradient mass lost."""
        state = s.gather_state()
        total = np.empty(N)
        comm.Allreduce(s.residual, total)
        if rank == 0:
            check(set(state) == {"sync_residual", "sync_tau"}, f"state keys {sorted(state)}")
            check(np.allclose(state["sync_residual"], total, rtol=0, atol=1e-12), "gathered residual sum")
            check(np.abs(state["sync_residual"]).max() > 0, "residual is nonzero")
        else:
            check(state == {}, "only rank 0 holds the merged state")
        state = comm.bcast(state, root=0)   # the worker's checkpoint read does the same
        Q = max(P - 1, 1)
        sub = comm.Split(0 if rank < Q else MPI.UNDEFINED, rank)
        if sub == MPI.COMM_NULL:
            return None
        t = ThresholdSync(sub, N, E, s.tau)
        t.load_state(state)
        now = np.empty(N)
        sub.Allreduce(t.residual, now)
        check(np.array_equal(now, state["sync_residual"]), "loaded residuals sum to the checkpoint's")
        for step in range(5):
            gs = grads(step, Q, tag=2)
            g, _ = t.reduce(gs[rank].copy(), extras(step, rank))
            fed += np.sum(gs, axis=0)
            got += g
        sub.Allreduce(t.residual, now)
        check(np.allclose(got + now, fed, rtol=0, atol=1e-9), "updates + residuals == sum of gradients")
        return float(np.abs(now).max())


    def adaptive():
        s = ThresholdSync(comm, N, E, 0.01, adaptive=True, target_density=0.05)
        for step in range(25):
            s.reduce(grads(step, tag=3)[rank].copy(), extras(step, rank))
        taus = comm.allgather(s.tau)
        check(len(set(taus)) == 1, f"tau differs between ranks: {taus}")
        check(s.tau > 0.01, f"tau grew from 0.01 towards the target density: {s.tau}")
        check(0.005 < s.density < 0.5, f"density near the 0.05 target: {s.density}")


    def deferred(every=4, steps=9):
        """defer_extras: silent calls cost 1 byte a rank and return zeros; extras come summed.

        tau lies above every entry, so no rank ever sends one. Flushes: the first call, every
        4th (calls 3, 7), a non-finite loss on rank 0 (call 4), a stop signal on the last
        rank (call 6); each returns the sums over the calls since the previous flush.
        """
        s = ThresholdSync(comm, N, 4, 1e9, extras_every=every)
        s.defer_extras = True

        def ex4(step, r):
            loss = np.inf if (step == 4 and r == 0) else 0.25 * (r + 1) * (step + 1)
            return np.array([loss, 7.0 + r, 3.0 * step + r, 1.0 if (step == 6 and r == P - 1) else 0.0])

        window, fed = np.zeros(4), np.zeros(N)
        for step in range(steps):
            g, ex = s.reduce(grads(step, tag=5)[rank].copy(), ex4(step, rank))
            fed += grads(step, tag=5)[rank]
            window += sum(ex4(step, r) for r in range(P))
            if step in (0, 3, 4, 6, 7):
                check(np.array_equal(ex, window), f"deferred extras at call {step}: {ex} != {window}")
                check(s.payload_bytes == 1 + 8 * 4, f"flush call {step} payload {s.payload_bytes}")
                window[:] = 0.0
            else:
                check(not ex.any(), f"silent call {step} returned extras {ex}")
                check(s.payload_bytes == 1, f"silent call {step} payload {s.payload_bytes}: one header byte")
            check(not g.any(), "nothing crossed tau")
        check(np.array_equal(s.residual, fed), "the residual holds every gradient fed")
        check(s.payload_total == 5 * (1 + 32) + 4, f"payload total {s.payload_total}")
        # A line search's call (not deferred) gets its own extras, never the held-back window's;
        # SGD's next call flushes at once instead of waiting for the 4th.
        for defer, step in ((True, 9), (False, 10), (True, 11), (True, 12)):
            s.defer_extras = defer
            _, ex = s.reduce(grads(step, tag=5)[rank].copy(), ex4(step, rank))
            now = sum(ex4(step, r) for r in range(P))
            check(not ex.any() if step in (9, 12) else np.array_equal(ex, now), f"call {step} extras {ex}")


    def exact_fallback():
        s = ExactSync(comm, N, E)
        for step in range(3):
            gs = grads(step, tag=4)
            g, ex = s.reduce(gs[rank], extras(step, rank))
            want = np.sum(gs, axis=0)
            check(np.allclose(g, want, rtol=0, atol=1e-14 * np.abs(want).max()), "exact fallback sum")
            check(np.allclose(ex, sum(extras(step, r) for r in range(P))), "exact extras")
            check(s.payload_bytes == 8 * N + 8 * (2 + E), f"exact payload {s.payload_bytes}")
            check(abs(s.wire_bytes - (2 * (P - 1) / P * 8 * N + (P - 1) * 8 * (2 + E))) < 1e-6, "exact wire")
            same = comm.allgather(hashlib.sha256(g.tobytes()).hexdigest())
            check(len(set(same)) == 1, "exact result differs between ranks")


    def exact_rows(kind, rows=50, d=13, k=4):
        rng = np.random.default_rng(7)
        X = rng.standard_normal((rows, d)).astype(np.float32)
        y = rng.integers(0, k, rows).astype(np.float32)
        model = build_model(build_spec(kind), d, k)
        p = 0.5 * rng.standard_normal(model.n_params)
        lo, hi = rank * rows // P, (rank + 1) * rows // P
        s = ExactSync(comm, model.n_params, E)
        loss = s.local_grad(model, X[lo:hi].copy(), y[lo:hi].copy(), p, s.grad_out)
        g, ex = s.reduce(s.grad_out, np.array([loss, hi - lo, 0.0]))
        want_loss, want = (ref.softmax_loss_grad(X, y, p, k) if kind == "softmax"
                           else ref.mlp_loss_grad(X, y, p, (d, 8, k)))
        check(np.allclose(g, want, rtol=0, atol=1e-12 * np.abs(want).max()), f"exact {kind} gradient")
        check(abs(ex[0] - want_loss) < 1e-10 * want_loss and ex[1] == rows, f"exact {kind} extras")
        return hashlib.sha256(g.tobytes()).hexdigest()


    def build_spec(kind):
        from fleetmpi.spec import ModelSpec
        return ModelSpec(kind=kind, hidden=(8,) if kind == "mlp" else ())


    try:
        dense()
        s, fed, got = threshold()
        after = rescale(s, fed, got)
        adaptive()
        deferred()
        exact_fallback()
        out = {"softmax": exact_rows("softmax"), "mlp": exact_rows("mlp"), "residual_after": after}
        if rank == 0:
            print(json.dumps(out), flush=True)
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
''')


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """Run the script at 1, 2 and 3 ranks; return each rank-0 JSON line by world size."""
    script = tmp_path_factory.mktemp("sync") / "sync_checks.py"
    script.write_text(SCRIPT)
    out = {}
    for n in (1, 2, 3):
        proc = mpirun(n, script)
        assert proc.returncode == 0, f"{n} rank(s):\n{proc.stdout}\n{proc.stderr}"
        out[n] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_dense_threshold_exact_match_numpy_and_count_bytes(runs: dict[int, dict], ranks: int) -> None:
    # The script checked sums, bytes, residuals and the P -> P-1 state transfer itself.
    assert set(runs[ranks]) == {"softmax", "mlp", "residual_after"}
    if ranks > 1:
        assert runs[ranks]["residual_after"] is not None


def test_exact_rows_are_bitwise_equal_for_any_rank_count(runs: dict[int, dict]) -> None:
    for kind in ("softmax", "mlp"):
        hashes = {n: runs[n][kind] for n in runs}
        assert len(set(hashes.values())) == 1, (kind, hashes)

