"""Build frozen dataclasses from plain YAML data, with one-line errors naming the key path.

The dataclass definitions are the schema: valid keys, types and defaults come from the
fields, constraints from ``field(metadata={"check": fn})``. Errors raise
:class:`SchemaError` with the dotted key path so the caller can prefix the file name.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeVar, get_args, get_origin

from fleetmpi.errors import quote

T = TypeVar("T")


class SchemaError(ValueError):
    """One invalid value: ``path`` is the dotted key path, ``message`` what was expected."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path or '<top>'}: {message}")


def check(fn: Callable[[Any], str | None], default: Any = dataclasses.MISSING) -> Any:
    """Declare a dataclass field whose value must pass ``fn`` (returns an error text or None)."""
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata={"check": fn})
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed; use a tuple or None")
    return dataclasses.field(default=default, metadata={"check": fn})


def positive(v: Any) -> str | None:
    return None if v > 0 else f"expected a number > 0, got {quote(v)}"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"expected a number >= 0, got {quote(v)}"


def positive_at_most(hi: float) -> Callable[[Any], str | None]:
    """Accept numbers in (0, hi]: a positive count or size with a sane upper bound."""
    def _check(v: Any) -> str | None:
        return None if 0 < v <= hi else f"expected a number > 0 and <= {hi:g}, got {quote(v)}"
    return _check


def in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    def _check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"expected a number in [{lo}, {hi}], got {quote(v)}"
    return _check


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def identifier(v: Any) -> str | None:
    """Accept names safe as file names and Slurm job names: letters, digits, '_', '.', '-'."""
    if _NAME_RE.match(v):
        return None
    return f"expected 1-64 characters of letters, digits, '_', '.', '-' (not starting with '.', '_' or '-'), got {quote(v)}"


# sbatch flags fleetmpi's renderer sets itself (fleetmpi.launch.slurm.script.SBATCH_OPTIONS;
# tests/unit/test_slurm_units.py checks the two agree) and flags it relies on: a spec's
# scheduler.extra_sbatch may use neither. They live here so the spec validates without the launcher.
SBATCH_MANAGED_FLAGS = frozenset({"account", "comment", "cpus-per-task", "gres", "job-name", "mem", "nodes",
                                  "ntasks-per-node", "open-mode", "output", "partition", "qos", "requeue",
                                  "signal", "time"})
SBATCH_RESERVED_FLAGS = frozenset({"hold", "parsable", "wrap", "chdir", "ntasks", "test-only", "wait", "no-requeue",
                                   "gpus", "gpus-per-node", "gpus-per-task", "array", "export-file"})
_SBATCH_EXTRA_RE = re.compile(r"^--([a-z][a-z0-9-]*)(=[A-Za-z0-9_.,:/@%+=\[\]-]+)?$")


