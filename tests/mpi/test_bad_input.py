"""Bad input through the real `fleetmpi` command: exit 2, one line, no traceback, nothing damaged.

Every case builds its inputs in its own ``tmp_path`` (a copy of small synthetic data, a
valid spec, and one thing made wrong), runs ``python -m fleetmpi.cli`` there as a
subprocess, and checks DESIGN.md's rule for bad input: exit code 2; stdout empty and
stderr exactly one line ``fleetmpi: error: ...`` that names the offending file, key path
or argument; no traceback; every file in ``tmp_path`` byte-identical afterwards and
nothing new (no job dir, no --out file) except where a case says which files a refused
run may append to.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import yaml

TIMEOUT_S = 120
ROWS, FEATURES, CLASSES = 400, 8, 3  # make-data keeps 320 rows for train.h5, 80 for valid.h5
TRAIN_ROWS = 320

BASE_SPEC: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "data": {"train": "data/train.h5", "valid": "data/valid.h5"},
    "model": {"kind": "softmax", "l2": 1.0e-4},
    "optimizer": {"kind": "sgd", "lr": 0.3, "momentum": 0.9, "batch": 32},
    "goal": {"max_steps": 6},
    "checkpoint": {"every_steps": 2, "keep": 3},
    "monitor": {"log_every_steps": 1, "eval_every_steps": 2, "progress": "none"},
    "fleet": {
        "start": "small",
        "phases": {"small": {"nodes": 1, "ranks_per_node": 1}, "wide": {"nodes": 1, "ranks_per_node": 2}},
        # 6 steps of 32 rows never reach epoch 3, so a run of this spec stays on 1 rank.
        "rules": [{"in": "small", "when": "epoch >= 3", "then": {"goto": "wide"}}],
    },
}


def _env() -> dict[str, str]:
    """Return this environment without FLEETMPI_* settings (no --debug, default mpiexec), but the test
    ledger home and the oversubscription the suite allows (tests/conftest.py)."""
    keep = ("FLEETMPI_HOME", "FLEETMPI_OVERSUBSCRIBE")
    return {k: v for k, v in os.environ.items() if not k.startswith("FLEETMPI_") or k in keep}


def fleetmpi(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the real `fleetmpi` command in ``cwd`` and return the finished process."""
    return subprocess.run([sys.executable, "-m", "fleetmpi.cli", *argv], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def snapshot(root: Path) -> dict[str, str]:
    """Return {relative path: sha256 of a file's bytes, or 'dir'} for everything under ``root``."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def write_spec(path: Path, spec: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def write_h5(path: Path, attrs: dict[str, Any] | None = None, **datasets: np.ndarray) -> None:
    """Write a plain HDF5 file holding ``datasets`` (a data file, well- or ill-formed)."""
    with h5py.File(path, "w") as f:
        for name, value in datasets.items():
            f.create_dataset(name, data=value)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value


def rand_x(n: int = 50, d: int = FEATURES, dtype: Any = np.float32) -> np.ndarray:
    return np.random.default_rng(n * 31 + d).standard_normal((n, d)).astype(dtype)


def labels(n: int = 50, k: int = CLASSES) -> np.ndarray:
    return (np.arange(n) % k).astype(np.float32)


# --- shared inputs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """Inputs made once per session: data written by make-data and a finished real job."""

    data: Path   # train.h5, valid.h5
    job: Path    # a completed 1-rank job: spec.yaml, state.json, ckpt/step-*.h5, model.h5

    @property
    def checkpoint(self) -> Path:
        return self.job / "ckpt" / "step-00000004.h5"


@pytest.fixture(scope="session")
def source(tmp_path_factory: pytest.TempPathFactory) -> Source:
    root = tmp_path_factory.mktemp("source")
    made = fleetmpi(root, "make-data", "--task", "multiclass", "--n", str(ROWS), "--d", str(FEATURES),
                    "--classes", str(CLASSES), "--out", "data")
    assert made.returncode == 0, made.stderr
    write_spec(root / "spec.yaml", BASE_SPEC)
    ran = fleetmpi(root, "run", "spec.yaml", "--job-dir", "job")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    src = Source(data=root / "data", job=root / "job")
    assert src.checkpoint.is_file() and (src.job / "model.h5").is_file(), sorted(snapshot(src.job))
    return src


def prepare(tmp: Path, src: Source) -> None:
    """Give ``tmp`` a copy of the data and the valid base spec (relative data paths)."""
    shutil.copytree(src.data, tmp / "data")
    write_spec(tmp / "spec.yaml", BASE_SPEC)


def copy_job(tmp: Path, src: Source, name: str = "job") -> Path:
    return Path(shutil.copytree(src.job, tmp / name))


# --- the check every case makes --------------------------------------------------------------

def assert_refused(tmp: Path, argv: list[str], expect: tuple[str, ...], may_change: tuple[str, ...] = (),
                   absent: tuple[str, ...] = ()) -> str:
    """Run `fleetmpi ARGV` in ``tmp``; assert exit 2, one error line holding ``expect``, no damage.

    ``may_change`` holds glob patterns (relative to ``tmp``) of files the refused command
    may append to or create; everything else must stay as it was. Returns the error line.
    """
    before = snapshot(tmp)
    proc = fleetmpi(tmp, *argv)
    shown = f"fleetmpi {' '.join(argv)}\nrc={proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert proc.returncode == 2, shown
    assert proc.stdout == "", shown
    lines = proc.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].strip(), shown
    line = lines[0]
    assert line.startswith("fleetmpi: error:"), shown
    for part in expect:
        assert part in line, f"{part!r} not in the error line\n{shown}"

    after = snapshot(tmp)

    def allowed(rel: str) -> bool:
        return any(fnmatch.fnmatchcase(rel, pat) for pat in may_change)

    changed = sorted(rel for rel in before.keys() & after.keys() if before[rel] != after[rel] and not allowed(rel))
    removed = sorted(before.keys() - after.keys())
    created = sorted(rel for rel in after.keys() - before.keys() if not allowed(rel))
    assert not (changed or removed or created), f"changed {changed}, removed {removed}, created {created}\n{shown}"
    for rel in absent:
        assert not (tmp / rel).exists(), f"{rel} was created\n{shown}"
    return line


# --- the cases -------------------------------------------------------------------------------

Setup = Callable[[Path, Source], list[str]]


@dataclass(frozen=True)
class Case:
    id: str
    setup: Setup                       # builds the inputs in tmp_path, returns the CLI arguments
    expect: tuple[str, ...]            # substrings the error line must hold
    absent: tuple[str, ...] = ()       # paths that must not exist afterwards
    may_change: tuple[str, ...] = ()   # glob patterns of files the command may append to or create


RUN = ["run", "spec.yaml", "--job-dir", "job"]
RUN_ABSENT = ("job", "runs")


def _walk(spec: dict[str, Any], dotted: str) -> tuple[Any, Any]:
    """Return (container, last key) of a dotted key path; digits index lists."""
    parts: list[Any] = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    node = spec
    for part in parts[:-1]:
        node = node[part]
    return node, parts[-1]


def put(**changes: Any) -> Callable[[dict[str, Any]], None]:
    """Return an edit that sets key paths (``optimizer__lr`` means ``optimizer.lr``)."""
    def edit(spec: dict[str, Any]) -> None:
        for key, value in changes.items():
            node, last = _walk(spec, key.replace("__", "."))
            node[last] = value
    return edit


def drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(spec: dict[str, Any]) -> None:
        for key in keys:
            node, last = _walk(spec, key)
            del node[last]
    return edit


def spec_case(case_id: str, edit: Callable[[dict[str, Any]], None], *expect: str) -> Case:
    """A `run` of the base spec with one thing edited; the line must name spec.yaml and ``expect``."""
    def setup(tmp: Path, src: Source) -> list[str]:
        spec = copy.deepcopy(BASE_SPEC)
        edit(spec)
        write_spec(tmp / "spec.yaml", spec)
        return RUN
    return Case(case_id, setup, ("spec.yaml", *expect), RUN_ABSENT)


def raw_spec_case(case_id: str, content: bytes, *expect: str) -> Case:
    def setup(tmp: Path, src: Source) -> list[str]:
        (tmp / "spec.yaml").write_bytes(content)
        return RUN
    return Case(case_id, setup, ("spec.yaml", *expect), RUN_ABSENT)


def data_case(case_id: str, make: Callable[[Path], str] | None, edit: Callable[[dict[str, Any]], None] | None,
              *expect: str) -> Case:
    """A `run` whose data is wrong: ``make`` writes a file under data/ and returns the key it goes in."""
    def setup(tmp: Path, src: Source) -> list[str]:
        spec = copy.deepcopy(BASE_SPEC)
        if make is not None:
            key, _, rel = make(tmp / "data").partition("=")
            spec["data"][key] = rel
        if edit is not None:
            edit(spec)
        write_spec(tmp / "spec.yaml", spec)
        return RUN
    return Case(case_id, setup, expect, RUN_ABSENT)


def _text_file(name: str, key: str = "train") -> Callable[[Path], str]:
    def make(data: Path) -> str:
        (data / name).write_text("X,y\n0.1,1\n0.2,0\n")
        return f"{key}=data/{name}"
    return make


def _h5_file(name: str, key: str = "train", attrs: dict[str, Any] | None = None,
             **datasets: Callable[[], np.ndarray]) -> Callable[[Path], str]:
    def make(data: Path) -> str:
        write_h5(data / name, attrs, **{k: fn() for k, fn in datasets.items()})
        return f"{key}=data/{name}"
    return make


def _dir_as_file(name: str) -> Callable[[Path], str]:
    def make(data: Path) -> str:
        (data / name).mkdir()
        return f"train=data/{name}"
    return make


def _nan_labels() -> np.ndarray:
    y = labels(60)
    y[7] = np.nan
    return y


SPEC_CASES = [
    spec_case("spec-unknown-top-key", put(colour="blue"), "colour", "unknown key", "valid keys:", "optimizer"),
    spec_case("spec-unknown-nested-key", put(optimizer__lrr=0.1), "optimizer.lrr",
              "valid keys: batch, bfgs, kind, lbfgs, lr, momentum, schedule"),
    spec_case("spec-wrong-type-batch", put(optimizer__batch="big"), "optimizer.batch", "integer", "'big'"),
    spec_case("spec-bool-as-batch", put(optimizer__batch=True), "optimizer.batch", "integer"),
    spec_case("spec-negative-lr", put(optimizer__lr=-0.1), "optimizer.lr", "> 0", "-0.1"),
    spec_case("spec-nan-lr", put(optimizer__lr=float("nan")), "optimizer.lr", "finite"),
    spec_case("spec-momentum-too-big", put(optimizer__momentum=1.5), "optimizer.momentum", "1.5"),
    spec_case("spec-unknown-optimizer", put(optimizer__kind="adam"), "optimizer.kind", "'adam'", "'sgd'"),
    spec_case("spec-unknown-model-kind", put(model__kind="xgboost"), "model.kind", "'xgboost'", "'softmax'"),
    spec_case("spec-mlp-without-hidden", put(model__kind="mlp"), "model.hidden", "mlp"),
    spec_case("spec-mlp-zero-width", put(model__kind="mlp", model__hidden=[0]), "model.hidden", ">= 1"),
    spec_case("spec-hidden-on-logistic", put(model__kind="logistic", model__hidden=[16]), "model.hidden",
              "logistic"),
    spec_case("spec-one-class", put(model__classes=1), "model.classes", "2..100000"),
    spec_case("spec-missing-model", drop("model"), "model", "missing required key"),
    spec_case("spec-missing-train", drop("data.train"), "data.train", "missing required key"),
    spec_case("spec-goal-without-bound", put(goal={"valid_loss_below": 0.2}), "goal.max_epochs", "max_steps"),
    spec_case("spec-seed-not-int", put(seed="x"), "seed", "integer"),
    spec_case("spec-negative-seed", put(seed=-1), "seed", ">= 0", "-1"),
    spec_case("spec-name-with-slash", put(name="my/job"), "name", "'my/job'"),
    spec_case("spec-name-with-space", put(name="my job"), "name", "'my job'"),
    spec_case("spec-name-dotdot", put(name="../escape"), "name", "'../escape'"),
    spec_case("spec-start-unknown-phase", put(fleet__start="huge"), "fleet.start", "'huge'", "small, wide"),
    spec_case("spec-no-phases", put(fleet__phases={}, fleet__rules=[]), "fleet.phases", "at least one phase"),
    spec_case("spec-unreachable-phase", put(fleet__rules=[]), "fleet.phases", "wide", "never run"),
    spec_case("spec-zero-nodes", put(fleet__phases__small__nodes=0), "fleet.phases.small.nodes", "> 0"),
    spec_case("spec-unknown-device", put(fleet__phases__small__device="tpu"), "fleet.phases.small.device",
              "'tpu'"),
    spec_case("spec-bad-phase-name", put(fleet__phases={"small": {"nodes": 1}, "wide one": {"nodes": 2}},
                                         fleet__rules=[]), "fleet.phases.wide one", "bad name"),
    spec_case("spec-unknown-approval", put(fleet__approval="maybe"), "fleet.approval", "'maybe'", "'manual'"),
    spec_case("spec-rule-unknown-metric", put(fleet__rules__0__when="bytes_sent > 3"), "fleet.rules[0].when",
              "unknown metric 'bytes_sent'"),
    spec_case("spec-rule-bad-unit", put(fleet__rules__0__when="epoch >= 3KiB"), "fleet.rules[0].when", "KiB",
              "epoch"),
    spec_case("spec-rule-when-not-string", put(fleet__rules__0__when=3), "fleet.rules[0].when", "string"),
    spec_case("spec-rule-in-unknown-phase", put(fleet__rules__0__in="nowhere"), "fleet.rules[0].in",
              "'nowhere'", "small, wide"),
    spec_case("spec-rule-goto-unknown-phase", put(fleet__rules__0__then={"goto": "nowhere"}),
              "fleet.rules[0].then.goto", "'nowhere'", "small, wide"),
    spec_case("spec-rule-two-actions", put(fleet__rules__0__then={"goto": "wide", "stop": True}),
              "fleet.rules[0].then", "exactly one"),
    spec_case("spec-rule-unknown-key", put(fleet__rules__0__if="epoch > 1"), "fleet.rules[0].if", "valid keys"),
    spec_case("spec-unknown-backend", put(scheduler={"backend": "pbs"}), "scheduler.backend", "'pbs'"),
    raw_spec_case("spec-invalid-yaml", b"name: tiny\nmodel: {kind: softmax\noptimizer: {lr: 0.1}\n",
                  "invalid YAML", "line 3"),
    raw_spec_case("spec-yaml-list", b"- name: tiny\n- model: softmax\n", "mapping", "list"),
    raw_spec_case("spec-empty-file", b"", "mapping"),
    raw_spec_case("spec-duplicate-key", (yaml.safe_dump(BASE_SPEC, sort_keys=False) + "seed: 5\n").encode(),
                  "duplicate key 'seed'", "line"),
    raw_spec_case("spec-not-utf8", b"name: \xff\xfe\x00tiny\n", "cannot read spec"),
]


def _missing_spec(tmp: Path, src: Source) -> list[str]:
    return ["run", "nope.yaml", "--job-dir", "job"]


def _spec_is_plain_dir(tmp: Path, src: Source) -> list[str]:
    (tmp / "notajob").mkdir()
    (tmp / "notajob" / "readme.txt").write_text("not a job\n")
    return ["run", "notajob"]


def _missing_mpiexec(tmp: Path, src: Source) -> list[str]:
    write_spec(tmp / "spec.yaml", {**BASE_SPEC, "scheduler": {"mpiexec": "/nonexistent/mpiexec"}})
    return RUN


SPEC_CASES += [
    # Checked before the job dir is made: fixing the spec must not meet "a different spec".
    Case("spec-mpiexec-missing", _missing_mpiexec, ("scheduler.mpiexec", "'/nonexistent/mpiexec'"), RUN_ABSENT),
    Case("spec-file-missing", _missing_spec, ("nope.yaml", "not found"), RUN_ABSENT),
    Case("spec-is-dir-not-job", _spec_is_plain_dir, ("notajob", "not a fleetmpi job dir"), RUN_ABSENT),
]

DATA_CASES = [
    data_case("data-train-missing", None, put(data__train="data/nope.h5"), "nope.h5", "not found"),
    data_case("data-not-hdf5", _text_file("notes.h5"), None, "notes.h5", "not a readable HDF5 file"),
    data_case("data-train-is-dir", _dir_as_file("folder.h5"), None, "folder.h5", "is a folder"),
    data_case("data-x-missing", _h5_file("nox.h5", y=labels), None, "nox.h5", "'X'"),
    data_case("data-y-missing", _h5_file("noy.h5", X=rand_x), None, "noy.h5", "'y'"),
    data_case("data-x-float64", _h5_file("f64.h5", X=lambda: rand_x(dtype=np.float64), y=labels), None,
              "f64.h5", "float32", "float64"),
    data_case("data-x-1d", _h5_file("x1d.h5", X=lambda: rand_x()[:, 0].copy(), y=labels), None, "x1d.h5", "2-D"),
    data_case("data-x-empty", _h5_file("empty.h5", X=lambda: rand_x(0), y=lambda: labels(0)), None,
              "empty.h5", "empty"),
    data_case("data-y-length-mismatch", _h5_file("ylen.h5", X=rand_x, y=lambda: labels(49)), None,
              "ylen.h5", "(50,)", "(49,)"),
    data_case("data-y-strings", _h5_file("ystr.h5", X=rand_x, y=lambda: np.array([b"a"] * 50)), None,
              "ystr.h5", "numeric"),
    data_case("data-labels-above-classes", None, put(model__classes=2), "train.h5", "label 2", "2 classes"),
    data_case("data-labels-above-file-classes",
              _h5_file("k5.h5", attrs={"classes": 3}, X=rand_x, y=lambda: labels(50, 5)), None,
              "k5.h5", "label 4", "3 classes"),
    data_case("data-logistic-three-labels", None, put(model__kind="logistic"), "train.h5", "0/1"),
    data_case("data-fractional-labels", _h5_file("frac.h5", X=rand_x, y=lambda: labels() + 0.5), None,
              "frac.h5", "whole numbers"),
    data_case("data-negative-labels", _h5_file("neg.h5", X=rand_x, y=lambda: labels() - 1), None,
              "neg.h5", "class ids"),
    data_case("data-nan-label", _h5_file("nan.h5", X=lambda: rand_x(60), y=_nan_labels), None, "nan.h5", "NaN", "row 7"),
    data_case("data-valid-other-columns", _h5_file("valid5.h5", "valid", X=lambda: rand_x(d=5), y=labels), None,
              "valid5.h5", "5 columns", f"{FEATURES}"),
    data_case("data-valid-missing", None, put(data__valid="data/gone.h5"), "gone.h5", "not found"),
    data_case("data-batch-larger-than-data", None, put(optimizer__batch=1000), "optimizer.batch", "1000",
              f"{TRAIN_ROWS}"),
]


# Checkpoints and models: inspect, predict, and a resume that meets an incompatible checkpoint.

def _inspect(make: Callable[[Path, Source], str]) -> Setup:
    def setup(tmp: Path, src: Source) -> list[str]:
        return ["inspect", make(tmp, src)]
    return setup


def _truncated(tmp: Path, src: Source) -> str:
    blob = src.checkpoint.read_bytes()
    (tmp / "step-00000004.h5").write_bytes(blob[: len(blob) // 2])
    return "step-00000004.h5"


def _text_ckpt(tmp: Path, src: Source) -> str:
    (tmp / "notes.h5").write_text("this is not HDF5\n")
    return "notes.h5"


def _tampered(tmp: Path, src: Source) -> str:
    shutil.copy(src.checkpoint, tmp / "tampered.h5")
    with h5py.File(tmp / "tampered.h5", "r+") as f:
        f["arrays/params"][0] += 1.0
    return "tampered.h5"


def _data_as_ckpt(tmp: Path, src: Source) -> str:
    return "data/train.h5"


def _ckpt_dir(tmp: Path, src: Source) -> str:
    copy_job(tmp, src)
    return "job/ckpt"


def _resume_other_model(tmp: Path, src: Source) -> list[str]:
    jd = copy_job(tmp, src)
    spec = yaml.safe_load((jd / "spec.yaml").read_text())
    spec["model"] = {"kind": "mlp", "hidden": [4], "l2": 1.0e-4}
    write_spec(jd / "spec.yaml", spec)
    # As if the job had been stopped after its checkpoint (a completed job is not resumed).
    state = json.loads((jd / "state.json").read_text())
    state["status"] = "STOPPED"
    (jd / "state.json").write_text(json.dumps(state))
    return ["run", "job"]


def _resume_bad_state(tmp: Path, src: Source) -> list[str]:
    jd = copy_job(tmp, src)
    (jd / "state.json").write_text('{"phase": "small", "status": ')
    return ["run", "job"]


def _resume_with_state(text: str) -> Setup:
    def setup(tmp: Path, src: Source) -> list[str]:
        jd = copy_job(tmp, src)
        (jd / "state.json").write_text(text)
        return ["run", "job"]
    return setup


def _resume_data_gone(tmp: Path, src: Source) -> list[str]:
    jd = copy_job(tmp, src)
    spec = yaml.safe_load((jd / "spec.yaml").read_text())
    spec["data"]["train"] = str(tmp / "data" / "moved.h5")  # the training file went away
    write_spec(jd / "spec.yaml", spec)
    state = json.loads((jd / "state.json").read_text())
    state["status"] = "STOPPED"
    (jd / "state.json").write_text(json.dumps(state))
    return ["run", "job"]


def _resume_bad_spec(tmp: Path, src: Source) -> list[str]:
    jd = copy_job(tmp, src)
    (jd / "spec.yaml").write_text("name: tiny\nmodel: [unclosed\n")
    return ["run", "job"]


CHECKPOINT_CASES = [
    Case("ckpt-inspect-truncated", _inspect(_truncated), ("step-00000004.h5",)),
    Case("ckpt-inspect-not-hdf5", _inspect(_text_ckpt), ("notes.h5", "not a readable HDF5 file")),
    Case("ckpt-inspect-missing", _inspect(lambda tmp, src: "gone.h5"), ("gone.h5", "no such file")),
    Case("ckpt-inspect-checksum", _inspect(_tampered), ("tampered.h5", "checksum mismatch")),
    Case("ckpt-inspect-plain-data", _inspect(_data_as_ckpt), ("train.h5", "fleetmpi_format")),
    Case("ckpt-inspect-dir", _inspect(_ckpt_dir), ("job/ckpt", "not a regular file")),
    # The worker refuses the checkpoint (CheckpointError, exit 2) and records that: it appends
    # to events.jsonl, marks state.json FAILED and writes the phase's log. The checkpoints,
    # spec.yaml, metrics and model stay as they were.
    Case("ckpt-resume-other-model-kind", _resume_other_model,
         ("job/ckpt/step-00000006.h5", "checkpoint was written for model spec"),
         may_change=("job/events.jsonl", "job/state.json", "job/logs/*")),
    Case("ckpt-resume-corrupt-state", _resume_bad_state, ("job/state.json", "not valid JSON")),
    Case("ckpt-resume-state-not-object", _resume_with_state("[]\n"), ("job/state.json", "JSON object", "list")),
    Case("ckpt-resume-state-unknown-phase", _resume_with_state('{"phase": "huge", "status": "STOPPED"}\n'),
         ("job/state.json", "'huge'", "small, wide")),
    Case("ckpt-resume-state-without-phase", _resume_with_state('{"status": "STOPPED"}\n'),
         ("job/state.json", "phase None")),
    # The worker finds the training file gone and records that as above; nothing else changes.
    Case("ckpt-resume-data-gone", _resume_data_gone, ("moved.h5", "not found"),
         may_change=("job/events.jsonl", "job/state.json", "job/logs/*")),
    Case("ckpt-resume-corrupt-spec", _resume_bad_spec, ("job/spec.yaml", "invalid YAML")),
]


# CLI usage.

def _args(*argv: str) -> Setup:
    return lambda tmp, src: list(argv)


def _run_set(*overrides: str) -> Setup:
    return lambda tmp, src: [*RUN, *[a for o in overrides for a in ("--set", o)]]


def _foreign_job_dir(tmp: Path, src: Source) -> list[str]:
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.txt").write_text("my notes\n")
    return ["run", "spec.yaml", "--job-dir", "foreign"]


def _job_with_set(tmp: Path, src: Source) -> list[str]:
    copy_job(tmp, src)
    return ["run", "job", "--set", "seed=5"]


def _job_twice(tmp: Path, src: Source) -> list[str]:
    copy_job(tmp, src)
    return ["run", "job", "--job-dir", "other"]


def _predict(model: Callable[[Path, Source], str], data: Callable[[Path, Source], str], out: str = "out.h5") -> Setup:
    return lambda tmp, src: ["predict", model(tmp, src), data(tmp, src), "--out", out]


def _model(tmp: Path, src: Source) -> str:
    shutil.copy(src.job / "model.h5", tmp / "model.h5")
    return "model.h5"


def _ckpt_as_model(tmp: Path, src: Source) -> str:
    shutil.copy(src.checkpoint, tmp / "step-00000004.h5")
    return "step-00000004.h5"


def _valid(tmp: Path, src: Source) -> str:
    return "data/valid.h5"


def _five_features(tmp: Path, src: Source) -> str:
    write_h5(tmp / "five.h5", X=rand_x(20, 5))
    return "five.h5"


def _float64_rows(tmp: Path, src: Source) -> str:
    write_h5(tmp / "f64.h5", X=rand_x(20, dtype=np.float64))
    return "f64.h5"


def _no_x(tmp: Path, src: Source) -> str:
    write_h5(tmp / "nox.h5", y=labels(20))
    return "nox.h5"


def _empty_rows(tmp: Path, src: Source) -> str:
    write_h5(tmp / "empty.h5", X=rand_x(0))
    return "empty.h5"


def _x_is_group(tmp: Path, src: Source) -> str:
    with h5py.File(tmp / "xgrp.h5", "w") as f:
        f.create_group("X")
    return "xgrp.h5"


def _unknown_kind_model(tmp: Path, src: Source) -> str:
    # A fake: training never writes an unknown kind, so the file is forged through the
    # real writer (valid checksum) to stand for a model from another fleetmpi version.
    from fleetmpi.h5store import read_h5_verified, write_h5_atomic
    arrays, meta = read_h5_verified(src.job / "model.h5", kind="model")
    write_h5_atomic(tmp / "xgboost.h5", arrays, {**meta, "kind": "xgboost"}, kind="model")
    return "xgboost.h5"


def _approve_done(tmp: Path, src: Source) -> list[str]:
    copy_job(tmp, src)
    return ["approve", "job"]


def _approve_with_state(text: str) -> Setup:
    def setup(tmp: Path, src: Source) -> list[str]:
        (copy_job(tmp, src) / "state.json").write_text(text)
        return ["approve", "job"]
    return setup


def _plain_dir(name: str) -> Callable[[Path, Source], str]:
    def make(tmp: Path, src: Source) -> str:
        (tmp / name).mkdir()
        return name
    return make


CLI_CASES = [
    Case("cli-no-command", _args(), ("COMMAND",)),
    Case("cli-unknown-command", _args("frobnicate", "spec.yaml"), ("frobnicate",)),
    Case("cli-unknown-option", _args("run", "spec.yaml", "--job-dir", "job", "--fast"), ("--fast",), RUN_ABSENT),
    Case("cli-run-missing-spec-arg", _args("run"), ("spec",), RUN_ABSENT),
    Case("cli-predict-missing-out", _args("predict", "model.h5", "data/valid.h5"), ("--out",)),
    Case("cli-make-data-bad-int", _args("make-data", "--n", "many", "--out", "made"), ("--n", "'many'"), ("made",)),
    Case("cli-make-data-bad-choice", _args("make-data", "--task", "ternary", "--out", "made"),
         ("--task", "'ternary'"), ("made",)),
    Case("cli-make-data-bad-fraction", _args("make-data", "--valid-fraction", "1.5", "--out", "made"),
         ("--valid-fraction", "1.5"), ("made",)),
    Case("cli-make-data-too-few-rows", _args("make-data", "--n", "1", "--out", "made"), ("--n",), ("made",)),
    Case("cli-set-without-equals", _run_set("optimizer.lr"), ("--set", "'optimizer.lr'", "key.path=value"),
         RUN_ABSENT),
    Case("cli-set-empty-key", _run_set("=3"), ("--set", "'=3'"), RUN_ABSENT),
    Case("cli-set-empty-part", _run_set("optimizer..lr=3"), ("--set", "'optimizer..lr=3'"), RUN_ABSENT),
    Case("cli-set-unknown-key", _run_set("optimizer.lrr=0.1"), ("spec.yaml", "optimizer.lrr", "valid keys"),
         RUN_ABSENT),
    Case("cli-set-unknown-section", _run_set("optimiser.lr=0.1"), ("spec.yaml", "optimiser", "unknown key"),
         RUN_ABSENT),
    Case("cli-set-wrong-type", _run_set("optimizer.batch=big"), ("spec.yaml", "optimizer.batch", "'big'"),
         RUN_ABSENT),
    Case("cli-set-through-scalar", _run_set("name.first=x"), ("--set", "'name' is not a mapping"), RUN_ABSENT),
    Case("cli-set-bad-yaml-value", _run_set("optimizer.lr=[1"), ("--set", "not valid YAML"), RUN_ABSENT),
    Case("cli-run-job-dir-is-file", _args("run", "spec.yaml", "--job-dir", "spec.yaml"),
         ("--job-dir spec.yaml", "not a folder")),
    Case("cli-run-job-dir-under-file", _args("run", "spec.yaml", "--job-dir", "data/train.h5/job"),
         ("--job-dir data/train.h5/job", "data/train.h5", "not a folder")),
    Case("cli-make-data-out-is-file", _args("make-data", "--out", "data/train.h5"),
         ("--out data/train.h5", "not a folder")),
    Case("cli-run-foreign-job-dir", _foreign_job_dir, ("foreign", "not empty")),
    Case("cli-run-job-dir-with-set", _job_with_set, ("job", "--set seed cannot change a job that exists", "goal.max_steps")),
    Case("cli-run-job-dir-twice", _job_twice, ("job", "--job-dir other", "given twice"), ("other",)),
    Case("cli-predict-checkpoint-as-model", _predict(_ckpt_as_model, _valid),
         ("step-00000004.h5", "kind is 'checkpoint'", "'model'"), ("out.h5",)),
    Case("cli-predict-model-missing", _predict(lambda t, s: "gone.h5", _valid), ("gone.h5", "no such file"),
         ("out.h5",)),
    Case("cli-predict-data-as-model", _predict(lambda t, s: "data/train.h5", _valid), ("data/train.h5",),
         ("out.h5",)),
    Case("cli-predict-other-feature-count", _predict(_model, _five_features),
         ("five.h5", "(20, 5)", f"{FEATURES} features"), ("out.h5",)),
    Case("cli-predict-float64-rows", _predict(_model, _float64_rows), ("f64.h5", "float32", "float64"),
         ("out.h5",)),
    Case("cli-predict-data-without-x", _predict(_model, _no_x), ("nox.h5", "'X'"), ("out.h5",)),
    Case("cli-predict-no-rows", _predict(_model, _empty_rows), ("empty.h5", "no rows"), ("out.h5",)),
    Case("cli-predict-x-is-group", _predict(_model, _x_is_group), ("xgrp.h5", "'X'"), ("out.h5",)),
    Case("cli-predict-unknown-model-kind", _predict(_unknown_kind_model, _valid), ("xgboost.h5", "'xgboost'"),
         ("out.h5",)),
    Case("cli-predict-data-missing", _predict(_model, lambda t, s: "gone.h5"), ("gone.h5", "not found"),
         ("out.h5",)),
    Case("cli-predict-out-missing-folder", _predict(_model, _valid, "nowhere/out.h5"),
         ("--out nowhere/out.h5", "does not exist"), ("nowhere",)),
    Case("cli-predict-out-is-folder", _predict(_model, _valid, "data"), ("--out data", "folder")),
    Case("cli-predict-out-is-input", _predict(_model, _valid, "data/valid.h5"),
         ("--out data/valid.h5", "overwrite an input")),
    Case("cli-approve-nothing-pending", _approve_done, ("job", "no rescale is waiting"), ("job/approval.json",)),
    Case("cli-approve-state-not-object", _approve_with_state('"ok"\n'), ("job/state.json", "JSON object", "str")),
    Case("cli-approve-bad-pending", _approve_with_state('{"phase": "small", "pending_approval": "yes"}\n'),
         ("job/state.json", "pending_approval", "'yes'")),
    Case("cli-approve-not-a-job", lambda tmp, src: ["approve", _plain_dir("empty")(tmp, src)],
         ("empty/state.json", "missing")),
    Case("cli-events-not-a-job", lambda tmp, src: ["events", _plain_dir("empty")(tmp, src)],
         ("empty/state.json", "missing")),
]



def tree(**model: Any) -> Callable[[dict[str, Any]], None]:
    """Return an edit that makes the base spec a tree model (no optimizer section), ``model`` keys added."""
    def edit(spec: dict[str, Any]) -> None:
        spec.pop("optimizer", None)
        spec["model"] = {"kind": "gbdt", "task": "multiclass", "trees": 6, "depth": 2, **model}
    return edit


def _both(*edits: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def edit(spec: dict[str, Any]) -> None:
        for e in edits:
            e(spec)
    return edit


def _resume_tree_as_softmax(tmp: Path, src: Source) -> list[str]:
    """Run a small gbdt job, then point its job dir's spec at softmax, as if edited after a stop."""
    spec = copy.deepcopy(BASE_SPEC)
    tree()(spec)
    write_spec(tmp / "tree.yaml", spec)
    ran = fleetmpi(tmp, "run", "tree.yaml", "--job-dir", "job")
    assert ran.returncode == 0, ran.stderr
    jd = tmp / "job"
    edited = yaml.safe_load((jd / "spec.yaml").read_text())
    edited["model"] = {"kind": "softmax", "l2": 1.0e-4}
    edited["optimizer"] = BASE_SPEC["optimizer"]
    write_spec(jd / "spec.yaml", edited)
    state = json.loads((jd / "state.json").read_text())
    state["status"] = "STOPPED"
    (jd / "state.json").write_text(json.dumps(state))
    return ["run", "job"]


TREE_CASES = [
    spec_case("tree-depth-too-deep", tree(depth=17), "model.depth", "1..16", "17"),
    spec_case("tree-depth-zero", tree(depth=0), "model.depth", "1..16"),
    spec_case("tree-bins-too-many", tree(bins=257), "model.bins", "2..256", "257"),
    spec_case("tree-bins-one", tree(bins=1), "model.bins", "2..256"),
    spec_case("tree-no-trees", tree(trees=0), "model.trees", "got 0"),
    spec_case("tree-row-sample-zero", tree(row_sample=0.0), "model.row_sample", "(0, 1]"),
    spec_case("tree-row-sample-above-one", tree(row_sample=1.5), "model.row_sample", "(0, 1]", "1.5"),
    spec_case("tree-forest-learning-rate", tree(kind="forest", learning_rate=0.1), "model.learning_rate",
              "forest", "gbdt"),
    spec_case("tree-with-sgd", _both(tree(), put(optimizer={"kind": "sgd", "lr": 0.1})), "optimizer", "gbdt",
              "'sgd'", "no optimizer section"),
    spec_case("tree-rule-switches-optimizer", _both(tree(), put(fleet__rules=[
        {"in": "small", "when": "epoch >= 3", "then": {"goto": "wide"}},
        {"when": "step > 2", "then": {"optimizer": "lbfgs"}}])), "fleet.rules[1].then.optimizer", "gbdt"),
    spec_case("tree-goal-beyond-trees", _both(tree(), put(goal={"max_steps": 7})), "goal.max_steps",
              "model.trees is 6"),
    spec_case("tree-key-on-softmax", put(model__depth=3), "model.depth", "gbdt, forest, tree", "'softmax'"),
    Case("tree-ckpt-resumed-as-softmax", _resume_tree_as_softmax,
         ("job/ckpt/step-00000006.h5", "checkpoint was written for model spec"),
         may_change=("job/events.jsonl", "job/state.json", "job/logs/*")),
]


# Series data (issue 15): lag windows of data/series.h5, 20 points of 2 series.

def _series_run(lags: int, tail: float | int, series: np.ndarray | None = None, **model: Any) -> Setup:
    def setup(tmp: Path, src: Source) -> list[str]:
        data = series if series is not None else np.random.default_rng(15).standard_normal((20, 2))
        write_h5(tmp / "data" / "series.h5", series=data if data.dtype.kind == "i" else data.astype(np.float32))
        spec = copy.deepcopy(BASE_SPEC)
        spec["data"] = {"train": "data/series.h5", "valid_tail": tail}
        spec["model"] = {"kind": "ar", "lags": lags, **model}
        spec["optimizer"] = {"kind": "closed_form"}
        write_spec(tmp / "spec.yaml", spec)
        return RUN
    return setup


def _series_csv(tmp: Path, src: Source) -> list[str]:
    (tmp / "data" / "prices.csv").write_text("day,a,b\n1,0.5,x1\n2,0.7,0.2\n3,0.1,0.3\n")
    return ["make-data", "--from", "csv", "data/prices.csv", "--series-columns", "a,b", "--out", "series"]


SERIES_CASES = [
    Case("series-lags-zero", _series_run(0, 0.2), ("spec.yaml", "model.lags", "lags >= 1"), RUN_ABSENT),
    Case("series-lags-longer-than-series", _series_run(25, 0.2),
         ("data/series.h5", "lags 25", "longer than the series (20 points)"), RUN_ABSENT),
    Case("series-tail-leaves-no-window", _series_run(3, 17),
         ("data/series.h5", "valid_tail 17", "no training window", "at most 16"), RUN_ABSENT),
    Case("series-tail-fraction-leaves-no-window", _series_run(3, 0.9),
         ("data/series.h5", "holds out 18 of 20", "no training window"), RUN_ABSENT),
    Case("series-not-float32", _series_run(2, 0.2, np.random.default_rng(1).integers(0, 9, 20)),
         ("data/series.h5", "series must be float32", "int64"), RUN_ABSENT),
    Case("series-csv-non-numeric-column", _series_csv, ("data/prices.csv", "column 'b'", "'x1'", "line 2",
                                                         "must be numeric"), ("series",)),
    Case("series-csv-unknown-column", lambda tmp, src: [*_series_csv(tmp, src)[:5], "a,c", "--out", "series"],
         ("data/prices.csv", "no column 'c'", "'day', 'a', 'b'"), ("series",)),
]

CASES = SPEC_CASES + DATA_CASES + CHECKPOINT_CASES + CLI_CASES + TREE_CASES + SERIES_CASES


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_exits_2_with_one_line(case: Case, tmp_path: Path, source: Source) -> None:
    prepare(tmp_path, source)
    argv = case.setup(tmp_path, source)
    assert_refused(tmp_path, argv, case.expect, case.may_change, case.absent)


def test_rerun_with_other_spec_refused_after_a_real_run(tmp_path: Path, source: Source) -> None:
    """A finished job dir refuses the same spec with --set seed=5 and keeps every file."""
    prepare(tmp_path, source)
    first = fleetmpi(tmp_path, *RUN)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "job" / "model.h5").is_file()
    # The unchanged spec is accepted (the job is reported as completed, nothing launches),
    # so the refusal below is about the override, not about paths or hashing.
    again = fleetmpi(tmp_path, *RUN)
    assert again.returncode == 0 and "already completed" in again.stderr, again.stdout + again.stderr
    assert_refused(tmp_path, [*RUN, "--set", "seed=5"],
                   ("job", "holds a job with a different spec", "spec.yaml", "--set seed=5"))
