"""Hostile input through the real CLI: every case ends within its deadline with exit 2 and one line.

Specs (alias bombs in the file and through --set, deep nesting, 2 MB, programmatic mutations
of examples/quickstart.yaml), data files (NaN/inf in X or y of train or valid, huge labels,
a FIFO, a hollow 2**40-row header, wrong dtype, missing or ragged datasets), `predict` on
NaN rows, and `make-data` with a huge --n. A run past its deadline is recorded as a hang.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml
from campaign import Campaign, trials
from conftest import ROOT, cli, write_spec

pytestmark = pytest.mark.faults

DEADLINE_S = 30.0   # a refused input takes about a second (the interpreter's start); 30 s means a hang
QUICKSTART = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())


def attempt(campaign: Campaign, fault: str, *argv: str, env: dict[str, str] | None = None,
            valid_codes: tuple[int, ...] = (2,), expect: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str] | None:
    """Run `fleetmpi ARGV`, record whether it ended in ``valid_codes`` with no traceback and a one-line error."""
    try:
        proc = cli(*argv, timeout=DEADLINE_S, env=env)
    except subprocess.TimeoutExpired:
        campaign.record(fault, ok=False, hang=True)
        pytest.fail(f"{fault}: fleetmpi {' '.join(a[:80] for a in argv)} did not end within {DEADLINE_S} s")
    err = proc.stderr
    ok = (proc.returncode in valid_codes and "Traceback" not in err + proc.stdout
          and (proc.returncode != 2 or len(err.rstrip("\n").split("\n")) == 1)
          and len(err) < 1000 and all(part in err for part in expect))
    campaign.record(fault, ok=ok)
    assert ok, f"{fault}: rc={proc.returncode}\nstderr ({len(err)} chars):\n{err[:3000]}"
    return proc


def quickstart_spec(tmp: Path, spec: dict[str, Any] | None = None, text: str | None = None) -> Path:
    """Write the quickstart spec (data paths absolute) or ``text`` to tmp/spec.yaml."""
    spec = copy.deepcopy(spec if spec is not None else QUICKSTART)
    spec["data"] = {k: str(ROOT / "examples" / v) for k, v in spec["data"].items()} \
        if isinstance(spec.get("data"), dict) and all(isinstance(v, str) for v in spec["data"].values()) \
        else spec.get("data")
    path = tmp / "spec.yaml"
    path.write_text(text if text is not None else yaml.safe_dump(spec, sort_keys=False))
    return path


def alias_bomb(levels: int = 10, width: int = 9, flow: bool = False) -> str:
    items = [("a0", "[lol, lol]")] + [(f"a{i}", "[" + ", ".join([f"*a{i - 1}"] * width) + "]")
                                      for i in range(1, levels + 1)]
    if flow:
        return "{" + ", ".join(f"{k}: &{k} {v}" for k, v in items) + "}"
    return "".join(f"{k}: &{k} {v}\n" for k, v in items)


# --- specs --------------------------------------------------------------------------------------

def test_alias_bomb_in_file(tmp_path: Path, campaign: Campaign) -> None:
    base = quickstart_spec(tmp_path).read_text()
    spec = quickstart_spec(tmp_path, text=base + alias_bomb())
    attempt(campaign, "spec: alias bomb (file)", "run", str(spec), "--job-dir", str(tmp_path / "job"),
            expect=("aliases expand to",))
    assert not (tmp_path / "job").exists()


def test_alias_bomb_through_set(tmp_path: Path, campaign: Campaign) -> None:
    spec = quickstart_spec(tmp_path)
    attempt(campaign, "spec: alias bomb (--set)", "run", str(spec), "--job-dir", str(tmp_path / "job"),
            "--set", f"model.extra={alias_bomb(flow=True)}", expect=("--set", "aliases expand to"))


def test_deep_nesting(tmp_path: Path, campaign: Campaign) -> None:
    base = quickstart_spec(tmp_path).read_text()
    spec = quickstart_spec(tmp_path, text=base + "deep: " + "[" * 3000 + "]" * 3000 + "\n")
    attempt(campaign, "spec: deep nesting", "run", str(spec), "--job-dir", str(tmp_path / "job"),
            expect=("nested deeper",))
    spec = quickstart_spec(tmp_path)
    attempt(campaign, "spec: deep nesting (--set)", "run", str(spec), "--job-dir", str(tmp_path / "job"),
            "--set", "model.x=" + "{a: " * 2000 + "1" + "}" * 2000, expect=("--set", "nested deeper"))


def test_two_megabyte_spec(tmp_path: Path, campaign: Campaign) -> None:
    base = quickstart_spec(tmp_path).read_text()
    spec = quickstart_spec(tmp_path, text=base + f"# {'p' * 2_000_000}\n")
    attempt(campaign, "spec: 2 MB", "run", str(spec), "--job-dir", str(tmp_path / "job"), expect=("1048576",))


def test_huge_value_is_quoted_short(tmp_path: Path, campaign: Campaign) -> None:
    spec = quickstart_spec(tmp_path)
    proc = attempt(campaign, "spec: 100 KB value", "run", str(spec), "--job-dir", str(tmp_path / "job"),
                   "--set", "optimizer.kind=" + "x" * 100_000, expect=("optimizer.kind",))
    assert proc is not None and len(proc.stderr) < 600


def _leaves(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        return [leaf for k, v in node.items() for leaf in _leaves(v, (*path, str(k)))]
    if isinstance(node, list):
        return [leaf for i, v in enumerate(node) for leaf in _leaves(v, (*path, str(i)))]
    return [(path, node)]


def _set(spec: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node: Any = spec
    for part in path[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(path[-1])] = value
    else:
        node[path[-1]] = value


# Each mutation returns (new value, whether the spec is then certainly invalid).
Mutation = Callable[[Any, random.Random], tuple[Any, bool]]
MUTATIONS: dict[str, Mutation] = {
    "wrong type: list": lambda v, r: ([v, v], True),
    "wrong type: mapping": lambda v, r: ({"x": v}, True),
    "wrong type: text": lambda v, r: (("not-a-number", True) if isinstance(v, (int, float)) else (12345, True)),
    "negative": lambda v, r: ((-r.randint(1, 10**6), True) if isinstance(v, (int, float)) else ([], True)),
    "huge number": lambda v, r: (10 ** r.randint(30, 4000), isinstance(v, str)),
    "NaN text": lambda v, r: (r.choice([".nan", ".inf", "-.inf", "NaN", "nan"]), isinstance(v, (int, float))),
    # Every text in the quickstart is a name, a kind or a rule: none may be 10 KB long.
    "huge text": lambda v, r: ("y" * r.randint(10_000, 200_000), True),
    "null": lambda v, r: (None, False),
}


def _mutants(count: int) -> list[tuple[str, tuple[str, ...], str]]:
    rng = random.Random(11)
    leaves = [p for p, _ in _leaves(QUICKSTART) if p[0] != "data"]
    kinds = [*sorted(MUTATIONS), "unknown key"]
    return [(kinds[i % len(kinds)], leaves[rng.randrange(len(leaves))], str(i)) for i in range(count)]


MUTANTS = _mutants(trials(20, 225))


@pytest.mark.parametrize(("kind", "path", "seed"), MUTANTS, ids=[f"{k}@{'.'.join(p)}#{s}" for k, p, s in MUTANTS])
def test_mutated_spec(tmp_path: Path, campaign: Campaign, kind: str, path: tuple[str, ...], seed: str) -> None:
    spec = copy.deepcopy(QUICKSTART)
    rng = random.Random(seed)
    if kind == "unknown key":
        # Every leaf of the quickstart sits in a section with fixed keys: a new key is refused.
        _set(spec, (*path[:-1], f"zz_{rng.randrange(10**6)}"), 1)
        invalid = True
    else:
        original = _leaves(spec)
        value = dict(original)[path]
        new, invalid = MUTATIONS[kind](value, rng)
        if kind == "wrong type: list" and path[-1] == "in":
            invalid = False   # a rule's `in` takes one phase or a list of phases: [p, p] is valid
        _set(spec, path, new)
    home = tmp_path / "home"
    home.mkdir()
    proc = attempt(campaign, f"spec mutation: {kind}", "queue", str(quickstart_spec(tmp_path, spec)),
                   env={"FLEETMPI_HOME": str(home)}, valid_codes=(2,) if invalid else (0, 1, 2, 3, 4))
    assert proc is not None


# --- data ---------------------------------------------------------------------------------------

def _copy_data(tmp: Path, src: Path) -> Path:
    data = tmp / "data"
    shutil.copytree(src, data)
    return data


def _poison(name: str, dset: str, row: int, value: float, col: int | None = 0) -> Callable[[Path], str]:
    def make(data: Path) -> str:
        with h5py.File(data / name, "a") as f:
            arr = f[dset][...]
            if arr.ndim == 2:
                arr[row, col] = value
            else:
                arr[row] = value
            del f[dset]
            f.create_dataset(dset, data=arr)
        return name
    return make


def _rewrite(name: str, **changes: Callable[[np.ndarray], np.ndarray]) -> Callable[[Path], str]:
    def make(data: Path) -> str:
        with h5py.File(data / name, "a") as f:
            for dset, fn in changes.items():
                arr = fn(f[dset][...])
                del f[dset]
                f.create_dataset(dset, data=arr)
        return name
    return make


def _fifo(data: Path) -> str:
    (data / "train.h5").unlink()
    os.mkfifo(data / "train.h5")
    return "train.h5"


def _hollow(data: Path) -> str:
    (data / "train.h5").unlink()
    with h5py.File(data / "train.h5", "w") as f:
        f.create_dataset("X", shape=(2**40, 12), dtype="f4")
        f.create_dataset("y", shape=(2**40,), dtype="f4")
    return "train.h5"


def _drop(name: str, dset: str) -> Callable[[Path], str]:
    def make(data: Path) -> str:
        with h5py.File(data / name, "a") as f:
            del f[dset]
        return name
    return make


DATA_FAULTS: list[tuple[str, str, Callable[[Path], str], tuple[str, ...]]] = [
    ("NaN in X (train)", "multiclass", _poison("train.h5", "X", 17, np.nan, 3), ("dataset X", "row 17", "column 3")),
    ("inf in X (valid)", "multiclass", _poison("valid.h5", "X", 5, np.inf, 0), ("dataset X", "row 5")),
    ("NaN in y (valid)", "multiclass", _poison("valid.h5", "y", 9, np.nan), ("dataset y", "row 9")),
    ("NaN in y (train, regression)", "regression", _poison("train.h5", "y", 2, np.nan), ("dataset y", "row 2")),
    ("-inf in X (valid, regression)", "regression", _poison("valid.h5", "X", 1, -np.inf, 11),
     ("dataset X", "row 1", "column 11")),
    ("label 2**40", "multiclass", _poison("train.h5", "y", 4, 2.0**40), ("y", "1099511627776")),
    ("FIFO named .h5", "multiclass", _fifo, ("not a regular file",)),
    ("2**40 declared rows", "multiclass", _hollow, ("dataset X", "1099511627776")),
    ("X float64", "multiclass", _rewrite("train.h5", X=lambda a: a.astype(np.float64)), ("X", "float32")),
    ("y missing", "multiclass", _drop("valid.h5", "y"), ("'y'",)),
    ("ragged y", "multiclass", _rewrite("train.h5", y=lambda a: a[:-3]), ("y", "shape")),
]


def _data_trials() -> list[tuple[str, str, Callable[[Path], str], tuple[str, ...]]]:
    n = trials(len(DATA_FAULTS), 45)
    return [DATA_FAULTS[i % len(DATA_FAULTS)] for i in range(n)]


DATA_TRIALS = _data_trials()


@pytest.mark.parametrize(("fault", "task", "make", "expect"), DATA_TRIALS,
                         ids=[f"{f}#{i}" for i, (f, *_) in enumerate(DATA_TRIALS)])
def test_bad_data(tmp_path: Path, campaign: Campaign, datasets: dict[str, Path], fault: str, task: str,
                  make: Callable[[Path], str], expect: tuple[str, ...]) -> None:
    data = _copy_data(tmp_path, datasets[task])
    name = make(data)
    model = {"kind": "softmax" if task == "multiclass" else "linear", "l2": 1e-4}
    spec = write_spec(tmp_path / "spec.yaml", data, model=model)
    attempt(campaign, f"data: {fault}", "run", str(spec), "--job-dir", str(tmp_path / "job"),
            expect=(name, *expect))
    assert not (tmp_path / "job").exists()


def test_predict_refuses_nan_rows(tmp_path: Path, campaign: Campaign, datasets: dict[str, Path]) -> None:
    data = _copy_data(tmp_path, datasets["multiclass"])
    spec = write_spec(tmp_path / "spec.yaml", data, goal={"max_steps": 4})
    cli("run", str(spec), "--job-dir", str(tmp_path / "job"), check=True)
    _poison("valid.h5", "X", 33, np.nan, 2)(data)
    attempt(campaign, "predict: NaN row", "predict", str(tmp_path / "job" / "model.h5"), str(data / "valid.h5"),
            "--out", str(tmp_path / "pred.h5"), expect=("valid.h5", "dataset X", "row 33", "column 2"))
    assert not (tmp_path / "pred.h5").exists()


def test_make_data_huge_n(tmp_path: Path, campaign: Campaign) -> None:
    attempt(campaign, "make-data: huge --n", "make-data", "--n", "99999999999999", "--out", str(tmp_path / "made"),
            expect=("--n 99999999999999", "memory"))
    assert not (tmp_path / "made").exists()