def sbatch_extra_option(v: Any) -> str | None:
    """Return why ``v`` cannot be an extra '#SBATCH' option (scheduler.extra_sbatch), or None."""
    m = _SBATCH_EXTRA_RE.match(v) if isinstance(v, str) else None
    if not m:
        return ("expected one long option without spaces or quotes, e.g. '--constraint=ib' or "
                f"'--exclusive', got {v!r}")
    flag = m.group(1)
    if flag in SBATCH_MANAGED_FLAGS or flag in SBATCH_RESERVED_FLAGS:
        return (f"{v!r} sets --{flag}, which fleetmpi sets itself (from the phase or the scheduler section); "
                f"extra_sbatch may not use: {', '.join(sorted(SBATCH_MANAGED_FLAGS | SBATCH_RESERVED_FLAGS))}")
    return None


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin in (dict, collections.abc.Mapping):
        return f"a mapping of names to {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _convert(tp: Any, raw: Any, path: str, hints_of: Callable[[type], dict[str, Any]]) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return raw
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if raw is None and type(None) in options:
            return None
        errors = []
        for opt in options:
            if opt is type(None):
                continue
            try:
                return _convert(opt, raw, path, hints_of)
            except SchemaError as e:
                errors.append(e)
        # A nested error deeper than this path is more useful than "expected X or Y".
        deeper = [e for e in errors if e.path != path]
        if deeper:
            raise deeper[0]
        raise SchemaError(path, f"expected {_type_name(tp)}, got {quote(raw)}")
    if origin is Literal:
        if raw in get_args(tp) and type(raw) in {type(a) for a in get_args(tp)}:
            return raw
        raise SchemaError(path, f"expected one of {_type_name(tp)}, got {quote(raw)}")
    if origin is tuple:
        (item,) = get_args(tp)[:1]
        if not isinstance(raw, list):
            raise SchemaError(path, f"expected {_type_name(tp)}, got {quote(raw)}")
        return tuple(_convert(item, v, f"{path}[{i}]", hints_of) for i, v in enumerate(raw))
    if origin in (dict, collections.abc.Mapping):
        _, val_tp = get_args(tp)
        if not isinstance(raw, dict):
            raise SchemaError(path, f"expected {_type_name(tp)}, got {quote(raw)}")
        out = {}
        for k, v in raw.items():
            if not isinstance(k, str):
                raise SchemaError(path, f"expected string keys, got {quote(k)}")
            err = identifier(k)
            if err:
                raise SchemaError(f"{path}.{_key(k)}", f"bad name: {err}")
            out[k] = _convert(val_tp, v, f"{path}.{k}", hints_of)
        return types.MappingProxyType(out)
    if dataclasses.is_dataclass(tp):
        return build(tp, raw, path, hints_of)  # type: ignore[arg-type]
    if tp is bool:
        if isinstance(raw, bool):
            return raw
    elif tp is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
    elif tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            if raw != raw or raw in (float("inf"), float("-inf")) or (isinstance(raw, int) and abs(raw) > 1e308):
                raise SchemaError(path, f"expected a finite number, got {quote(raw)}")
            return float(raw)
        if isinstance(raw, str):
            # YAML 1.1 reads "1e-4" as a string; accept plain float literals written that way.
            try:
                val = float(raw)
            except ValueError:
                pass
            else:
                if val == val and abs(val) != float("inf"):
                    return val
    elif tp is str:
        if isinstance(raw, str):
            if "\n" in raw or "\x00" in raw:
                raise SchemaError(path, "expected a single-line string without NUL bytes")
            return raw
    raise SchemaError(path, f"expected {_type_name(tp)}, got {quote(raw)}")


def _key(key: Any) -> str:
    """Return a mapping key as it appears in a key path, cut so that a huge unknown key stays readable."""
    text = str(key)
    return text if len(text) <= 64 else quote(text, 64)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def build(cls: type[T], raw: Any, path: str = "",
          hints_of: Callable[[type], dict[str, Any]] = _hints) -> T:
    """Return ``cls`` built from the mapping ``raw``; raise SchemaError naming the bad key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        keys = ", ".join(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
        raise SchemaError(path, f"expected a mapping with keys {keys}; got {quote(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    aliases = getattr(cls, "_aliases", {})
    hints = hints_of(cls)
    values: dict[str, Any] = {}
    for key, val in raw.items():
        name = aliases.get(key, key)
        sub = f"{path}.{_key(key)}" if path else _key(key)
        if name not in fields or name.startswith("_"):
            valid = sorted(set(k for k in fields if not k.startswith("_")) - set(aliases.values()) | set(aliases))
            raise SchemaError(sub, f"unknown key; valid keys: {', '.join(valid)}")
        v = _convert(hints[name], val, sub, hints_of)
        chk = fields[name].metadata.get("check")
        if chk is not None and v is not None:
            err = chk(v)
            if err:
                raise SchemaError(sub, err)
        values[name] = v
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if name.startswith("_"):
                continue
            sub = f"{path}.{name}" if path else name
            raise SchemaError(sub, f"missing required key ({_type_name(hints[name])})")
    obj = cls(**values)
    post = getattr(obj, "validate", None)
    if post is not None:
        err = post()
        if err:
            key, msg = err
            raise SchemaError(f"{path}.{key}" if path else key, msg)
    return obj


def to_plain(obj: Any) -> Any:
    """Return JSON-able plain data (dicts, lists, scalars) for a built object."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    return obj
