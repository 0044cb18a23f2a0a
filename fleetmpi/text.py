"""Hash raw text into CSR feature files (scikit-learn HashingVectorizer bit-compatible) and read text sources.

THE FILE FORMAT: an HDF5 file per split (`train.h5`, `valid.h5`) with datasets `indptr`
(int64, n+1), `indices` (int32, nnz, sorted within each row, no duplicates), `data`
(float32, nnz), `y` (float32, n: class ids), `source_index` (int64, n: the document's
position in its source, counting from 0 over every document read, skipped ones included),
and file attributes `format = "csr"`,
`n_features` (int), `classes` (int), `class_names` (JSON list of str), `hashing` (JSON:
{"n_features", "ngram_range", "alternate_sign", "norm", "lowercase", "token_pattern"}).

Rows equal ``HashingVectorizer(n_features=2**b, ngram_range=..., alternate_sign=True,
norm='l2').transform(docs)`` cast to float32, with two stated differences: entries whose
signed counts cancel to 0 are dropped (scikit-learn keeps them as explicit zeros), and the
l2 division is done in float64 before the one cast to float32, as scikit-learn's float64
output cast with ``astype(np.float32)`` does. Further attributes: ``text_field`` (the
field predict reads), ``provenance``, ``skipped_empty`` and ``replaced_utf8`` (counts).

Rows are in a seeded random order (``--seed``): each document draws a key uniformly in
[0, 1) in source order and the file holds the rows sorted by key, so every order is equally
likely, the order does not depend on the chunk size or on the layout, and a folder source
(listed class by class) comes out mixed. See ``_CsrWriter`` for the memory bound.

Sources (``fleetmpi.textsource``, re-exported here): a folder with one subfolder per class
and one document per file (scikit-learn's ``load_files`` layout), or a JSONL / CSV file
with a text field and a label field.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from fleetmpi.errors import BadInput
from fleetmpi.texthash import TOKEN_PATTERN, hash_texts, murmurhash3_32, ngrams
from fleetmpi.textsource import TEXT_SUFFIXES, Doc, Source, read_texts

__all__ = ["TEXT_SUFFIXES", "Doc", "Hashing", "Source", "analyze", "hash_docs", "make_text_data", "murmurhash3_32",
           "read_texts", "text_meta"]
HASH_BITS_MIN, HASH_BITS_MAX = 10, 26
CHUNK_DOCS = 4096                 # documents hashed and appended per step: bounds memory
MAX_NGRAM = 5


@dataclass(frozen=True)
class Hashing:
    """HashingVectorizer settings stored with the data and the model."""

    n_features: int
    ngram_range: tuple[int, int] = (1, 1)
    alternate_sign: bool = True
    norm: str = "l2"
    lowercase: bool = True
    token_pattern: str = TOKEN_PATTERN

    def to_json(self) -> str:
        """Return the settings as the JSON the ``hashing`` attribute holds."""
        return json.dumps({"n_features": self.n_features, "ngram_range": list(self.ngram_range),
                           "alternate_sign": self.alternate_sign, "norm": self.norm,
                           "lowercase": self.lowercase, "token_pattern": self.token_pattern})

    @classmethod
    def from_json(cls, text: Any, where: str) -> Hashing:
        """Return the settings of a ``hashing`` attribute or meta value; BadInput naming ``where``."""
        try:
            d = json.loads(text) if isinstance(text, (str, bytes)) else dict(text)
            h = cls(int(d["n_features"]), (int(d["ngram_range"][0]), int(d["ngram_range"][1])),
                    bool(d["alternate_sign"]), str(d["norm"]), bool(d["lowercase"]), str(d["token_pattern"]))
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise BadInput(f"{where}: hashing settings {str(text)[:80]!r} are incomplete ({e}); expected JSON with "
                           "n_features, ngram_range, alternate_sign, norm, lowercase, token_pattern") from None
        if (h.norm, h.alternate_sign, h.lowercase, h.token_pattern) != ("l2", True, True, TOKEN_PATTERN):
            raise BadInput(f"{where}: hashing settings {h.to_json()} are not supported; this fleetmpi hashes with "
                           f"norm l2, alternate_sign, lowercase and token_pattern {TOKEN_PATTERN}")
        return h


def hashing_for(hash_bits: int, ngrams: str) -> Hashing:
    """Return the settings for ``--hash-bits`` and ``--ngrams MIN,MAX``; BadInput when out of range."""
    if not HASH_BITS_MIN <= hash_bits <= HASH_BITS_MAX:
        raise BadInput(f"--hash-bits {hash_bits}: expected a whole number in [{HASH_BITS_MIN}, {HASH_BITS_MAX}] "
                       f"(2^bits columns; default 18)")
    try:
        lo, hi = (int(p) for p in ngrams.split(","))
    except ValueError:
        raise BadInput(f"--ngrams {ngrams}: expected MIN,MAX word n-gram sizes, e.g. 1,2") from None
    if not 1 <= lo <= hi <= MAX_NGRAM:
        raise BadInput(f"--ngrams {ngrams}: expected 1 <= MIN <= MAX <= {MAX_NGRAM}, e.g. 1,2")
    return Hashing(1 << hash_bits, (lo, hi))


# ---------------------------------------------------------------- hashing

def analyze(doc: str, hashing: Hashing) -> list[str]:
    """Return the word n-grams of ``doc`` in scikit-learn's order (lowercased, joined by one space)."""
    return ngrams(doc, hashing.ngram_range)


