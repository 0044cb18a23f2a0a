"""Reading spec YAML with limits: size, values (aliases counted as what they expand to), depth.

An alias bomb or a deep nesting is refused in milliseconds instead of hanging or
recursing; `--set key.path=value` values go through the same loader.
"""

from __future__ import annotations

import copy
import stat
from pathlib import Path
from typing import Any

import yaml

from fleetmpi.errors import BadInput, one_line, quote

# Limits on a spec as read (file or --set value), checked while the YAML is composed, so an
# alias bomb or a deep nesting is refused in milliseconds instead of hanging or recursing.
# Limits on a spec as read (file or --set value), checked while the YAML is composed, so an
# alias bomb or a deep nesting is refused in milliseconds instead of hanging or recursing.
MAX_SPEC_BYTES = 1 << 20     # a real spec is a few KB; 1 MiB leaves room for long rule lists


MAX_SPEC_NODES = 10_000      # scalars + lists + mappings, every alias counted as what it expands to


MAX_SPEC_DEPTH = 32          # the schema nests 5 deep; 32 leaves room and stays far from Python's recursion limit


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``key.path=value`` applied (value parsed as YAML, with the file's limits)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        shown = quote(item)
        if not sep or not key or any(not part for part in key.split(".")):
            raise BadInput(f"--set {shown}: expected key.path=value, e.g. --set optimizer.lr=0.05")
        if len(key.split(".")) > MAX_SPEC_DEPTH:
            raise BadInput(f"--set {shown}: key path deeper than {MAX_SPEC_DEPTH} levels; the spec nests 5 deep")
        try:
            value = parse_yaml(text.encode("utf-8", "surrogateescape")) if text else ""
        except SpecTooLarge as e:
            raise BadInput(f"--set {shown}: {e}") from None
        except yaml.YAMLError as e:
            raise BadInput(f"--set {shown}: value is not valid YAML ({_yaml_problem(e)})") from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise BadInput(f"--set {shown}: {quote(part, 64)} is not a mapping in the spec")
            node = nxt
        node[parts[-1]] = value
    return out


class SpecTooLarge(ValueError):
    """A YAML text over a size, node-count or depth limit (the message says which and where)."""


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' entries may be overridden on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {quote(key, 64)} (a key may appear once per mapping)",
                    key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _LimitedSafeLoader(_UniqueKeySafeLoader):
    """Loader that counts nodes as composed, each alias as the size of what it repeats, and the depth.

    Aliases compose to shared nodes, so a bomb of 10 levels of 9 aliases is small as a graph
    but 9**10 nodes to every consumer that walks it (schema, repr, deepcopy); counting the
    expanded size while composing refuses it before anything walks it.
    """

    def __init__(self, stream: str | bytes) -> None:
        super().__init__(stream)
        self._nodes = 0
        self._depth = 0
        self._aliases = 0
        self._sizes: dict[int, int] = {}   # id(node) -> its expanded size, once composed

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        mark = event.start_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        is_alias = isinstance(event, yaml.AliasEvent)
        self._depth += 1
        if self._depth > MAX_SPEC_DEPTH:
            raise SpecTooLarge(f"nested deeper than {MAX_SPEC_DEPTH} levels{where}; a spec nests about 5 deep")
        before = self._nodes
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if is_alias:
            self._aliases += 1
            size = self._sizes.get(id(node))
            if size is None:
                raise SpecTooLarge(f"alias *{quote(event.anchor, 64)}{where} refers to a node that contains it; "
                                   "a spec cannot be recursive")
            self._nodes += size
        else:
            self._nodes += 1
            self._sizes[id(node)] = self._nodes - before
        if self._nodes > MAX_SPEC_NODES:
            what = "aliases expand to" if self._aliases else "holds"
            raise SpecTooLarge(f"{what} more than {MAX_SPEC_NODES} values{where}; a spec holds a few hundred")
        return node

    def compose_document(self) -> yaml.Node | None:
        self._sizes.clear()
        return super().compose_document()  # type: ignore[no-any-return]


def parse_yaml(text: bytes) -> Any:
    """Return the YAML document in ``text`` (UTF-8), within the size, node and depth limits.

    Raises SpecTooLarge over a limit, yaml.YAMLError on bad YAML, UnicodeDecodeError on bad UTF-8.
    """
    if len(text) > MAX_SPEC_BYTES:
        raise SpecTooLarge(f"{len(text)} bytes; a spec may have at most {MAX_SPEC_BYTES} bytes (1 MiB)")
    try:
        decoded = text.decode("utf-8")
        return yaml.load(decoded, Loader=_LimitedSafeLoader)
    except ValueError as e:
        if isinstance(e, (SpecTooLarge, UnicodeDecodeError)):
            raise
        # Python refuses int() of more than 4300 digits; YAML reads such a number as an int.
        if "digits" in str(e):
            raise SpecTooLarge("a number has more than 4300 digits; numbers in a spec are small") from None
        raise SpecTooLarge(f"a value cannot be read ({quote(str(e), 120)})") from None


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return one_line(f"{getattr(e, 'problem', None) or e}{where}")[:300]


def read_yaml(path: Path) -> dict[str, Any]:
    """Return the raw mapping in a YAML spec file; BadInput with file and line on any problem."""
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"Is a directory: {str(path)!r}")
        if not stat.S_ISREG(st.st_mode):
            # Reading a FIFO or a device blocks or never ends.
            raise BadInput(f"{path}: not a regular file (a FIFO, socket or device); a spec is a YAML file")
        if st.st_size > MAX_SPEC_BYTES:
            raise BadInput(f"{path}: spec is {st.st_size} bytes; a spec may have at most {MAX_SPEC_BYTES} bytes (1 MiB)")
        with path.open("rb") as fh:
            data = fh.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise BadInput(f"{path}: spec file not found") from None
    except (IsADirectoryError, PermissionError, NotADirectoryError) as e:
        raise BadInput(f"{path}: cannot read spec ({e.__class__.__name__}: {e})") from None
    try:
        raw = parse_yaml(data)
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: cannot read spec ({e.__class__.__name__}: {e})") from None
    except SpecTooLarge as e:
        raise BadInput(f"{path}: spec refused: {e}") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: expected a YAML mapping with keys name, data, model, goal, fleet; got {type(raw).__name__}")
    return raw
