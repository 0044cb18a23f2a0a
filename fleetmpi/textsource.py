"""Text sources of `make-data --from text` and `predict`: a folder of class subfolders, JSONL or CSV.

A folder holds one document per file (scikit-learn's ``load_files`` layout: the subfolder
names the class); a JSONL / CSV file holds a text field and a label field per record.
Documents are decoded as UTF-8, undecodable bytes replaced with U+FFFD (and counted).
Split from ``fleetmpi.text`` (hashing and writing), which re-exports these names.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetmpi.errors import BadInput

__all__ = ["TEXT_SUFFIXES", "Doc", "Source", "read_texts"]
TEXT_SUFFIXES = (".jsonl", ".csv")


@dataclass
class Doc:
    """One document: its text, label (None where the source has none), and where it came from."""

    text: str
    label: str | None
    where: str
    replaced: bool


@dataclass
class Source:
    """A text source: the layout of ``path`` and the fields JSONL / CSV rows use."""

    path: Path
    text_field: str = "text"
    label_field: str | None = "label"
    _listing: list[tuple[str, str, int]] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def layout(self) -> str:
        if self.path.is_dir():
            return "folder"
        suffix = self.path.suffix.lower()
        if suffix in TEXT_SUFFIXES and self.path.is_file():
            return suffix[1:]
        if not self.path.exists():
            raise BadInput(f"{self.path}: no such file or folder; expected a folder of class subfolders, "
                           "a .jsonl or a .csv file")
        raise BadInput(f"{self.path}: expected a folder of class subfolders (one document per file), "
                       f"a .jsonl or a .csv file; got a {suffix or 'suffixless'} file")

    def size_bytes(self) -> int:
        """Return the bytes the source holds (for the progress bar)."""
        if self.layout == "folder":
            return sum(size for _, _, size in self._files())
        return self.path.stat().st_size

    def _files(self) -> list[tuple[str, str, int]]:
        """Return (path, class, bytes) of a folder's documents: classes by name, files by relative path.

        The order of ``sorted(Path(c).rglob("*"))``: paths compare part by part. Hidden
        classes, folders and files are left out; symlinked folders are not entered (as
        rglob), symlinked files count. Listed once per source with os.scandir: pathlib's
        per-file objects cost ~0.1 s on 2,400 files, a tenth of a small corpus's make-data.
        """
        if self._listing is None:
            root = str(self.path)
            with os.scandir(root) as entries:
                classes = sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
            out: list[tuple[str, str, int]] = []
            for c in classes:
                found: list[tuple[tuple[str, ...], str, int]] = []
                stack: list[tuple[str, tuple[str, ...]]] = [(os.path.join(root, c), ())]
                while stack:
                    folder, parts = stack.pop()
                    with os.scandir(folder) as entries:   # closed however the loop ends
                        for e in entries:
                            if e.name.startswith("."):
                                continue
                            if e.is_dir(follow_symlinks=False):
                                stack.append((e.path, (*parts, e.name)))
                            elif e.is_file():
                                found.append(((*parts, e.name), e.path, e.stat().st_size))
                found.sort()
                out += [(path, c, size) for _, path, size in found]
            self._listing = out
        return self._listing

    def docs(self) -> Iterator[tuple[Doc, int]]:
        """Yield (document, bytes read so far) in the source's order."""
        layout = self.layout
        if layout == "folder":
            yield from self._folder()
        elif layout == "jsonl":
            yield from self._jsonl()
        else:
            yield from self._csv()

    def _folder(self) -> Iterator[tuple[Doc, int]]:
        files = self._files()
        if not files:
            raise BadInput(f"{self.path}: no documents; expected one subfolder per class holding one document "
                           "per file (scikit-learn load_files layout)")
        done = 0
        for path, label, _ in files:
            with open(path, "rb") as fh:
                raw = fh.read()
            done += len(raw)
            text, bad = _decode(raw)
            yield Doc(text, label, path, bad), done

    def _jsonl(self) -> Iterator[tuple[Doc, int]]:
        done = 0
        with open(self.path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                done += len(raw)
                line, bad = _decode(raw)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise BadInput(f"{self.path}:{lineno}: not a JSON object ({e.msg}); expected one object per "
                                   f"line with fields {self.text_field!r}"
                                   f"{' and ' + repr(self.label_field) if self.label_field else ''}") from None
                if not isinstance(rec, dict):
                    raise BadInput(f"{self.path}:{lineno}: a JSON {type(rec).__name__}, expected an object with "
                                   f"field {self.text_field!r}")
                yield Doc(self._field(rec, self.text_field, lineno, "--text-field"),
                          None if self.label_field is None else
                          self._field(rec, self.label_field, lineno, "--label-field"),
                          f"{self.path}:{lineno}", bad), done

    def _csv(self) -> Iterator[tuple[Doc, int]]:
        with open(self.path, "rb") as fb:
            lines = _DecodedLines(fb)
            reader = csv.DictReader(lines)
            cols = reader.fieldnames or []
            for name, flag in ((self.text_field, "--text-field"), (self.label_field, "--label-field")):
                if name is not None and name not in cols:
                    raise BadInput(f"{self.path}: no column {name!r} ({flag}); the header has "
                                   f"{', '.join(map(repr, cols)) or 'no columns'}")
            while True:
                try:
                    rec = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise BadInput(f"{self.path}:{reader.line_num}: not valid CSV ({e})") from None
                lineno = reader.line_num
                bad, lines.replaced = lines.replaced, False
                yield Doc(self._field(rec, self.text_field, lineno, "--text-field"),
                          None if self.label_field is None else
                          self._field(rec, self.label_field, lineno, "--label-field"),
                          f"{self.path}:{lineno}", bad), lines.done

    def _field(self, rec: dict[str, Any], name: str, lineno: int, flag: str) -> str:
        value = rec.get(name)
        if value is None or (flag == "--label-field" and value == ""):
            have = ", ".join(repr(k) for k in rec if k is not None)
            raise BadInput(f"{self.path}:{lineno}: no {name!r} field ({flag}); the record has {have or 'no fields'}")
        if isinstance(value, (dict, list)):
            raise BadInput(f"{self.path}:{lineno}: field {name!r} is a JSON {type(value).__name__}; expected a "
                           "string or number")
        return str(value)


class _DecodedLines:
    """Iterate a binary file's lines as str, replacing undecodable bytes and noting it."""

    def __init__(self, fb: Any) -> None:
        self.fb, self.done, self.replaced = fb, 0, False

    def __iter__(self) -> _DecodedLines:
        return self

    def __next__(self) -> str:
        raw = self.fb.readline()
        if not raw:
            raise StopIteration
        self.done += len(raw)
        text, bad = _decode(raw)
        self.replaced |= bad
        return text


def _decode(raw: bytes) -> tuple[str, bool]:
    """Return (``raw`` as UTF-8 with U+FFFD for undecodable bytes, whether any was replaced)."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def read_texts(path: Path, text_field: str = "text") -> Iterator[Doc]:
    """Yield the documents of ``path`` (folder, JSONL or CSV) without requiring labels."""
    src = Source(Path(path), text_field, None)
    for doc, _ in src.docs():
        yield doc
