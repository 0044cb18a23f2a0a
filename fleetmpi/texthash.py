"""Tokenise, n-gram and hash documents into l2-normalised CSR rows, bit for bit as scikit-learn's HashingVectorizer.

``hash_texts(texts, n_features, ngram_range)`` equals ``HashingVectorizer(n_features,
ngram_range, alternate_sign=True, norm='l2').transform(texts)`` cast to float32, except
that entries whose signed counts cancel to 0 are dropped (scikit-learn keeps explicit 0s).

Tokens are ``(?u)\\b\\w\\w+\\b`` on the lower-cased text: maximal runs of 2+ word characters.
One numba kernel does the work on UTF-8 bytes. A document that is pure ASCII goes in as it
is: there \\w is exactly [A-Za-z0-9_] and lower-casing is A-Z -> a-z, so the kernel's byte
rules are Python's. Any other document goes through Python's own ``re`` on ``str.lower()``
(unicode \\w and case mapping, which can change a string's length, are not redone here)
and enters the kernel as its tokens joined by single spaces: its tokens hold only \\w
characters, which in UTF-8 are [a-z0-9_] bytes or bytes >= 0x80, so the kernel, which
counts those as word bytes, splits it back into the same tokens. Either way the kernel
copies each document's tokens joined by one space into a scratch buffer, where every word
n-gram "w1 w2 ..." is a contiguous slice, and hashes that slice (MurmurHash3 x86_32, seed
0, signed), as scikit-learn hashes the joined n-gram string's UTF-8 bytes.
"""

from __future__ import annotations

import re

import numpy as np
from numba import njit

TOKEN_PATTERN = r"(?u)\b\w\w+\b"
_TOKEN_RE = re.compile(TOKEN_PATTERN)
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_WORD = re.compile(r"\w")


@njit(cache=True, nogil=True)
def _rotl(x: np.uint32, r: int) -> np.uint32:
    return np.uint32((x << np.uint32(r)) | (x >> np.uint32(32 - r)))


@njit(cache=True, nogil=True)
def _murmur(buf: np.ndarray, lo: int, hi: int, seed: int) -> np.int32:
    """Return MurmurHash3 x86_32 of ``buf[lo:hi]`` (uint8) as a signed 32-bit int."""
    c1, c2 = np.uint32(0xCC9E2D51), np.uint32(0x1B873593)
    h = np.uint32(seed)
    n = hi - lo
    nblocks = n // 4
    for i in range(nblocks):
        p = lo + 4 * i
        k = (np.uint32(buf[p]) | (np.uint32(buf[p + 1]) << np.uint32(8)) | (np.uint32(buf[p + 2]) << np.uint32(16))
             | (np.uint32(buf[p + 3]) << np.uint32(24)))
        k = np.uint32(k * c1)
        k = _rotl(k, 15)
        k = np.uint32(k * c2)
        h = np.uint32(h ^ k)
        h = _rotl(h, 13)
        h = np.uint32(h * np.uint32(5) + np.uint32(0xE6546B64))
    tail = lo + 4 * nblocks
    k = np.uint32(0)
    rem = n & 3
    if rem >= 3:
        k = np.uint32(k ^ (np.uint32(buf[tail + 2]) << np.uint32(16)))
    if rem >= 2:
        k = np.uint32(k ^ (np.uint32(buf[tail + 1]) << np.uint32(8)))
    if rem >= 1:
        k = np.uint32(k ^ np.uint32(buf[tail]))
        k = np.uint32(k * c1)
        k = _rotl(k, 15)
        k = np.uint32(k * c2)
        h = np.uint32(h ^ k)
    h = np.uint32(h ^ np.uint32(n))
    h = np.uint32(h ^ (h >> np.uint32(16)))
    h = np.uint32(h * np.uint32(0x85EBCA6B))
    h = np.uint32(h ^ (h >> np.uint32(13)))
    h = np.uint32(h * np.uint32(0xC2B2AE35))
    h = np.uint32(h ^ (h >> np.uint32(16)))
    return np.int32(np.int64(h) - (np.int64(1) << 32) if h >= np.uint32(0x80000000) else np.int64(h))


