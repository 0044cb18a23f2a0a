"""Raw text end to end: make-data --from text -> fleetmpi run under real mpiexec -> predict on raw text."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import cli, events, metrics, write_spec

from fleetmpi.engine.csr_data import CsrReader
from fleetmpi.h5store import read_h5_verified

pytestmark = pytest.mark.slow

BITS, K, B = 14, 3, 16
D = 1 << BITS
CLASSES = ("alpha", "beta", "gamma")
LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))
COMMON = dict(model={"kind": "softmax", "l2": 1e-4}, optimizer={"kind": "sgd", "lr": 2.0, "momentum": 0.9, "batch": B},
              goal={"max_steps": 30}, checkpoint={"every_steps": 10, "keep": 2})


def phases(*ranks: int) -> dict[str, object]:
    """Return a fleet running on ranks[0], then on each next count every 12 steps."""
    names = [f"p{i}" for i in range(len(ranks))]
    return {"start": names[0], "phases": {n: {"ranks_per_node": r} for n, r in zip(names, ranks)},
            "rules": [{"in": a, "when": f"step >= {12 * (i + 1)}", "then": {"goto": b}}
                      for i, (a, b) in enumerate(zip(names, names[1:]))]}


def vocabularies(seed: int = 5) -> tuple[dict[str, list[str]], list[str]]:
    """Return random words per class and shared filler words."""
    rng = np.random.default_rng(seed)

    def words(n: int) -> list[str]:
        return ["".join(rng.choice(LETTERS, rng.integers(3, 9))) for _ in range(n)]
    return {c: words(40) for c in CLASSES}, words(200)


def documents(n: int, seed: int) -> list[tuple[str, str]]:
    """Return ``n`` (text, label) pairs: half of each document's words from its class, the rest shared."""
    vocab, shared = vocabularies()
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        label = CLASSES[i % K]
        m = int(rng.integers(6, 24))
        words = [*rng.choice(vocab[label], m // 2), *rng.choice(shared, m - m // 2)]
        docs.append((" ".join(rng.permutation(words)).capitalize() + ".", label))
    return docs


def read_split(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in ("indptr", "indices", "data", "y")}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hash one random corpus from a folder layout and from JSONL; return the folder's make-data output."""
    base = tmp_path_factory.mktemp("text")
    docs = sorted(documents(360, 1), key=lambda d: d[1])   # load_files order: class folders, then file names
    folder = base / "corpus"
    for i, (text, label) in enumerate(docs):
        (folder / label).mkdir(parents=True, exist_ok=True)
        (folder / label / f"doc-{i:04d}.txt").write_text(text)
    jsonl = base / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "topic": c}) + "\n" for t, c in docs))
    for src, out, extra in ((folder, base / "data", []),
                            (jsonl, base / "data-jsonl", ["--text-field", "body", "--label-field", "topic"])):
        cli("make-data", "--from", "text", str(src), "--out", str(out), "--hash-bits", str(BITS), "--ngrams", "1,2",
            *extra, check=True)
    for split in ("train.h5", "valid.h5"):
        a, b = read_split(base / "data" / split), read_split(base / "data-jsonl" / split)
        assert all(np.array_equal(a[k], b[k]) for k in a), split
    return base / "data"


def _params(job: Path) -> np.ndarray:
    arrays, _ = read_h5_verified(job / "model.h5", kind="model")
    return np.asarray(arrays["params"])


def _run(tmp_path: Path, name: str, data: Path, fleet: dict[str, object], sync: dict[str, object]) -> Path:
    # The default block_rows (runs of 32 rows): make-data shuffles the folder's class-by-class order.
    spec = write_spec(tmp_path / f"{name}.yaml", data, fleet=fleet, sync=sync, **COMMON)
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / name))
    assert proc.returncode == 0, proc.stderr
    assert "chunked or compressed" not in proc.stderr   # make-data's rows are contiguous: memory-mapped
    return tmp_path / name


def test_make_data_writes_contiguous_rows_read_through_maps(text_data: Path) -> None:
    with h5py.File(text_data / "train.h5", "r") as f:
        assert f["indices"].chunks is None and f["data"].chunks is None
        assert json.loads(f.attrs["class_names"]) == list(CLASSES)
    reader = CsrReader(text_data / "train.h5")
    assert reader.direct and reader.d == D
    reader.close()
    assert sorted(p.name for p in text_data.iterdir()) == ["train.h5", "valid.h5"]   # no stage or temp file left
    y = read_split(text_data / "train.h5")["y"]   # the corpus folders list the classes one after the other
    assert np.count_nonzero(np.diff(y)) > len(y) / 3, "rows not shuffled"


