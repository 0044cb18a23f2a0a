"""Parse and evaluate rule conditions like ``"sync_bytes_per_step < 64KiB and epoch >= 3"``.

Grammar (hand-written tokenizer and recursive descent; nothing is ever evaluated as Python)::

    expr       := comparison ('and' comparison)*        # 'and' is case-insensitive
    comparison := METRIC ['[' QUALIFIER ']'] OP NUMBER [UNIT]
    OP         := '<' | '<=' | '>' | '>=' | '==' | '!='

Values are converted to the metric's base unit (bytes, bytes/s, seconds, percent, fraction)
at parse time, so rank 0 compares plain floats against the metrics it collects.
"""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

METRICS: dict[str, str] = {
    "sync_bytes_total": "bytes", "sync_bytes_per_step": "bytes", "wire_bytes_per_step": "bytes",
    "sync_bytes_per_s": "bytes_per_s",
    "epoch": "epochs", "step": "count", "phase_steps": "count", "loss_plateau_steps": "count",
    "samples_per_s": "count", "ranks": "count", "idle_nodes": "count",
    "loss": "loss", "valid_loss": "loss",
    "valid_accuracy": "fraction", "comm_fraction": "fraction",
    "cpu_util": "percent", "mem_util": "percent", "gpu_util": "percent", "gpu_mem_util": "percent",
    "elapsed_s": "seconds", "phase_elapsed_s": "seconds",
}

# Per-partition metrics: ``idle_nodes[cpu]`` is looked up under that exact key.
QUALIFIED_METRICS: frozenset[str] = frozenset({"idle_nodes", "gpu_util", "gpu_mem_util"})

_BYTES: dict[str, float] = {
    "B": 1.0, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
    "KiB": 1024.0, "MiB": 1024.0**2, "GiB": 1024.0**3, "TiB": 1024.0**4,
}
# Multipliers to the base unit of each kind; a bare number always means the base unit.
UNITS: dict[str, dict[str, float]] = {
    "bytes": _BYTES,
    "bytes_per_s": {f"{unit}/s": factor for unit, factor in _BYTES.items()},
    "seconds": {"ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0},
    "percent": {"%": 1.0},
    "fraction": {"%": 0.01},
    "count": {},
    "epochs": {},
    "loss": {},
}
_ALL_UNITS: frozenset[str] = frozenset(u for table in UNITS.values() for u in table)

_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}
_OPS_TEXT = "one of < <= > >= == !="
_TYPOS = {"=": "==", "!": "!=", "=<": "<=", "=>": ">="}
_WORD_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_WORD_CHARS = _WORD_START | frozenset("0123456789")
_QUALIFIER_CHARS = _WORD_CHARS | frozenset("-")
_DIGITS = frozenset("0123456789")


class RuleSyntaxError(ValueError):
    """A rule condition that cannot be parsed; the message is one line naming position and fix."""

    def __init__(self, message: str, text: str, position: int) -> None:
        super().__init__(message)
        self.text = text
        self.position = position


@dataclass(frozen=True)
class Comparison:
    """One ``metric [qualifier] op value`` test; ``value`` is in the metric's base unit."""

    metric: str
    op: str
    value: float
    qualifier: str | None
    text: str

    @property
    def key(self) -> str:
        """Return the metrics-mapping key: the name, plus ``[qualifier]`` when qualified."""
        return self.metric if self.qualifier is None else f"{self.metric}[{self.qualifier}]"

    def holds(self, metrics: Mapping[str, float | None]) -> bool:
        """Return whether the test passes; a missing, None, NaN or non-numeric value gives False."""
        raw = metrics.get(self.key)
        if raw is None:
            return False
        try:
            current = float(raw)
        except (TypeError, ValueError):
            return False
        if math.isnan(current):
            return False
        return _OPS[self.op](current, self.value)


@dataclass(frozen=True)
class Condition:
    """A conjunction of comparisons, as parsed from one ``when:`` string."""

    comparisons: tuple[Comparison, ...]
    text: str

    def holds(self, metrics: Mapping[str, float | None]) -> bool:
        """Return whether every comparison holds against the current metric values."""
        return all(c.holds(metrics) for c in self.comparisons)

    def metrics_used(self) -> set[str]:
        """Return the metrics-mapping keys this condition reads (e.g. ``idle_nodes[cpu]``)."""
        return {c.key for c in self.comparisons}