@njit(cache=True, nogil=True)
def _is_word(b: int) -> bool:
    # ASCII \w, plus every byte of a multibyte UTF-8 sequence (only pre-tokenised documents have those)
    return ((b >= 97 and b <= 122) or (b >= 65 and b <= 90) or (b >= 48 and b <= 57) or b == 95) or b >= 128


@njit(cache=True, nogil=True)
def _radix_sort(a: np.ndarray, tmp: np.ndarray, m: int, bits: int, width: int, count: np.ndarray) -> np.ndarray:
    """Sort a[:m] (ints in [0, 2**bits)) by digits of ``width`` bits, lowest first; return a or tmp, whichever holds them.

    A document's columns are a few thousand ids below 2**26: two or three passes (count,
    prefix sum, stable scatter) cost well under a comparison sort of them.
    """
    src, dst = a, tmp
    radix = 1 << width
    shift = 0
    while shift < bits:
        count[:radix + 1] = 0
        for i in range(m):
            count[((src[i] >> shift) & (radix - 1)) + 1] += 1
        for b in range(radix):
            count[b + 1] += count[b]
        for i in range(m):
            digit = (src[i] >> shift) & (radix - 1)
            dst[count[digit]] = src[i]
            count[digit] += 1
        src, dst = dst, src
        shift += width
    return src