def test_exact_sync_is_bitwise_at_1_2_3_ranks_and_rescaled_2_to_3(tmp_path: Path, text_data: Path) -> None:
    exact = {"kind": "exact"}
    jobs = {r: _run(tmp_path, f"r{r}", text_data, phases(r), exact) for r in (1, 2, 3)}
    jobs["2->3"] = _run(tmp_path, "rescaled", text_data, phases(2, 3), exact)
    assert [(e["from_ranks"], e["to_ranks"]) for e in events(jobs["2->3"]) if e["event"] == "rescale"] == [(2, 3)]
    one = _params(jobs[1])
    assert np.isfinite(one).all() and np.abs(one).max() > 0
    for key in (2, 3, "2->3"):
        assert np.array_equal(_params(jobs[key]), one), key


def test_sparse_sync_follows_dense_at_a_tenth_of_the_bytes(tmp_path: Path, text_data: Path) -> None:
    dense = _run(tmp_path, "dense", text_data, phases(2), {"kind": "dense"})
    ref = _params(dense)
    dense_bytes = ((D + 1) * K + 4) * 8
    assert {m["sync_bytes_per_step"] for m in metrics(dense) if not m.get("eval")} == {dense_bytes}
    for r in (1, 2, 3):
        job = _run(tmp_path, f"sparse{r}", text_data, phases(r), {"kind": "sparse"})
        # same rows per step at any rank count; the sums differ only in order
        np.testing.assert_allclose(_params(job), ref, rtol=1e-8, atol=1e-10)
        if r > 1:
            steps = [m for m in metrics(job) if not m.get("eval")]
            assert max(m["sync_bytes_per_step"] for m in steps) * 10 <= dense_bytes, r


def test_predict_on_raw_text_and_on_csr_writes_class_names(tmp_path: Path, text_data: Path) -> None:
    sk = pytest.importorskip("sklearn.feature_extraction.text")
    job = _run(tmp_path, "job", text_data, phases(2), {"kind": "sparse"})
    new = documents(60, 2)   # unseen documents from the same classes
    src = tmp_path / "new.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t, _ in new))
    proc = cli("predict", str(job / "model.h5"), str(src), "--out", str(tmp_path / "p.h5"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["class_names"] == list(CLASSES)
    arrays, meta = read_h5_verified(tmp_path / "p.h5", kind="predictions")
    assert meta["class_names"] == list(CLASSES)
    # reference: scikit-learn's hashing, densified, and the softmax in numpy
    X = sk.HashingVectorizer(n_features=D, ngram_range=(1, 2), alternate_sign=True, norm="l2").transform(
        [t for t, _ in new]).astype(np.float32).toarray().astype(np.float64)
    W = _params(job).reshape(D + 1, K)
    Z = X @ W[:D] + W[D]
    P = np.exp(Z - Z.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(arrays["proba"], P, rtol=1e-9, atol=1e-12)
    assert np.mean([meta["class_names"][p] == c for p, (_, c) in zip(arrays["pred"], new)]) > 0.9
    # the hashed validation file goes through the same sparse kernels
    proc = cli("predict", str(job / "model.h5"), str(text_data / "valid.h5"), "--out", str(tmp_path / "v.h5"))
    assert proc.returncode == 0, proc.stderr
    varrays, vmeta = read_h5_verified(tmp_path / "v.h5", kind="predictions")
    assert vmeta["class_names"] == list(CLASSES)
    s = read_split(text_data / "valid.h5")
    Xv = np.zeros((s["y"].size, D))
    Xv[np.repeat(np.arange(s["y"].size), np.diff(s["indptr"])), s["indices"]] = s["data"]
    Zv = Xv @ W[:D] + W[D]
    np.testing.assert_array_equal(varrays["pred"], Zv.argmax(axis=1))
    assert np.mean(varrays["pred"] == s["y"]) > 0.9
    # --out .csv: class names and one probability column per class, for raw text and CSR alike
    for data, ref in ((src, P), (text_data / "valid.h5", None)):
        out = tmp_path / f"{Path(data).stem}.csv"
        proc = cli("predict", str(job / "model.h5"), str(data), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        lines = out.read_text().splitlines()
        assert lines[0] == "class," + ",".join(f"p_{c}" for c in CLASSES)
        rows = [ln.split(",") for ln in lines[1:]]
        probs = np.array([[float(v) for v in r[1:]] for r in rows])
        assert [r[0] for r in rows] == [CLASSES[i] for i in probs.argmax(axis=1)]
        if ref is not None:
            np.testing.assert_allclose(probs, ref, rtol=1e-8)
        else:
            assert [r[0] for r in rows] == [CLASSES[i] for i in varrays["pred"]]
