"""Threshold encode/decode and exact fixed-point kernels against numpy, on random data."""

from __future__ import annotations

import numpy as np
import pytest

from fleetmpi.errors import BadInput
from fleetmpi.models import build_model
from fleetmpi.spec import ModelSpec, from_raw
from fleetmpi.sync.threshold import next_tau
from kernels import compress, exact
from kernels import reference as ref

N = 1009


def _ref_encode(res: np.ndarray, g: np.ndarray, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Return (packed uint32 entries, new residual) the way Strom 2015 describes it."""
    r = res + g
    idx = np.flatnonzero(np.abs(r) >= tau)
    neg = r[idx] < 0
    r[idx] -= np.where(neg, -tau, tau)
    return idx.astype(np.uint32) | np.where(neg, np.uint32(1 << 31), np.uint32(0)), r


def _ref_decode(packed: np.ndarray, tau: float, n: int) -> np.ndarray:
    g = np.zeros(n)
    idx = (packed & np.uint32(0x7FFFFFFF)).astype(np.int64)
    np.add.at(g, idx, np.where(packed >> np.uint32(31), -tau, tau))
    return g


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    compress.warmup()
    exact.warmup()


# ------------------------------------------------------------------------ threshold


@pytest.mark.parametrize("tau", [0.3, 1.7])
def test_encode_matches_reference(tau: float) -> None:
    rng = np.random.default_rng(1)
    res, g = 0.5 * rng.standard_normal(N), rng.standard_normal(N)
    want_packed, want_res = _ref_encode(res, g, tau)
    kept = np.abs(res + g) < tau
    out = np.zeros(N, np.uint32)
    m = compress.encode(res, g, tau, out)
    assert 0 < m < N and m == N - kept.sum()
    np.testing.assert_array_equal(out[:m], want_packed)
    np.testing.assert_array_equal(res, want_res)
    assert np.all(np.abs(res[kept]) < tau)


def _ref_gap_bytes(packed: np.ndarray) -> bytes:
    """Return the gap-varint block of sorted uint32 entries: LEB128 of 2 * gap + sign each."""
    out, prev = bytearray(), -1
    for w in packed.tolist():
        j, neg = w & 0x7FFFFFFF, w >> 31
        v = 2 * (j - prev - 1) + neg
        prev = j
        while v >= 128:
            out.append(v & 127 | 128)
            v >>= 7
        out.append(v)
    return bytes(out)


@pytest.mark.parametrize(("n", "scale"), [(N, 1.0), (40000, 0.4), (5, 3.0), (0, 1.0)])
def test_gap_varint_block_matches_reference_bytes_and_decodes_to_the_same_sum(n: int, scale: float) -> None:
    # scale 0.4 on 40000 parameters: few entries, gaps past 64 and 8192 (2- and 3-byte varints).
    rng = np.random.default_rng(5)
    res, g = 0.5 * rng.standard_normal(n), scale * rng.standard_normal(n)
    want_packed, want_res = _ref_encode(res, g, 1.3)
    out = np.full(compress.MAX_GAP_BYTES * n, 0xEE, np.uint8)
    m, nb = compress.encode_gaps(res, g, 1.3, out)
    assert m == want_packed.size
    assert out[:nb].tobytes() == _ref_gap_bytes(want_packed)
    np.testing.assert_array_equal(res, want_res)
    got = np.full(n, 0.25)   # decode adds to what is there: several ranks' blocks, one sum
    assert compress.decode_gaps(out[:nb], 1.3, got) == m
    np.testing.assert_array_equal(got, 0.25 + _ref_decode(want_packed, 1.3, n))


def test_gap_varint_worst_case_fits_and_corrupt_blocks_are_refused() -> None:
    n = 300
    out = np.empty(compress.MAX_GAP_BYTES * n, np.uint8)
    m, nb = compress.encode_gaps(np.zeros(n), np.full(n, -5.0), 1.0, out)   # every entry, negative
    assert (m, nb) == (n, n)
    with pytest.raises(ValueError, match="cut off or addresses an index >= 299"):
        compress.decode_gaps(out[:nb], 1.0, np.zeros(n - 1))
    with pytest.raises(ValueError, match="cut off"):
        compress.decode_gaps(np.array([0x80], np.uint8), 1.0, np.zeros(n))
    with pytest.raises(ValueError, match="must hold 1500 bytes"):
        compress.encode_gaps(np.zeros(n), np.zeros(n), 1.0, out[:-1])


def test_decode_matches_reference_with_repeated_indices() -> None:
    rng = np.random.default_rng(2)
    # Blocks of several ranks: the same index may come from every rank, with either sign.
    idx = rng.integers(0, N, 3000).astype(np.uint32)
    packed = idx | (rng.integers(0, 2, 3000).astype(np.uint32) << np.uint32(31))
    g = np.full(N, np.nan)
    compress.decode(packed, 0.37, g)
    np.testing.assert_allclose(g, _ref_decode(packed, 0.37, N), rtol=0, atol=1e-12)


def test_round_trip_sign_and_index_bits() -> None:
    res = np.zeros(N)
    g = np.zeros(N)
    g[[0, 5, N - 1]] = [2.0, -3.0, 1.5]
    out = np.empty(N, np.uint32)
    m = compress.encode(res, g, 1.0, out)
    assert list(out[:m]) == [0, 5 | (1 << 31), N - 1]
    dec = np.empty(N)
    compress.decode(out[:m], 1.0, dec)
    np.testing.assert_array_equal(dec + res, g)  # exact here: small integers


def test_uint16_words_match_uint32_words_and_carry_the_sign_in_bit_15() -> None:
    rng = np.random.default_rng(7)
    n = 2 ** 15
    assert compress.entry_dtype(n) == np.uint16 and compress.entry_dtype(n + 1) == np.uint32
    g = rng.standard_normal(n)
    r32, r16 = 0.3 * np.ones(n), 0.3 * np.ones(n)
    o32, o16 = np.empty(n, np.uint32), np.empty(n, np.uint16)
    m = compress.encode(r32, g, 1.1, o32)
    assert compress.encode(r16, g, 1.1, o16) == m > 0
    np.testing.assert_array_equal(r16, r32)
    want = (o32[:m] & 0x7FFFFFFF) | ((o32[:m] >> 31) << 15)
    np.testing.assert_array_equal(o16[:m], want.astype(np.uint16))
    assert o16[:m].max() >= 2 ** 15   # some negative entry, index near the top
    d32, d16 = np.empty(n), np.empty(n)
    compress.decode(o32[:m], 1.1, d32)
    compress.decode(o16[:m], 1.1, d16)
    np.testing.assert_array_equal(d16, d32)
    with pytest.raises(ValueError, match="2\\*\\*15"):
        compress.encode(np.zeros(n + 1), np.zeros(n + 1), 1.0, np.empty(n + 1, np.uint16))
    with pytest.raises(TypeError, match="uint32 or uint16"):
        compress.encode(np.zeros(3), np.zeros(3), 1.0, np.empty(3, np.int32))


def test_residual_conserves_mass_over_many_steps() -> None:
    rng = np.random.default_rng(3)
    res = np.zeros(N)
    out = np.empty(N, np.uint32)
    dec = np.empty(N)
    fed, sent = np.zeros(N), np.zeros(N)
    for _ in range(200):
        g = rng.standard_normal(N) * 0.2 + 0.05
        fed += g
        m = compress.encode(res, g, 0.5, out)
        compress.decode(out[:m], 0.5, dec)
        sent += dec
    np.testing.assert_allclose(sent + res, fed, rtol=0, atol=1e-10)
    assert np.abs(sent).max() > 0 and np.abs(res).max() > 0


def test_wrappers_reject_bad_input() -> None:
    res, g, out = np.zeros(N), np.ones(N), np.empty(N, np.uint32)
    with pytest.raises(TypeError, match="dtype"):
        compress.encode(res.astype(np.float32), g, 1.0, out)
    with pytest.raises(ValueError, match="tau"):
        compress.encode(res, g, 0.0, out)
    with pytest.raises(ValueError, match="room"):
        compress.encode(res, g, 1.0, out[:10])
    with pytest.raises(ValueError, match="index"):
        compress.decode(np.array([N], np.uint32), 1.0, np.empty(N))


def test_adaptive_tau_rule() -> None:
    assert next_tau(1.0, 0.04, 0.01, 1.0) == 2.0          # 4x too dense: double (capped)
    assert next_tau(1.0, 0.0025, 0.01, 1.0) == 0.5        # 4x too sparse: halve
    assert next_tau(1.0, 0.0, 0.01, 1.0) == 0.5           # nothing sent: shrink
    assert abs(next_tau(1.0, 0.0121, 0.01, 1.0) - 1.1) < 1e-12
    assert next_tau(1e-20, 0.0, 0.01, 1.0) == 2.0 ** -40  # floor relative to the start


# ------------------------------------------------------------------------ exact


def _model_problem(kind: str, n: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    d, k = 11, 4
    X = rng.standard_normal((n, d)).astype(np.float32)
    spec = ModelSpec(kind=kind, hidden=(7, 5) if kind == "mlp" else ())
    model = build_model(spec, d, k)
    if kind == "linear":
        y = rng.standard_normal(n).astype(np.float32)
    elif kind == "logistic":
        y = (rng.random(n) < 0.5).astype(np.float32)
    else:
        y = rng.integers(0, k, n).astype(np.float32)
    return model, X, y, 0.5 * rng.standard_normal(model.n_params)


def _fixed_sum(factors: list, n_rows: int, chunks: list[slice]) -> tuple[np.ndarray, list[float]]:
    """Return the decoded gradient summed chunk by chunk (as ranks would) and the scales."""
    scales = [exact.fixed_scale(max(exact.row_bound(U[c], V[c]) for c in chunks), n_rows) for U, V in factors]
    parts = []
    for c in chunks:
        acc = []
        for (U, V), s in zip(factors, scales):
            a = np.zeros((U.shape[1] + 1) * V.shape[1], np.int64)
            exact.fixed_accumulate(np.ascontiguousarray(U[c]), np.ascontiguousarray(V[c]), s, a)
            acc.append(a)
        parts.append(acc)
    total = [sum(p[t] for p in parts) for t in range(len(factors))]
    return np.concatenate([a * (1.0 / s) for a, s in zip(total, scales)]), scales


@pytest.mark.parametrize("kind", ["linear", "logistic", "softmax", "mlp"])
def test_row_factors_give_the_reference_gradient(kind: str) -> None:
    model, X, y, p = _model_problem(kind, 203, seed=4)
    loss, factors = model.row_factors(X, y, p)
    g = np.empty(model.n_params)
    want_loss = model.loss_grad_sum(X, y, p, g)
    dec, scales = _fixed_sum(factors, 203, [slice(0, 203)])
    assert abs(loss - want_loss) < 1e-12 * want_loss
    np.testing.assert_allclose(dec, g, rtol=0, atol=1e-12 * np.abs(g).max())
    assert all(s == 2.0 ** round(np.log2(s)) for s in scales)  # powers of two
    if kind == "softmax":
        np.testing.assert_allclose(dec, ref.softmax_loss_grad(X, y, p, 4)[1], rtol=1e-11)


@pytest.mark.parametrize("kind", ["logistic", "mlp"])
def test_fixed_point_sum_is_bitwise_independent_of_the_split(kind: str) -> None:
    model, X, y, p = _model_problem(kind, 97, seed=5)
    rows = [model.row_factors(X[i:i + 1].copy(), y[i:i + 1].copy(), p)[1] for i in range(97)]
    _, whole = model.row_factors(X, y, p)
    assert all(U.shape[0] == V.shape[0] == 97 for U, V in whole)
    # A row's factors do not depend on which other rows share its batch.
    for i in (0, 50, 96):
        for (_, V), (_, v) in zip(whole, rows[i]):
            np.testing.assert_array_equal(V[i], v[0])
    want, _ = _fixed_sum(whole, 97, [slice(0, 97)])
    rng = np.random.default_rng(6)
    for parts in (2, 3, 7):
        cuts = np.sort(rng.choice(np.arange(1, 97), parts - 1, replace=False))
        chunks = [slice(a, b) for a, b in zip([0, *cuts], [*cuts, 97])]
        got, _ = _fixed_sum(whole, 97, chunks[::-1])
        np.testing.assert_array_equal(got, want)


def test_fixed_scale_cannot_overflow_at_the_bound() -> None:
    n = 1000
    V = np.full((n, 3), -7.25)
    U = np.full((n, 2), 3.0, np.float32)
    bound = exact.row_bound(U, V)
    assert bound == 3.0 * 7.25
    s = exact.fixed_scale(bound, n)
    acc = np.zeros(9, np.int64)
    exact.fixed_accumulate(U, V, s, acc)
    # Python ints do not wrap: the int64 sum equals the true one and lies below 2**63.
    assert int(acc[0]) == n * round(-3.0 * 7.25 * s)
    assert 2 ** 61 < abs(int(acc[0])) < 2 ** 63
    assert exact.fixed_scale(0.0, 5) == 1.0 and exact.fixed_scale(1e-310, 5) == 2.0 ** 960
    with pytest.raises(ValueError, match="finite"):
        exact.fixed_scale(float("nan"), 5)


def test_row_bound_reports_nan() -> None:
    V = np.random.default_rng(8).standard_normal((5, 2))
    V[3, 1] = np.nan
    assert np.isnan(exact.row_bound(np.ones((5, 1)), V))


# ------------------------------------------------------------------------ spec


def _spec(sync: dict) -> object:
    raw = {"name": "t", "data": {"train": "x.h5"}, "model": {"kind": "softmax"}, "goal": {"max_steps": 1},
           "fleet": {"start": "a", "phases": {"a": {}}}, "sync": sync}
    return from_raw(raw, "s.yaml", ".")


@pytest.mark.parametrize(("sync", "words"), [
    ({"kind": "threshold"}, "sync.tau: threshold sync needs tau"),
    ({"kind": "dense", "tau": 1.0}, "sync.tau: only kind threshold takes tau"),
    ({"kind": "exact", "adaptive": True}, "sync.adaptive: only kind threshold"),
    ({"kind": "threshold", "tau": 1.0, "target_density": 0.1}, "sync.target_density: target_density steers"),
    ({"kind": "threshold", "tau": -1.0}, "sync.tau: expected a number > 0"),
    ({"kind": "dense", "extras_every": 5}, "sync.extras_every: only kind threshold takes extras_every"),
    ({"kind": "threshold", "tau": 1.0, "extras_every": 0}, "sync.extras_every: expected"),
    ({"kind": "bogus"}, "sync.kind: expected one of 'dense' | 'threshold' | 'exact' | 'sparse'"),
])
def test_sync_spec_rejects_inconsistent_combinations(sync: dict, words: str) -> None:
    with pytest.raises(BadInput, match="s.yaml: " + words.replace("|", r"\|")):
        _spec(sync)


def test_sync_spec_accepts_valid_combinations() -> None:
    s = _spec({"kind": "threshold", "tau": 0.5, "adaptive": True, "target_density": 0.02})
    assert (s.sync.kind, s.sync.tau, s.sync.adaptive, s.sync.target_density) == ("threshold", 0.5, True, 0.02)
    assert _spec({"kind": "threshold", "tau": 4.0, "extras_every": 50}).sync.extras_every == 50
    assert _spec({"kind": "exact"}).sync.kind == "exact"