@njit(cache=True, nogil=True)
def _hash_kernel(buf: np.ndarray, offsets: np.ndarray, n_features: int, lo_n: int, hi_n: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (indptr, indices, data) of the documents ``buf[offsets[i]:offsets[i + 1]]``; see the module doc."""
    ndocs = offsets.shape[0] - 1
    maxlen = 0
    for d in range(ndocs):
        maxlen = max(maxlen, offsets[d + 1] - offsets[d])
    words = np.empty(maxlen + 1, np.uint8)       # the document's tokens, lower-cased, joined by one space
    starts = np.empty(maxlen // 2 + 1, np.int64)  # a token has 2+ bytes: at most len/2 of them
    ends = np.empty(maxlen // 2 + 1, np.int64)
    acc = np.zeros(n_features, np.int32)         # signed counts; back to 0 after each document
    touched = np.empty(16, np.int64)
    scratch = np.empty(16, np.int64)
    bits = 1
    while (1 << bits) < n_features:
        bits += 1
    width = -(-bits // -(-bits // 11))       # digits of at most 11 bits, as few passes as that allows
    count = np.zeros((1 << width) + 1, np.int64)
    cap = max(16, buf.shape[0] // 4)
    indices = np.empty(cap, np.int32)
    data = np.empty(cap, np.float32)
    indptr = np.zeros(ndocs + 1, np.int64)
    vals = np.empty(16, np.float64)
    nnz = 0
    wrap = (2147483647 - (n_features - 1)) % n_features
    # a power of two (every --hash-bits): |h| % n is |h| & (n - 1), without a 64-bit division per n-gram
    pow2 = n_features & (n_features - 1) == 0
    for d in range(ndocs):
        ntok, w, i, end = 0, 0, offsets[d], offsets[d + 1]
        while i < end:
            if not _is_word(buf[i]):
                i += 1
                continue
            j = i
            while j < end and _is_word(buf[j]):
                j += 1
            if j - i >= 2:
                if ntok:
                    words[w] = 32
                    w += 1
                starts[ntok] = w
                for p in range(i, j):
                    b = buf[p]
                    words[w] = b + 32 if b >= 65 and b <= 90 else b
                    w += 1
                ends[ntok] = w
                ntok += 1
            i = j
        nt = 0
        for n in range(lo_n, hi_n + 1):
            nt += max(ntok - n + 1, 0)
        if touched.shape[0] < nt:
            touched = np.empty(2 * nt, np.int64)
            scratch = np.empty(2 * nt, np.int64)
        m = 0
        for n in range(lo_n, hi_n + 1):
            for t in range(ntok - n + 1):
                h = np.int64(_murmur(words, starts[t], ends[t + n - 1], 0))
                # scikit-learn maps INT32_MIN by its own rule, since abs() overflows in C
                col = wrap if h == -2147483648 else (abs(h) & (n_features - 1) if pow2 else abs(h) % n_features)
                if acc[col] == 0:   # new, or cancelled earlier (then listed twice: unique below)
                    touched[m] = col
                    m += 1
                acc[col] += 1 if h >= 0 else -1
        cols = _radix_sort(touched, scratch, m, bits, width, count)
        if vals.shape[0] < m:
            vals = np.empty(2 * m, np.float64)
        k, ss, last = 0, 0.0, -1
        for t in range(m):
            c = cols[t]
            if c == last:
                continue
            last = c
            v = np.float64(acc[c])
            acc[c] = 0
            if v != 0.0:
                cols[k] = c
                vals[k] = v
                ss += v * v            # whole numbers: exact in any order, as scikit-learn's sum
                k += 1
        if nnz + k > indices.shape[0]:
            cap = max(2 * indices.shape[0], nnz + k)
            grown_i = np.empty(cap, np.int32)
            grown_d = np.empty(cap, np.float32)
            grown_i[:nnz] = indices[:nnz]
            grown_d[:nnz] = data[:nnz]
            indices, data = grown_i, grown_d
        norm = np.sqrt(ss)
        for t in range(k):
            indices[nnz + t] = cols[t]
            data[nnz + t] = np.float32(vals[t] / norm)   # l2 in float64, one cast, as scikit-learn + astype
        nnz += k
        indptr[d + 1] = nnz
    return indptr, indices[:nnz].copy(), data[:nnz].copy()


def murmurhash3_32(key: str | bytes, seed: int = 0) -> int:
    """Return the signed MurmurHash3 x86_32 of ``key`` (str as UTF-8), as sklearn's murmurhash3_32(positive=False)."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return int(_murmur(np.frombuffer(raw, np.uint8) if raw else np.zeros(0, np.uint8), 0, len(raw), seed))


def tokens(doc: str) -> list[str]:
    """Return the tokens of ``doc`` as scikit-learn's analyzer finds them (lower-cased, 2+ word characters)."""
    return _TOKEN_RE.findall(doc.lower())


def ngrams(doc: str, ngram_range: tuple[int, int]) -> list[str]:
    """Return the word n-grams of ``doc`` in scikit-learn's order (joined by one space); the reference path."""
    toks = tokens(doc)
    lo, hi = ngram_range
    out = list(toks) if lo == 1 else []
    for n in range(max(lo, 2), min(hi, len(toks)) + 1):
        out.extend(" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1))
    return out


def kernel_bytes(doc: str) -> bytes:
    """Return what the kernel reads for ``doc``: the text itself when ASCII, else its tokens joined by spaces.

    A document whose only non-ASCII characters separate words (typographic quotes and
    dashes, no-break spaces: no word character, nor lower-cased to one) has the tokens of
    its ASCII text with those characters as spaces; that goes to the kernel as is, at C
    speed, where Python's tokenising took ~0.1 s for the 900 such man pages of the bench.
    """
    if doc.isascii():
        return doc.encode("ascii")
    odd = set(_NON_ASCII.findall(doc))
    if not any(_WORD.search(c) or _WORD.search(c.lower()) for c in odd):
        return _NON_ASCII.sub(" ", doc).encode("ascii")
    return " ".join(tokens(doc)).encode("utf-8")


def hash_texts(docs: list[str], n_features: int, ngram_range: tuple[int, int]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return CSR (indptr int64, indices int32, data float32) of ``docs`` hashed into ``n_features`` columns."""
    pieces = [kernel_bytes(d) for d in docs]
    offsets = np.zeros(len(pieces) + 1, np.int64)
    np.cumsum([len(p) for p in pieces], out=offsets[1:])
    buf = np.frombuffer(b"".join(pieces), np.uint8) if offsets[-1] else np.zeros(1, np.uint8)
    return _hash_kernel(buf, offsets, n_features, ngram_range[0], ngram_range[1])