@dataclass(frozen=True)
class _Token:
    kind: str  # WORD, NUMBER, OP, QUAL, PERCENT, END
    value: str
    pos: int
    end: int


def _show(s: str) -> str:
    """Return ``s`` with control characters escaped so messages stay on one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def _suggest(word: str, options: list[str]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest option, preferring a case-only slip."""
    close = [o for o in options if o.lower() == word.lower()]
    close = close or difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe(tok: _Token) -> str:
    if tok.kind == "END":
        return "end of text"
    if tok.kind == "NUMBER":
        return f"number '{_show(tok.value)}'"
    if tok.kind == "QUAL":
        return f"'[{tok.value}]'"
    return f"'{_show(tok.value)}'"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[_Token] = []
        self.i = 0

    def fail(self, what: str, pos: int, detail: str = "") -> RuleSyntaxError:
        message = f'{what} at {pos} in "{_show(self.text)}"{detail}'
        return RuleSyntaxError(message, self.text, pos)

    # --- tokenizer -------------------------------------------------------------------------
    def tokenize(self) -> None:
        text, i, n = self.text, 0, len(self.text)
        while i < n:
            c = text[i]
            start = i
            if c.isspace():
                i += 1
                continue
            if c in _WORD_START:
                while i < n and text[i] in _WORD_CHARS:
                    i += 1
                if i + 1 < n and text[i] == "/" and text[i + 1] in _WORD_START:  # "MiB/s"
                    i += 1
                    while i < n and text[i] in _WORD_CHARS:
                        i += 1
                self.tokens.append(_Token("WORD", text[start:i], start, i))
            elif c in _DIGITS or (c in ".+-" and self._number_follows(i)):
                i = self._scan_number(i)
                self.tokens.append(_Token("NUMBER", text[start:i], start, i))
            elif c in "<>=!":
                i += 2 if text[i : i + 2] in _OPS else 1
                op = text[start:i]
                if op not in _OPS:
                    bad = text[start : start + 2] if text[start : start + 2] in _TYPOS else op
                    hint = f" (did you mean '{_TYPOS[bad]}'?)" if bad in _TYPOS else ""
                    raise self.fail(f"bad operator '{bad}'{hint}", start, f"; expected {_OPS_TEXT}")
                self.tokens.append(_Token("OP", op, start, i))
            elif c == "[":
                close = text.find("]", i)
                if close < 0:
                    raise self.fail("unclosed '['", start, "; expected ']' after the qualifier")
                body = text[i + 1 : close]
                for j, ch in enumerate(body.strip(), start=i + 1 + len(body) - len(body.lstrip())):
                    if ch not in _QUALIFIER_CHARS:
                        raise self.fail(f"bad character '{_show(ch)}' in qualifier", j,
                                        "; expected letters, digits, '_' or '-'")
                if not body.strip():
                    raise self.fail("empty qualifier '[]'", start, "; expected e.g. '[cpu]'")
                i = close + 1
                self.tokens.append(_Token("QUAL", body.strip(), start, i))
            elif c == "%":
                i += 1
                self.tokens.append(_Token("PERCENT", "%", start, i))
            elif c in "()":
                raise self.fail(f"parentheses are not supported ('{c}')", start,
                                "; write comparisons joined by 'and'")
            elif c in "&|":
                raise self.fail(f"unexpected '{c}'", start,
                                "; join comparisons with the word 'and' ('or' is not supported)")
            else:
                raise self.fail(f"unexpected character '{_show(c)}'", start,
                                "; expected a metric name, operator, number or unit")
        self.tokens.append(_Token("END", "", n, n))

    def _number_follows(self, i: int) -> bool:
        text = self.text
        j = i + 1 if text[i] in "+-" else i
        if text[j : j + 1] in _DIGITS:  # "" is never in _DIGITS, so the end of text is safe
            return True
        return text[j : j + 1] == "." and text[j + 1 : j + 2] in _DIGITS

    def _scan_number(self, i: int) -> int:
        text, n = self.text, len(self.text)
        if text[i] in "+-":
            i += 1
        while i < n and (text[i] in _DIGITS or text[i] in "._"):
            i += 1
        # An exponent only when digits follow, so "3epochs" stays number + word.
        if i < n and text[i] in "eE":
            j = i + 1
            if j < n and text[j] in "+-":
                j += 1
            if j < n and text[j] in _DIGITS:
                i = j
                while i < n and (text[i] in _DIGITS or text[i] == "_"):
                    i += 1
        return i

    # --- parser ----------------------------------------------------------------------------
    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return tok

    def parse(self) -> Condition:
        self.tokenize()
        if self.peek().kind == "END":
            raise self.fail("empty condition", 0, "; expected e.g. 'epoch >= 3'")
        comparisons = [self.comparison()]
        while (tok := self.peek()).kind != "END":
            word = tok.value.lower() if tok.kind == "WORD" else ""
            if word == "or":
                raise self.fail("'or' is not supported", tok.pos,
                                "; only 'and' is supported (use separate rules for 'or')")
            if word != "and":
                raise self.fail(f"unexpected {_describe(tok)}", tok.pos,
                                "; expected 'and' or end of text")
            self.take()
            if self.peek().kind == "END":
                raise self.fail("dangling 'and'", tok.pos, "; expected a comparison after 'and'")
            comparisons.append(self.comparison())
        return Condition(tuple(comparisons), self.text)

    def comparison(self) -> Comparison:
        tok = self.take()
        if tok.kind != "WORD" or tok.value.lower() in ("and", "or"):
            raise self.fail(f"unexpected {_describe(tok)}", tok.pos, "; expected a metric name")
        name = tok.value
        if name not in METRICS:
            raise self.fail(f"unknown metric '{_show(name)}'", tok.pos,
                            f"{_suggest(name, list(METRICS))}; valid: {', '.join(sorted(METRICS))}")
        qualifier = None
        if self.peek().kind == "QUAL":
            qtok = self.take()
            if name not in QUALIFIED_METRICS:
                raise self.fail(f"metric '{name}' takes no qualifier", qtok.pos,
                                f"; only {', '.join(sorted(QUALIFIED_METRICS))} accept '[...]'")
            qualifier = qtok.value
        op = self.take()
        if op.kind != "OP":
            raise self.fail(f"missing operator after '{name}', found {_describe(op)}", op.pos,
                            f"; expected {_OPS_TEXT}")
        num = self.take()
        if num.kind != "NUMBER":
            raise self.fail(f"missing number after '{op.value}', found {_describe(num)}", num.pos,
                            "; expected a number such as 3, 0.5, 1e-3 or 1_000")
        try:
            value = float(num.value)
        except ValueError:
            raise self.fail(f"bad number '{_show(num.value)}'", num.pos,
                            "; expected a number such as 3, 0.5, 1e-3 or 1_000") from None
        end = num.end
        nxt = self.peek()
        if nxt.kind == "PERCENT" or (nxt.kind == "WORD" and nxt.value.lower() not in ("and", "or")
                                     and nxt.value not in METRICS):
            self.take()
            value *= self.unit_factor(name, nxt)
            end = nxt.end
        if not math.isfinite(value):
            raise self.fail(f"number '{num.value}' out of range", num.pos, "; expected finite")
        if METRICS[name] == "fraction" and not 0.0 <= value <= 1.0:
            raise self.fail(f"value {value:g} for fraction metric '{name}' outside [0, 1]", num.pos,
                            f"; write a fraction like 0.5 or a percentage like {value:g}%")
        text = self.text[tok.pos : end]
        return Comparison(metric=name, op=op.value, value=value, qualifier=qualifier, text=text)

    def unit_factor(self, metric: str, tok: _Token) -> float:
        kind = METRICS[metric]
        table = UNITS[kind]
        if tok.value in table:
            return table[tok.value]
        valid = f"valid units: {', '.join(table)}" if table else f"'{metric}' takes a bare number"
        hint = _suggest(tok.value, list(table))
        if tok.value in _ALL_UNITS:
            raise self.fail(f"unit '{tok.value}' not allowed for '{metric}' ({kind})", tok.pos,
                            f"{hint}; {valid}")
        raise self.fail(f"unknown unit '{_show(tok.value)}'", tok.pos, f"{hint}; {valid}")


def parse_condition(text: str) -> Condition:
    """Parse a rule condition into comparisons with values in base units; raise RuleSyntaxError."""
    if not isinstance(text, str):
        raise TypeError(f"rule condition must be a str, got {type(text).__name__}")
    return _Parser(text).parse()


def format_bytes(n: float) -> str:
    """Return a byte count (bytes) in binary units, e.g. ``65536 -> "64.0 KiB"``."""
    if not math.isfinite(n) or abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):  # noqa: B007 - the unit reached is the answer
        n /= 1024.0
        if abs(n) < 1024:
            break
    return f"{n:.1f} {unit}"
