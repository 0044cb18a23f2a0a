"""Hashed text features: MurmurHash3, tokens and n-grams, CSR rows against scikit-learn, make-data --from text."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import cli, write_spec

from fleetmpi.errors import BadInput
from fleetmpi.text import Hashing, Source, analyze, hash_docs, make_text_data, murmurhash3_32

ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_") + \
    list("ÄÖÜäöüßéèçñøåжщыπλ中文字日本😀🚀") + list("  .,;:!?-'\"()\t\n")


def random_docs(rng: np.random.Generator, n: int, max_words: int = 40) -> list[str]:
    """Return ``n`` random documents of mixed-case, unicode and punctuated words."""
    docs = []
    for _ in range(n):
        words = ["".join(rng.choice(ALPHABET, rng.integers(1, 8))) for _ in range(rng.integers(0, max_words))]
        docs.append(" ".join(words))
    return docs


def sklearn_rows(docs: list[str], bits: int, ngrams: tuple[int, int]) -> object:
    text = pytest.importorskip("sklearn.feature_extraction.text")
    X = text.HashingVectorizer(n_features=2 ** bits, ngram_range=ngrams, alternate_sign=True,
                               norm="l2").transform(docs)
    X.eliminate_zeros()   # fleetmpi drops entries whose signs cancelled; scikit-learn keeps them as 0
    X.sort_indices()
    return X.astype(np.float32)


def test_murmurhash_matches_sklearn_on_random_tokens() -> None:
    ref = pytest.importorskip("sklearn.utils").murmurhash3_32
    rng = np.random.default_rng(11)
    keys = ["", "a", "ab", "abc", "abcd"] + ["".join(rng.choice(ALPHABET, rng.integers(1, 30))) for _ in range(3000)]
    got = [murmurhash3_32(k) for k in keys]
    assert got == [int(ref(k, seed=0, positive=False)) for k in keys]
    assert murmurhash3_32(b"\xff\xfe raw") == int(ref(b"\xff\xfe raw", seed=0, positive=False))
    assert any(h < 0 for h in got) and any(h > 0 for h in got)


@pytest.mark.parametrize("ngrams", [(1, 1), (1, 2), (2, 3)])
def test_tokens_and_ngrams_match_sklearn_analyzer(ngrams: tuple[int, int]) -> None:
    text = pytest.importorskip("sklearn.feature_extraction.text")
    analyzer = text.HashingVectorizer(ngram_range=ngrams).build_analyzer()
    for doc in random_docs(np.random.default_rng(5), 200):
        assert analyze(doc, Hashing(1024, ngrams)) == analyzer(doc)
    assert analyze("The Cat sat, a CAT!", Hashing(1024, (1, 2))) == ["the", "cat", "sat", "cat", "the cat",
                                                                      "cat sat", "sat cat"]


@pytest.mark.parametrize("bits,ngrams", [(10, (1, 1)), (10, (1, 2)), (18, (1, 2)), (14, (2, 3))])
def test_csr_rows_equal_hashing_vectorizer_bitwise(bits: int, ngrams: tuple[int, int]) -> None:
    docs = [*random_docs(np.random.default_rng(bits), 400), "", "x y z", "été été ÉTÉ"]
    ref = sklearn_rows(docs, bits, ngrams)
    indptr, indices, data = hash_docs(docs, Hashing(2 ** bits, ngrams))
    assert indptr.dtype == np.int64 and indices.dtype == np.int32 and data.dtype == np.float32
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data.view(np.uint32), ref.data.view(np.uint32))
    for r in range(len(docs)):   # sorted within rows, no duplicates
        assert np.all(np.diff(indices[indptr[r]:indptr[r + 1]]) > 0)


ASCII = [chr(c) for c in range(128)]
# Characters where unicode rules differ from ASCII ones: case mappings that change length or
# land in ASCII (dotted I, Kelvin sign, sharp s), word characters outside letters (digits of
# other scripts, superscripts, combining marks), non-BMP, the replacement character.
TRICKY = ["\u0130", "\u0131", "\u212a", "\u00df", "\u1e9e", "\uff11", "\u0663", "\u00b2", "\u00e9", "e\u0301",
          "\U0001f600", "\ufffd", "\u00a0", "\u2028", "\u01c5", "\u03a3", "\u03c2", "\u2019", "\u2014",
          "\u24b6", "\u0301"]


def ascii_docs(rng: np.random.Generator, n: int) -> list[str]:
    """Return ``n`` pure-ASCII documents over all 128 code points, words and separators mixed."""
    words = ["".join(rng.choice(ASCII[32:], rng.integers(1, 9))) for _ in range(300)]
    return ["".join(str(rng.choice(words)) + str(rng.choice(ASCII)) for _ in range(rng.integers(0, 60)))
            for _ in range(n)]


def real_docs() -> list[str]:
    """Return real text: numpy's and the standard library's sources (some hold non-ASCII), and man pages if installed."""
    import gzip
    import inspect
    files = sorted(Path(np.__file__).parent.rglob("*.py"))[:150] + sorted(Path(inspect.__file__).parent.glob("*.py"))[:150]
    docs = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    man = Path("/usr/share/man/man1")
    if man.is_dir():
        docs += [gzip.decompress(f.read_bytes()).decode("utf-8", "replace") for f in sorted(man.glob("*.gz"))[:200]]
    return docs


def assert_rows_equal_sklearn(docs: list[str], bits: int, ngrams: tuple[int, int]) -> None:
    ref = sklearn_rows(docs, bits, ngrams)
    indptr, indices, data = hash_docs(docs, Hashing(2 ** bits, ngrams))
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data.view(np.uint32), ref.data.view(np.uint32))


@pytest.mark.parametrize("ngrams", [(1, 1), (1, 2), (2, 3)])
def test_ascii_and_unicode_paths_match_sklearn_on_random_and_real_text(ngrams: tuple[int, int]) -> None:
    rng = np.random.default_rng(21)
    pure = ascii_docs(rng, 300)
    # ASCII documents with one tricky character spliced in: the whole document takes the exact path
    spliced = [d[:k] + str(rng.choice(TRICKY)) + d[k:] for d in pure[:150] for k in [int(rng.integers(0, len(d) + 1))]]
    real = real_docs()
    for docs in (pure, spliced, real, pure + spliced + real):
        assert_rows_equal_sklearn(docs, 18, ngrams)
    assert all(d.isascii() for d in pure) and not any(d.isascii() for d in spliced)
    assert sum(d.isascii() for d in real) > 50 and sum(not d.isascii() for d in real) > 5   # both paths ran


def write_folder(root: Path, docs: list[str], labels: list[str]) -> Path:
    for i, (doc, lab) in enumerate(zip(docs, labels)):
        (root / lab).mkdir(parents=True, exist_ok=True)
        (root / lab / f"{i:05d}.txt").write_text(doc, encoding="utf-8")
    return root


def read_split(path: Path) -> dict[str, object]:
    with h5py.File(path, "r") as f:
        return {**{k: f[k][()] for k in ("indptr", "indices", "data", "y", "source_index")}, **dict(f.attrs)}


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(3)
    docs = random_docs(rng, 150, 25)
    labels = [str(rng.choice(["sport", "ökonomie", "tech"])) for _ in docs]
    return docs, labels


def test_files_hold_the_format_and_sklearn_rows_in_any_chunk_size(tmp_path: Path,
                                                                  corpus: tuple[list[str], list[str]]) -> None:
    docs, labels = corpus
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": d, "topic": lab}) + "\n" for d, lab in zip(docs, labels)))
    outs = []
    for chunk in (1, 7, 4096):
        out = tmp_path / f"out{chunk}"
        make_text_data(src, out, text_field="body", label_field="topic", valid_fraction=0.3, hash_bits=12,
                       ngrams="1,2", seed=4, chunk_docs=chunk)
        outs.append((read_split(out / "train.h5"), read_split(out / "valid.h5")))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            for k in ("indptr", "indices", "data", "y", "source_index"):
                np.testing.assert_array_equal(a[k], b[k])
    train, valid = outs[0]
    names = json.loads(train["class_names"])
    assert names == sorted(set(labels)) and train["classes"] == 3 and train["format"] == "csr"
    assert json.loads(train["hashing"]) == {"n_features": 4096, "ngram_range": [1, 2], "alternate_sign": True,
                                            "norm": "l2", "lowercase": True, "token_pattern": r"(?u)\b\w\w+\b"}
    assert 0 < len(valid["y"]) < len(train["y"])
    # Each split holds its documents in a seeded random order; source_index says which row is
    # which document, so the rows compare with scikit-learn's rows of those documents.
    ref_all = sklearn_rows(docs, 12, (1, 2))
    nonempty = [i for i in range(len(docs)) if ref_all.indptr[i + 1] > ref_all.indptr[i]]
    rows_t, rows_v = len(train["y"]), len(valid["y"])
    assert rows_t + rows_v == len(nonempty)
    draws = np.random.default_rng([4, 7]).random(len(docs)) < 0.3
    for split, mask in ((train, ~draws), (valid, draws)):
        keep = split["source_index"]
        assert sorted(keep) == [i for i in nonempty if mask[i]] and list(keep) != sorted(keep)
        ref = ref_all[keep]
        np.testing.assert_array_equal(split["indptr"], ref.indptr)
        np.testing.assert_array_equal(split["indices"], ref.indices)
        np.testing.assert_array_equal(split["data"].view(np.uint32), ref.data.view(np.uint32))
        np.testing.assert_array_equal(split["y"], [names.index(labels[i]) for i in keep])


def test_folder_csv_and_jsonl_layouts_give_the_same_rows(tmp_path: Path, corpus: tuple[list[str], list[str]]) -> None:
    import csv
    docs, labels = corpus
    order = sorted(range(len(docs)), key=lambda i: (labels[i], i))   # load_files order: class folder, file name
    write_folder(tmp_path / "folder", docs, labels)
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "text"])
        w.writerows([labels[i], docs[i]] for i in order)
    got = []
    for src in ("folder", "d.csv"):
        make_text_data(tmp_path / src, tmp_path / f"o-{src}", valid_fraction=0.0, hash_bits=11)
        got.append(read_split(tmp_path / f"o-{src}" / "train.h5"))
        assert not (tmp_path / f"o-{src}" / "valid.h5").exists()
    for k in ("indptr", "indices", "data", "y", "source_index"):
        np.testing.assert_array_equal(got[0][k], got[1][k])


def test_rows_are_shuffled_by_seed_and_spilled_buckets_write_the_same_files(
        tmp_path: Path, corpus: tuple[list[str], list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    import fleetmpi.text as text_mod
    docs, labels = corpus
    write_folder(tmp_path / "folder", docs, labels)   # listed class by class

    def make(out: str, seed: int, chunk: int = 4096) -> tuple[dict[str, object], dict[str, object]]:
        make_text_data(tmp_path / "folder", tmp_path / out, valid_fraction=0.2, hash_bits=11, seed=seed,
                       chunk_docs=chunk)
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == ["train.h5", "valid.h5"]   # no stage file left
        return read_split(tmp_path / out / "train.h5"), read_split(tmp_path / out / "valid.h5")

    base = make("s0", 0)
    y = base[0]["y"]
    assert np.count_nonzero(np.diff(y)) > len(y) / 3   # classes mixed (the folder order changes class twice)
    other = make("s1", 1)   # another seed: another split and another order of the same documents
    both = [np.sort(np.concatenate([s["source_index"] for s in pair])) for pair in (base, other)]
    np.testing.assert_array_equal(both[0], both[1])
    common = np.intersect1d(base[0]["source_index"], other[0]["source_index"])
    assert not np.array_equal(*(s["source_index"][np.isin(s["source_index"], common)] for s in (base[0], other[0])))
    # Tiny buckets and spills: many key ranges staged on disk give the same files.
    spills = []
    monkeypatch.setattr(text_mod, "BUCKET_BYTES", 2000)
    monkeypatch.setattr(text_mod, "SPILL_BYTES", 1000)
    spill = text_mod._CsrWriter._spill
    monkeypatch.setattr(text_mod._CsrWriter, "_spill", lambda self: (spills.append(self.buckets), spill(self)))
    small = make("small", 0, chunk=7)
    assert spills and min(spills) > 5
    for a, b in zip(base, small):
        for k in ("indptr", "indices", "data", "y", "source_index"):
            np.testing.assert_array_equal(a[k], b[k])


def test_bad_input_counts_and_warnings(tmp_path: Path) -> None:
    root = tmp_path / "c"
    write_folder(root, ["red green blue"] * 5 + ["lonely words here"], ["a"] * 5 + ["solo"])
    (root / "a" / "empty.txt").write_text("")
    (root / "a" / "onechar.txt").write_text("x y z !")
    (root / "a" / "latin1.txt").write_bytes("café crème brûlée".encode("latin-1"))
    res = make_text_data(root, tmp_path / "o", valid_fraction=0.0, hash_bits=10)
    st = res["files"][str(tmp_path / "o" / "train.h5")]
    assert st["skipped_empty"] == 2 and st["replaced_utf8"] == 1 and st["rows"] == 7
    assert any("'solo' has a single document" in w for w in res["warnings"])
    assert any("skipped 2 empty" in w for w in res["warnings"])
    assert any("replaced undecodable bytes" in w and "latin1.txt" in w for w in res["warnings"])
    with pytest.raises(BadInput, match="no documents"):
        (tmp_path / "empty" / "cls").mkdir(parents=True)
        make_text_data(tmp_path / "empty", tmp_path / "o2")
    with pytest.raises(BadInput, match="at least 2"):
        make_text_data(write_folder(tmp_path / "one", ["only one class"], ["cls"]), tmp_path / "o3" / "deep")
    # a refusal leaves no folder it made, however deep; one that was there stays
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    with pytest.raises(BadInput, match="no documents"):
        make_text_data(tmp_path / "empty", tmp_path / "o")
    assert (tmp_path / "o" / "train.h5").exists()


def test_cli_refusals_exit_2_with_one_line_and_leave_old_files(tmp_path: Path) -> None:
    lines = [json.dumps({"text": f"document number {i} words", "label": "ab"[i % 2]}) for i in range(60)]
    lines[41] = json.dumps({"text": "this one has no label"})
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.h5").write_bytes(b"previous run")
    cases = [
        (["--from", "text", str(src), "--hash-bits", "9"], "--hash-bits 9"),
        (["--from", "text", str(src), "--hash-bits", "27"], "[10, 26]"),
        (["--from", "text", str(src)], f"{src}:42: no 'label' field (--label-field)"),
        (["--from", "text", str(tmp_path / "nothing")], "no such file or folder"),
        (["--from", "text", str(src), "--ngrams", "2,1"], "--ngrams 2,1"),
    ]
    for args, expected in cases:
        proc = cli("make-data", *args, "--out", str(out))
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip()
        assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert (out / "train.h5").read_bytes() == b"previous run"
    assert sorted(p.name for p in out.iterdir()) == ["train.h5"]   # no temp or half-written split


def test_model_keeps_hashing_and_predict_reads_raw_text(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    vocab = {"space": ["orbit", "rocket", "planet", "nasa", "launch"], "food": ["bread", "cheese", "soup", "oven"],
             "music": ["guitar", "chord", "drum", "song", "tempo"]}
    recs = []
    for i in range(240):
        lab = list(vocab)[i % 3]
        words = list(rng.choice(vocab[lab], 6)) + list(rng.choice(["the", "and", "with", "of"], 4))
        recs.append({"text": " ".join(rng.permutation(words)), "label": lab})
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = tmp_path / "data"
    cli("make-data", "--from", "text", str(src), "--out", str(data), "--hash-bits", "10", check=True)
    # The dense trainer stands in for the CSR reader here: densify, keeping the text attributes.
    dense = tmp_path / "dense"
    dense.mkdir()
    for split in ("train.h5", "valid.h5"):
        s = read_split(data / split)
        X = np.zeros((len(s["y"]), 1024), np.float32)
        X[np.repeat(np.arange(len(s["y"])), np.diff(s["indptr"])), s["indices"]] = s["data"]
        with h5py.File(dense / split, "w") as f:
            f["X"], f["y"] = X, s["y"]
            for k in ("classes", "class_names", "hashing", "text_field"):
                f.attrs[k] = s[k]
    spec = write_spec(tmp_path / "s.yaml", dense, goal={"max_steps": 40})
    proc = cli("run", str(spec), "--job-dir", str(tmp_path / "job"))
    assert proc.returncode == 0, proc.stderr
    new = tmp_path / "new.jsonl"
    new.write_text(json.dumps({"text": "rocket orbit launch planet"}) + "\n" + json.dumps({"text": ""}) + "\n"
                   + json.dumps({"text": "guitar drum song"}) + "\n")
    proc = cli("predict", str(tmp_path / "job" / "model.h5"), str(new), "--out", str(tmp_path / "p.h5"))
    assert proc.returncode == 0, proc.stderr
    assert "1 empty document" in proc.stderr
    from fleetmpi.h5store import read_h5_verified
    arrays, meta = read_h5_verified(tmp_path / "p.h5", kind="predictions")
    assert meta["class_names"] == ["food", "music", "space"]
    assert arrays["proba"].shape == (3, 3)
    np.testing.assert_allclose(arrays["proba"].sum(axis=1), 1.0, rtol=1e-12)
    assert [meta["class_names"][i] for i in arrays["pred"][[0, 2]]] == ["space", "music"]
    proc = cli("predict", str(tmp_path / "job" / "model.h5"), str(tmp_path / "nope.csv"), "--out",
               str(tmp_path / "q.h5"))
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr


def test_folder_listing_is_rglobs_order_without_hidden_entries(tmp_path: Path) -> None:
    root = tmp_path / "src"
    for rel in ("b/2.txt", "b/10.txt", "b/sub/a.txt", "b/Sub/z.txt", "b/.hidden.txt", "b/.git/x.txt",
                "a/x.txt", ".skip/y.txt", "c/deep/er/f.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    (root / "a" / "link.txt").symlink_to(root / "b" / "2.txt")      # a symlinked file counts
    (root / "a" / "linkdir").symlink_to(root / "c" / "deep")          # a symlinked folder is not entered
    want = []
    for c in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        want += [(str(f), c.name, f.stat().st_size) for f in sorted(c.rglob("*"))
                 if f.is_file() and not any(part.startswith(".") for part in f.relative_to(c).parts)]
    got = Source(root)._files()
    assert got == want
    assert [g[1] for g in got] == ["a", "a", "b", "b", "b", "b", "c"]