def hash_docs(docs: list[str], hashing: Hashing) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return CSR (indptr int64, indices int32, data float32) of ``docs`` hashed into hashing.n_features columns."""
    return hash_texts(docs, hashing.n_features, hashing.ngram_range)


# ---------------------------------------------------------------- writing CSR files

class _Progress:
    """A one-line progress bar on stderr, shown only on a terminal."""

    def __init__(self, label: str, total: int) -> None:
        self.on = sys.stderr.isatty() and os.environ.get("FLEETMPI_PROGRESS", "") != "none"
        self.label, self.total, self.t = label, max(total, 1), 0.0

    def show(self, docs: int, done: int, last: bool = False) -> None:
        if not self.on or (not last and time.monotonic() - self.t < 0.2):
            return
        self.t = time.monotonic()
        frac = min(done / self.total, 1.0)
        bar = "#" * int(30 * frac)
        print(f"\r{self.label} [{bar:<30}] {100 * frac:5.1f}% {docs} docs", end="\n" if last else "",
              file=sys.stderr, flush=True)


@dataclass
class SplitStats:
    """What went into one written split."""

    rows: int = 0
    nnz: int = 0
    skipped_empty: int = 0
    replaced_utf8: int = 0
    first_empty: str = ""
    first_replaced: str = ""


BUCKET_BYTES = 256 << 20   # CSR bytes per shuffle bucket: what closing a split holds in memory at once
SPILL_BYTES = 64 << 20     # staged CSR bytes kept in memory before they go to the bucket files
CSR_PER_SOURCE_BYTE = 2    # CSR bytes per source byte, generously: sizes the buckets before the rows exist


class _CsrWriter:
    """Collect CSR rows, then write them in a seeded random order, contiguous, into ``path``.

    Every row comes with a key drawn uniformly in [0, 1) (per document in source order, so
    independent of chunking); the file holds the rows sorted by key, i.e. in a uniformly
    random order that depends only on the seed and the documents. Two passes bound the
    memory: rows are staged in ``buckets`` by key range (in memory up to SPILL_BYTES, then in
    raw files next to ``path``), and ``close`` sorts one bucket at a time. Per row, nnz,
    label, source position and key stay in memory (32 bytes).
    """

    def __init__(self, path: Path, buckets: int) -> None:
        self.path, self.buckets = path, buckets
        self.mem: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(buckets)]
        self.mem_bytes = 0
        self.files = [(path.with_name(f"{path.name}.stage{b}.indices"), path.with_name(f"{path.name}.stage{b}.data"))
                      for b in range(buckets)]
        for pair in self.files:   # a crashed run with this pid may have left some; spills append
            for f in pair:
                f.unlink(missing_ok=True)
        self.counts: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.where: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.nnz = 0

    def _bucket(self, keys: np.ndarray) -> np.ndarray:
        return np.minimum((keys * self.buckets).astype(np.int64), self.buckets - 1)

    def append(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray,
               labels: np.ndarray, where: np.ndarray, keys: np.ndarray) -> int:
        """Stage ``rows`` of a CSR chunk with their labels, source positions and keys; return their entries."""
        bucket = self._bucket(keys)
        added = 0
        for b in np.unique(bucket).tolist():
            sel = _row_entries(indptr, rows[bucket == b])
            self.mem[b].append((indices[sel], data[sel]))
            added += int(sel.size)
        self.counts.append((indptr[rows + 1] - indptr[rows]).astype(np.int64))
        self.labels.append(labels)
        self.where.append(where)
        self.keys.append(keys)
        self.nnz += added
        self.mem_bytes += 8 * added
        if self.mem_bytes > SPILL_BYTES:
            self._spill()
        return added

    def _spill(self) -> None:
        for b, parts in enumerate(self.mem):
            if parts:
                for f, k in zip(self.files[b], (0, 1)):
                    with open(f, "ab") as fh:
                        for part in parts:
                            part[k].tofile(fh)
                parts.clear()
        self.mem_bytes = 0

    def _load(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Return bucket ``b``'s staged entries in arrival order: the spilled ones first, then those in memory."""
        ix: list[np.ndarray] = []
        dv: list[np.ndarray] = []
        fi, fd = self.files[b]
        if fi.exists():
            ix.append(np.fromfile(fi, np.int32))
            dv.append(np.fromfile(fd, np.float32))
            fi.unlink()
            fd.unlink()
        ix += [p[0] for p in self.mem[b]]
        dv += [p[1] for p in self.mem[b]]
        self.mem[b] = []
        return (np.concatenate(ix) if ix else np.zeros(0, np.int32)), (np.concatenate(dv) if dv else np.zeros(0, np.float32))

    def close(self, remap: np.ndarray, attrs: dict[str, Any]) -> int:
        """Write indices/data contiguous, indptr, y (label ids through ``remap``), source_index and ``attrs``
        in key order; fsync; return the rows."""
        def cat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
            return np.concatenate(parts) if parts else np.zeros(0, dtype)
        counts, labels, where, keys = (cat(self.counts, np.int64), cat(self.labels, np.int64),
                                       cat(self.where, np.int64), cat(self.keys, np.float64))
        bucket = self._bucket(keys)
        arrival = [np.flatnonzero(bucket == b) for b in range(self.buckets)]
        # Rows sorted by key: bucket by bucket (buckets are key ranges), by key within one.
        ranks = [np.argsort(keys[rows], kind="stable") for rows in arrival]
        order = cat([rows[r] for rows, r in zip(arrival, ranks)], np.int64)
        indptr = np.zeros(order.shape[0] + 1, np.int64)
        np.cumsum(counts[order], out=indptr[1:])
        with h5py.File(self.path, "w", locking=False) as out:
            # contiguous (no chunks, no filters), so trainers memory-map them
            dst_i = out.create_dataset("indices", (self.nnz,), np.int32)
            dst_d = out.create_dataset("data", (self.nnz,), np.float32)
            at = 0
            for b, rows in enumerate(arrival):
                ix, dv = self._load(b)
                staged = np.zeros(rows.shape[0] + 1, np.int64)
                np.cumsum(counts[rows], out=staged[1:])
                sel = _row_entries(staged, ranks[b])
                if sel.size:
                    dst_i[at:at + sel.size] = ix[sel]
                    dst_d[at:at + sel.size] = dv[sel]
                at += int(sel.size)
            out.create_dataset("indptr", data=indptr)
            out.create_dataset("y", data=remap[labels[order]].astype(np.float32))
            out.create_dataset("source_index", data=where[order])
            for k, v in attrs.items():
                out.attrs[k] = v
        with open(self.path, "rb+") as fh:
            os.fsync(fh.fileno())
        return int(order.shape[0])

    def abort(self) -> None:
        for pair in self.files:
            for f in pair:
                f.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def _row_entries(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Return the entry positions of ``rows`` (in that order) of a CSR matrix with offsets ``indptr``."""
    lo, hi = indptr[rows], indptr[rows + 1]
    lens = hi - lo
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    # each row's run: lo, lo+1, ..., hi-1, built as one arange shifted per run
    shift = np.repeat(lo - (np.cumsum(lens) - lens), lens)
    return np.arange(total, dtype=np.int64) + shift


def _buckets(source_bytes: int) -> int:
    """Return the shuffle buckets for a source of ``source_bytes``: about BUCKET_BYTES of CSR each."""
    return max(1, -(-CSR_PER_SOURCE_BYTE * source_bytes // BUCKET_BYTES))


def _hash_split(source: Source, hashing: Hashing, writer: _CsrWriter, label_ids: dict[str, int],
                assign: np.random.Generator | None, valid_fraction: float, valid_writer: _CsrWriter | None,
                order: np.random.Generator, chunk_docs: int, grow: bool, progress: _Progress
                ) -> tuple[SplitStats, SplitStats]:
    """Stream ``source`` into ``writer`` (and ``valid_writer`` for a seeded ``valid_fraction``) chunk by chunk."""
    stats, vstats = SplitStats(), SplitStats()
    buf: list[Doc] = []
    seen = done = 0

    def flush() -> None:
        indptr, indices, data = hash_docs([d.text for d in buf], hashing)
        nnz_row = np.diff(indptr)
        ids = np.empty(len(buf), np.int64)
        for i, d in enumerate(buf):
            key = str(d.label)
            if key not in label_ids:
                if not grow:
                    raise BadInput(f"{d.where}: label {key!r} does not occur in the training data "
                                   f"({', '.join(map(repr, label_ids))}); --valid must use the training labels")
                label_ids[key] = len(label_ids)
            ids[i] = label_ids[key]
        # The draws are per document in source order, so neither the split nor the shuffled
        # order depends on the chunk size.
        to_valid = (assign.random(len(buf)) < valid_fraction) if assign is not None else np.zeros(len(buf), bool)
        keys = order.random(len(buf))
        where = np.arange(seen - len(buf), seen, dtype=np.int64)
        for dest, st, mask in ((writer, stats, ~to_valid), (valid_writer, vstats, to_valid)):
            if dest is None:
                continue
            keep = mask & (nnz_row > 0)
            for j in np.flatnonzero(mask & (nnz_row == 0)).tolist():
                st.skipped_empty += 1
                st.first_empty = st.first_empty or buf[j].where
            for j in np.flatnonzero(keep).tolist():
                if buf[j].replaced:
                    st.replaced_utf8 += 1
                    st.first_replaced = st.first_replaced or buf[j].where
            rows = np.flatnonzero(keep)
            st.nnz += dest.append(indptr, indices, data, rows, ids[rows], where[rows], keys[rows])
            st.rows += rows.size
        buf.clear()

    for doc, done in source.docs():
        buf.append(doc)
        seen += 1
        if len(buf) >= chunk_docs:
            flush()
            progress.show(seen, done)
    if buf:
        flush()
    progress.show(seen, done, last=True)
    return stats, vstats


def make_text_data(path: Path, out: Path, text_field: str = "text", label_field: str = "label",
                   valid_fraction: float = 0.2, valid: Path | None = None, ngrams: str = "1,2",
                   hash_bits: int = 18, seed: int = 0, chunk_docs: int = CHUNK_DOCS) -> dict[str, Any]:
    """Hash the labelled documents of ``path`` into ``out/train.h5`` and ``out/valid.h5`` (CSR); return a summary.

    Each split's rows are in the seeded random order of ``_CsrWriter`` (``seed``), with
    ``source_index`` naming each row's document. Both files appear only when both are
    complete (temp names in ``out``, fsync, rename);
    on any refusal nothing is left behind. Warnings (skipped empty documents, replaced
    bytes, classes with one document) are returned under ``warnings``.
    """
    hashing = hashing_for(hash_bits, ngrams)
    if valid is None and not 0.0 <= valid_fraction < 1.0:
        raise BadInput(f"--valid-fraction {valid_fraction}: expected a number in [0, 1)")
    if chunk_docs < 1:
        raise ValueError(f"chunk_docs {chunk_docs}: expected at least 1")
    src = Source(Path(path), text_field, label_field)
    vsrc = Source(Path(valid), text_field, label_field) if valid is not None else None
    src.layout  # noqa: B018 -- refuse an unknown layout before any file is created
    if vsrc is not None:
        vsrc.layout  # noqa: B018
    made = [d for d in (out, *out.parents) if not d.exists()]   # removed again on a refusal
    out.mkdir(parents=True, exist_ok=True)
    tmp = {name: out / f".{name}.tmp.{os.getpid()}" for name in ("train.h5", "valid.h5")}
    writers: list[_CsrWriter] = []
    done = False
    try:
        size = src.size_bytes()
        vsize = vsrc.size_bytes() if vsrc is not None else size
        tw = _CsrWriter(tmp["train.h5"], _buckets(size))
        writers.append(tw)
        split = valid is not None or valid_fraction > 0
        vw = _CsrWriter(tmp["valid.h5"], _buckets(vsize)) if split else None
        if vw is not None:
            writers.append(vw)
        label_ids: dict[str, int] = {}
        assign = np.random.default_rng([seed, 7]) if valid is None and valid_fraction > 0 else None
        tstats, vstats = _hash_split(src, hashing, tw, label_ids, assign, valid_fraction,
                                     vw if valid is None else None, np.random.default_rng([seed, 11]), chunk_docs,
                                     True, _Progress(f"hashing {path}", size))
        if vsrc is not None and vw is not None:
            vstats, _ = _hash_split(vsrc, hashing, vw, label_ids, None, 0.0, None,
                                    np.random.default_rng([seed, 11, 1]), chunk_docs, False,
                                    _Progress(f"hashing {valid}", vsize))
        names = sorted(label_ids)
        if len(names) < 2:
            raise BadInput(f"{path}: found {len(names)} class{'es' if len(names) != 1 else ''} "
                           f"({', '.join(map(repr, names)) or 'none'}); a classifier needs at least 2")
        if tstats.rows == 0:
            raise BadInput(f"{path}: no document with a token of 2+ word characters "
                           f"({tstats.skipped_empty} empty documents skipped)")
        remap = np.empty(len(names), np.int64)
        for new, name in enumerate(names):   # class ids in sorted name order, as load_files numbers folders
            remap[label_ids[name]] = new
        warnings = _warnings(tw, vw, tstats, vstats, remap, names)
        prov = f"text {path} ({src.layout}), hashed {hashing.to_json()}"
        attrs = {"format": "csr", "n_features": hashing.n_features, "classes": len(names),
                 "class_names": json.dumps(names), "hashing": hashing.to_json(), "text_field": text_field,
                 "provenance": prov, "seed": seed}
        summary: dict[str, Any] = {"classes": names, "hashing": json.loads(hashing.to_json()), "files": {},
                                   "warnings": warnings}
        for name, w, st in (("train.h5", tw, tstats), ("valid.h5", vw, vstats)):
            if w is not None:
                w.close(remap, {**attrs, "skipped_empty": st.skipped_empty, "replaced_utf8": st.replaced_utf8})
                summary["files"][str(out / name)] = {"rows": st.rows, "nnz": st.nnz,
                                                     "skipped_empty": st.skipped_empty,
                                                     "replaced_utf8": st.replaced_utf8}
        for name in ("train.h5", "valid.h5"):
            if tmp[name].exists():
                os.replace(tmp[name], out / name)
        if vw is None:
            (out / "valid.h5").unlink(missing_ok=True)   # a stale split from an earlier run would not match
        done = True
        return summary
    except BaseException:
        for w in writers:
            w.abort()
        raise
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
        if not done:
            for d in made:   # innermost first; a folder something else wrote into stays
                try:
                    d.rmdir()
                except OSError:
                    break


def _warnings(tw: _CsrWriter, vw: _CsrWriter | None, tstats: SplitStats, vstats: SplitStats,
              remap: np.ndarray, names: list[str]) -> list[str]:
    """Return one-line warnings on skipped, repaired and lonely documents."""
    out = []
    for split, st in (("train", tstats), ("valid", vstats)):
        if st.skipped_empty:
            out.append(f"{split}: skipped {st.skipped_empty} empty document(s) (no token of 2+ word characters), "
                       f"first {st.first_empty}")
        if st.replaced_utf8:
            out.append(f"{split}: replaced undecodable bytes (not UTF-8) with U+FFFD in {st.replaced_utf8} "
                       f"document(s), first {st.first_replaced}")
    k = len(names)
    tcount = np.bincount(remap[np.concatenate(tw.labels)], minlength=k) if tw.labels else np.zeros(k, np.int64)
    vcount = (np.bincount(remap[np.concatenate(vw.labels)], minlength=k) if vw is not None and vw.labels
              else np.zeros(k, np.int64))
    for c in range(k):
        total = int(tcount[c] + vcount[c])
        if total == 1:
            out.append(f"class {names[c]!r} has a single document (in {'train' if tcount[c] else 'valid'}); "
                       "it cannot be learned and validated; add documents or drop the class")
        elif tcount[c] == 0:
            out.append(f"class {names[c]!r} has no training document ({total} in valid); the model cannot predict it")
    return out


def text_meta(train_path: Path) -> dict[str, Any]:
    """Return the hashing settings, class names and text field of a CSR training file ({} for dense data)."""
    try:
        with h5py.File(train_path, "r") as f:
            if "hashing" not in f.attrs:   # dense data, or CSR that was not hashed from text
                return {}
            return {"hashing": json.loads(f.attrs["hashing"]), "class_names": json.loads(f.attrs["class_names"]),
                    "text_field": str(f.attrs.get("text_field", "text"))}
    except (OSError, KeyError, ValueError):
        return {}
