"""Enforce what may import what, reading every module's imports with ``ast``.

Both top-level and function-level imports count (a deferred import is still a dependency).
Imports under ``if TYPE_CHECKING:`` count for the layering rules but not for cycles: they
never run, so they cannot make import order matter (a technique may name its run's type).
Each rule names the importing modules, the modules they may not import, and why:

==================================  ==========================================  =====================================
importer                            may not import                              why
==================================  ==========================================  =====================================
kernels/                            anything of fleetmpi                        kernels are numeric code, testable alone
foundation: errors, spec, schema,   fleetmpi.engine, launch, jobs, cli,         everything builds on them
jobdir, h5store, rules              models, optim, sync
fleetmpi/engine/                    fleetmpi.jobs, fleetmpi.cli                 ranks never see the ledger or the CLI
fleetmpi/engine/monitor.py          fleetmpi.launch                             the worker hands it a callable
fleetmpi/models/                    fleetmpi.engine                             the engine hands placement in
fleetmpi/launch/                    fleetmpi.jobs, fleetmpi.cli                 launchers serve the jobs wing and CLI
fleetmpi/jobs/                      fleetmpi.cli                                the CLI sits on top of the jobs wing
fleetmpi/api.py                     private names (``_x``) of fleetmpi.cli      the API must not depend on CLI guts
any module                          a module that imports it back (a cycle)     cycles make import order matter
==================================  ==========================================  =====================================

docs/architecture.md states the same table.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOUNDATION = ("errors", "spec", "spec_checks", "spec_fleet", "spec_yaml", "schema", "jobdir", "h5store", "rules")
WINGS = ("engine", "launch", "jobs", "cli", "models", "optim", "sync")


@dataclass(frozen=True)
class Import:
    """One imported module (and name, for ``from M import name``) at a line of a file."""

    importer: str       # dotted module name of the file
    target: str         # dotted module imported (for `from pkg import sub`, pkg.sub when sub is a module)
    name: str | None    # the name imported by `from M import name`
    path: Path
    line: int
    typing_only: bool = False   # under `if TYPE_CHECKING:`: never executed


def _typing_only_nodes(tree: ast.AST) -> set[int]:
    """Return the ids of import nodes inside ``if TYPE_CHECKING:`` blocks."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                found |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.Import | ast.ImportFrom)}
    return found


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for top in ("fleetmpi", "kernels") for p in sorted((ROOT / top).rglob("*.py"))}


def _imports(modules: dict[str, Path]) -> list[Import]:
    out = []
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = _typing_only_nodes(tree)
        for node in ast.walk(tree):
            t = id(node) in typing_only
            if isinstance(node, ast.Import):
                out += [Import(mod, a.name, None, path, node.lineno, t) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, *([base] if base else [])])
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.append(Import(mod, sub if sub in modules else base, a.name, path, node.lineno, t))
    return out


MODULES = _sources()
IMPORTS = _imports(MODULES)


def _under(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _where(i: Import) -> str:
    return f"{i.path.relative_to(ROOT)}:{i.line}: {i.importer} imports {i.target}" + \
        (f" ({i.name})" if i.name else "")


# (rule, importer matches, target matches)
RULES = [
    ("kernels/ imports nothing of fleetmpi",
     lambda m: _under(m, "kernels"), lambda i: _under(i.target, "fleetmpi")),
    ("foundation modules import no wing",
     lambda m: m in {f"fleetmpi.{f}" for f in FOUNDATION},
     lambda i: _under(i.target, *(f"fleetmpi.{w}" for w in WINGS))),
    ("engine/ imports neither jobs/ nor cli/",
     lambda m: _under(m, "fleetmpi.engine"), lambda i: _under(i.target, "fleetmpi.jobs", "fleetmpi.cli")),
    ("engine/monitor.py does not import launch/ (the worker hands it a callable)",
     lambda m: m == "fleetmpi.engine.monitor", lambda i: _under(i.target, "fleetmpi.launch")),
    ("models/ does not import engine/ (the engine hands placement in)",
     lambda m: _under(m, "fleetmpi.models"), lambda i: _under(i.target, "fleetmpi.engine")),
    ("launch/ imports neither jobs/ nor cli/",
     lambda m: _under(m, "fleetmpi.launch"), lambda i: _under(i.target, "fleetmpi.jobs", "fleetmpi.cli")),
    ("jobs/ does not import cli/",
     lambda m: _under(m, "fleetmpi.jobs"), lambda i: _under(i.target, "fleetmpi.cli")),
    ("api.py imports no private name of cli/",
     lambda m: m == "fleetmpi.api",
     lambda i: _under(i.target, "fleetmpi.cli") and (
         (i.name or "").startswith("_") or any(p.startswith("_") for p in i.target.split(".")))),
]


def test_every_module_is_read() -> None:
    # A walk that found nothing would pass every rule.
    assert {"fleetmpi.cli", "fleetmpi.engine.monitor", "kernels.cpu", "fleetmpi.spec"} <= set(MODULES)
    assert any(i.importer == "fleetmpi.api" and i.target.startswith("fleetmpi.jobs") for i in IMPORTS)


def test_every_spec_module_is_foundation() -> None:
    # The spec is split over fleetmpi/spec*.py; a part left out of FOUNDATION would escape its rule.
    parts = {m.removeprefix("fleetmpi.") for m in MODULES if m.startswith("fleetmpi.spec")}
    assert {"spec", "spec_fleet"} <= parts
    assert parts <= set(FOUNDATION), f"spec modules missing from FOUNDATION: {sorted(parts - set(FOUNDATION))}"


@pytest.mark.parametrize("rule", [r[0] for r in RULES])
def test_import_rule(rule: str) -> None:
    _, importer, forbidden = next(r for r in RULES if r[0] == rule)
    bad = [_where(i) for i in IMPORTS if importer(i.importer) and forbidden(i)]
    assert not bad, f"{rule}:\n  " + "\n  ".join(bad)


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for i in IMPORTS:
        # A submodule importing its own package counts: with the package importing the
        # submodule back, which runs first would decide what exists.
        if i.target in MODULES and i.target != i.importer and not i.typing_only:
            graph[i.importer].add(i.target)
    return graph


def test_components_finds_a_cycle() -> None:
    # The detector itself: a -> b -> c -> a is one component, d alone is none.
    assert _components({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    graph = _graph()
    lines = []
    for comp in _components(graph):
        members = set(comp)
        edges = [_where(i) for i in IMPORTS if i.importer in members and i.target in members
                 and i.target in graph[i.importer] and not i.typing_only]
        lines.append(" <-> ".join(comp) + "\n    " + "\n    ".join(edges))
    assert not lines, "import cycles:\n  " + "\n  ".join(lines)
