"""Training subcommands: run, inspect, predict, make-data, approve, events."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleetmpi.cli.common import JOB_HELP, add_set, resolve_job
from fleetmpi.errors import BadInput, ExitCode

Handler = Callable[[argparse.Namespace], int]

# fleetmpi.preprocess.AUTO_MAX_CLASSES, for make-data's help: importing preprocess here would load numpy
# on every CLI call, refusals included (tests/unit/test_cli.py checks the two agree).
AUTO_MAX_CLASSES = 32


def add_parsers(sub: Any) -> dict[str, Handler]:
    """Add the training subcommands to ``sub`` (argparse subparsers); return their handlers by name."""
    r = sub.add_parser("run", help="run a job on this machine (mpiexec), through rescales, to its goal")
    r.add_argument("spec", help="job spec (YAML), or an existing job dir to resume")
    r.add_argument("--job-dir", help="job directory (default: ./runs/NAME, NAME from the spec)")
    add_set(r)
    r.add_argument("--json", action="store_true", help="print the outcome as JSON on stdout")

    i = sub.add_parser("inspect", help="show a checkpoint or model file")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")

    pr = sub.add_parser("predict", help="predict with a trained model")
    pr.add_argument("model", help="model.h5 written by a finished job")
    pr.add_argument("data", help="HDF5 file with dataset X (float32, n x d); a .csv, .parquet, .npy or .libsvm table "
                                 "(make-data's column order, standardisation and class names are applied); or, for a "
                                 "model trained on hashed text, a folder of class subfolders, a .jsonl or a .csv of "
                                 "raw text")
    pr.add_argument("--out", required=True, help="output .h5: pred (n,) for every model (class id int64 for "
                    "classifiers, value float for regression); proba (n,) binary or (n, classes) multiclass; "
                    "mean and std (n,) for gp; with --horizon only forecast (H, m). Or .csv: class and p_<class> "
                    "columns (pred for regression)")
    pr.add_argument("--horizon", type=int, help="ar model: forecast H steps after the end of each series in DATA "
                    "(dataset series); writes forecast (H, m)")
    pr.add_argument("--text-field", help="raw text input: the JSONL/CSV field holding the text (default: the "
                    "field the model was trained on)")
    pr.add_argument("--json", action="store_true", help="print the outcome as JSON (accuracy and log-loss, or mse, "
                                                         "when a table has the label column)")

    m = sub.add_parser("make-data", help="write HDF5 from your table (csv, parquet, npy, libsvm), raw text, a "
                                         "series CSV, or a synthetic or bundled dataset")
    m.add_argument("--from", dest="source", nargs="+", default=["synthetic"], metavar="SOURCE [PATH]",
                   help="synthetic | digits | breast_cancer; csv | parquet | npy | libsvm followed by the file; "
                        "text PATH (folder of class subfolders, .jsonl or .csv); csv FILE --series-columns a,b for "
                        "a time series")
    m.add_argument("--task", choices=["binary", "multiclass", "regression", "auto"], default=None,
                   help="default: binary (synthetic), multiclass (digits), binary (breast_cancer), auto (files). "
                        f"auto: labels that are text, or whole numbers with at most {AUTO_MAX_CLASSES} distinct "
                        "values, are classes (binary when 2); anything else is regression")
    m.add_argument("--series-columns", help="with --from csv FILE: numeric columns a,b written as series (T, m)")
    m.add_argument("--label", help="label column (csv, parquet)")
    m.add_argument("--labels", help="labels .npy, one per row (npy)")
    m.add_argument("--valid", help="validation file or documents in the same format or layout (instead of "
                                   "--valid-fraction)")
    m.add_argument("--valid-labels", help="labels .npy of the --valid file (npy)")
    m.add_argument("--standardize", action="store_true",
                   help="scale features by the training part's mean and std; predict applies the same")
    m.add_argument("--categorical", default="", metavar="A,B", help="one-hot encode these text columns")
    m.add_argument("--fill", choices=["mean"], help="fill missing cells with the training mean (else refused)")
    m.add_argument("--n", type=int, default=10000, help="rows (synthetic)")
    m.add_argument("--d", type=int, default=32, help="features (synthetic)")
    m.add_argument("--classes", type=int, default=4, help="classes (synthetic multiclass)")
    m.add_argument("--noise", type=float, default=0.5, help="label noise scale (synthetic)")
    m.add_argument("--valid-fraction", type=float, default=None,
                   help="rows drawn at random (seeded) into valid.h5; default 0.2, 0 without --valid")
    m.add_argument("--seed", type=int, default=0, help="seed of the validation split, the row shuffle (text) and synthetic data")
    m.add_argument("--out", required=True, help="output folder: writes train.h5 and valid.h5")
    m.add_argument("--text-field", default="text", help="--from text JSONL/CSV: the field holding the document")
    m.add_argument("--label-field", default="label", help="--from text JSONL/CSV: the field holding the class")
    m.add_argument("--ngrams", default="1,2", help="--from text: word n-gram sizes MIN,MAX")
    m.add_argument("--hash-bits", type=int, default=18, help="--from text: hash into 2^bits columns (10..26)")

    a = sub.add_parser("approve", help="approve a job's pending rescale (approval: manual)")
    a.add_argument("job", help=JOB_HELP)

    e = sub.add_parser("events", help="print a job's events")
    e.add_argument("job", help=JOB_HELP)
    e.add_argument("--json", action="store_true")
    e.add_argument("--follow", "-f", action="store_true", help="then print new events as they come, until the job ends")
    return {"run": _cmd_run, "inspect": _cmd_inspect, "predict": _cmd_predict, "make-data": _cmd_make_data,
            "approve": _cmd_approve, "events": _cmd_events}


def open_job(given: Path, job_dir: str | None, overrides: list[str], verb: str,
             preflight: Callable[[Any, Any], object]) -> tuple[Any, Any]:
    """Return (JobDir, Spec): a new job dir for a spec file, or the existing one ``given`` names.

    Shared by ``run`` and the backends' submit commands (``verb`` names the command in
    errors). ``preflight(spec, jobdir)`` checks what the launch needs before the job dir
    exists, beside the data checks done here.
    """
    from fleetmpi import spec as specmod
    from fleetmpi.jobdir import JobDir
    from fleetmpi.preflight import check_inputs

    if given.is_dir():  # `fleetmpi run JOB_DIR` resumes
        if job_dir and Path(job_dir).resolve() != given.resolve():
            raise BadInput(f"{verb} {given}: a job dir was given twice ({given} and --job-dir {job_dir})")
        jd = JobDir(given)
        if not jd.exists():
            raise BadInput(f"{given}: not a fleetmpi job dir (no spec.yaml and state.json); pass a spec file")
        spec = specmod.load(jd.spec)
        if overrides:
            from fleetmpi.lock import LOCK_FD_ENV, JobLock
            if os.environ.get(LOCK_FD_ENV):   # a parent handed this process the lock: it holds it already
                spec = raise_budget(jd, spec, overrides, verb)
            else:   # under the job dir's lock: a command refused as the job is in use changes nothing
                with JobLock(jd, f"fleetmpi {verb} --set"):
                    spec = raise_budget(jd, spec, overrides, verb)
    else:
        spec = specmod.load(given, overrides)
        jd = JobDir(job_dir or Path("runs") / spec.name)
        if jd.exists():
            stored = specmod.load(jd.spec)
            if stored.spec_hash() != spec.spec_hash():
                raise BadInput(f"{jd.root}: holds a job with a different spec than {given}"
                               f"{' with --set ' + ' '.join(overrides) if overrides else ''}; "
                               f"use a new --job-dir, or `fleetmpi {verb} " + str(jd.root) + "` to resume it as it was")
        else:
            # Everything a launch needs is checked before the job dir exists, so a refusal
            # leaves nothing behind (and a corrected spec is not refused as a different one).
            check_folder_path(jd.root, "--job-dir" if job_dir else "job dir")
            check_inputs(spec)
            preflight(spec, jd)
            jd.create(specmod.dump(spec), spec.fleet.start, spec.scheduler.backend)
    return jd, spec


# The --set keys an existing job takes: more budget (or patience) continues it from its newest checkpoint.
RAISABLE = ("goal.max_epochs", "goal.max_steps", "goal.patience")


def raise_budget(jd: Any, old: Any, overrides: list[str], verb: str) -> Any:
    """Apply ``--set goal.max_epochs=N`` (max_steps, patience) to an existing job; return the new spec.

    Only increases are taken; the spec.yaml is rewritten atomically, a ``budget_raised``
    event records old and new, and a COMPLETED job goes back to RUNNING so it resumes.
    """
    from fleetmpi import spec as specmod
    from fleetmpi.jobdir import atomic_write_bytes
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key not in RAISABLE:
            raise BadInput(f"{verb} {jd.root}: --set {key} cannot change a job that exists (only "
                           f"{', '.join(RAISABLE)} can be raised); start a new --job-dir")
    new = specmod.load(jd.spec, overrides)
    if new.model_hash() != old.model_hash():   # the goal is not part of it; a guard against a changed loader
        raise BadInput(f"{verb} {jd.root}: --set would change the model; start a new --job-dir")
    changes: dict[str, Any] = {}
    for key in RAISABLE:
        name = key.split(".")[1]
        before, after = getattr(old.goal, name), getattr(new.goal, name)
        if before == after:
            continue
        if before is None:   # no limit (no early stopping) is more than any value
            raise BadInput(f"{verb} {jd.root}: --set {key}={after} would limit a job that has no {key}; "
                           f"only a larger value continues a job")
        if after is None or after < before:
            raise BadInput(f"{verb} {jd.root}: --set {key}={after} is below the job's {before}; "
                           f"only a larger value continues a job")
        changes[name] = {"old": before, "new": after}
    if not changes:
        return old
    atomic_write_bytes(jd.spec, specmod.dump(new).encode())
    state = jd.read_state()
    jd.event("budget_raised", status=state.get("status"), **changes)
    if state.get("status") == "COMPLETED":
        jd.update_state(status="RUNNING", reason=None, outcome=None)
    return new


def _cmd_run(args: argparse.Namespace) -> int:
    from fleetmpi.preflight import check_inputs
    from fleetmpi.spec import check_local_fit
    created: list[bool] = []

    def preflight(spec: Any, _jd: Any) -> None:
        # launch.local loads h5py: only once the spec is read, so a refused spec exits sooner.
        from fleetmpi.launch.local import find_mpiexec
        find_mpiexec(spec)
        check_local_fit(spec, source=str(args.spec))   # before a job dir exists
        created.append(True)   # open_job checked the data just now and makes the job dir

    jd, spec = open_job(Path(args.spec), args.job_dir, args.overrides, "run", preflight)
    state = jd.read_state()
    if state.get("status") == "COMPLETED":
        print(f"fleetmpi: {jd.root} already completed ({state.get('reason', 'goal')}); model: {jd.model}",
              file=sys.stderr)
        rc: int = int((state.get("outcome") or {}).get("exit_code", ExitCode.OK))
    else:
        phase = state.get("phase")
        if not isinstance(phase, str) or phase not in spec.fleet.phases:
            raise BadInput(f"{jd.state_path}: phase {phase!r} is not in the spec's fleet.phases "
                           f"({', '.join(spec.fleet.phases)}); the file was edited or belongs to another job")
        from fleetmpi.launch.local import LocalBackend, find_mpiexec
        if not created:
            check_inputs(spec)   # data may have moved since the job was created
            find_mpiexec(spec)
        # The ledger row is written once mpiexec runs (0.05-0.1 s of imports and SQLite off the
        # start-up path); what it records of this moment is taken now.
        register = _run_registration(jd, spec)
        seen: list[tuple[Any, int, int] | None] = []
        rc = ExitCode.FAILED
        try:
            rc = LocalBackend(jd, spec, on_started=lambda: seen.append(register() if register else None)).run()
        finally:
            if seen and seen[0] is not None:
                _record_run_end(*seen[0], rc)
    if args.json:
        from fleetmpi.jobs.summary import job_summary
        print(json.dumps(job_summary(jd, rc), indent=1, allow_nan=False))
    return rc


def _run_registration(jd: Any, spec: Any) -> Callable[[], tuple[Any, int, int] | None] | None:
    """Return the call that records this `fleetmpi run` in the ledger (one world: `status`, `cancel`
    find it), or None if the manager runs it. The call returns (ledger, job id, allocation id) or None."""
    import socket

    from fleetmpi.lock import LOCK_FD_ENV
    if os.environ.get(LOCK_FD_ENV):
        return None   # a runner the manager launched: its row and allocation exist already
    host, pid = socket.gethostname(), os.getpid()
    info = {"pid": pid, "start_time": _process_start(pid), "host": host, "group": False,
            "events_from": jd.events.stat().st_size if jd.events.exists() else 0, "job_dir": str(jd.root.resolve())}

    def register() -> tuple[Any, int, int] | None:
        from fleetmpi.api import register_started
        return register_started(jd, spec, backend="local", backend_id=f"{host}:{pid}", info=info, log=None,
                                by=f"fleetmpi run (pid {pid})")

    return register


def _process_start(pid: int) -> float:
    import psutil
    return float(psutil.Process(pid).create_time())


def _record_run_end(ledger: Any, job_id: int, alloc_id: int, rc: int) -> None:
    """Record how this run ended in its ledger row, as the manager would for a runner it launched."""
    import sqlite3

    from fleetmpi.errors import FleetError
    from fleetmpi.jobs.backends import LocalJobs
    from fleetmpi.jobs.manager import Manager
    try:
        a = next(x for x in ledger.allocations(job_id) if x.id == alloc_id)
        Manager(ledger, out=None).record_end(a, LocalJobs._ended(a, rc))
    except (OSError, sqlite3.Error, FleetError) as e:
        print(f"fleetmpi: warning: the ledger was not told how job {job_id} ended ({e}); "
              "`fleetmpi status` finds out on its next look", file=sys.stderr)
    finally:
        ledger.close()


def check_folder_path(path: Path, label: str) -> None:
    """Refuse a folder to be created that is, or lies under, an existing file."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise BadInput(f"{label} {path}: {p} is not a folder")
            return


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fleetmpi.engine.checkpoint import summary
    info = summary(Path(args.path))
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return ExitCode.OK
    meta = info.get("meta", {})
    print(f"{info['path']}: {info['kind']} ({info['format']}), {info['size_bytes']} bytes, sha256 {info['sha256'][:16]}…")
    for key in ("step", "epoch", "phase", "optimizer", "ranks", "reason", "kind", "name"):
        if key in meta:
            print(f"  {key}: {meta[key]}")
    tr = info.get("trees")
    if tr:
        print(f"  trees: {tr['trees']} ({tr['rounds']} rounds), depth {tr['depth']}, leaves {tr['leaves']}")
        imp = ", ".join(f"f{e['feature']} {e['share']:.3f}" for e in tr["importance_gain"])
        print(f"  importance (share of split gain): {imp or 'no splits'}")
    for name, a in info["arrays"].items():
        stats = ", ".join(f"{k} {v:.4g}" for k, v in a.items() if k in ("min", "max", "l2_norm") and v is not None)
        print(f"  array {name}: {a['dtype']} {tuple(a['shape'])}{' — ' + stats if stats else ''}")
    return ExitCode.OK


def _cmd_predict(args: argparse.Namespace) -> int:
    from fleetmpi.engine.predict import TABLE_SUFFIXES, forecast_file, predict_file, predict_table, predict_text_file
    if args.horizon is not None:
        res = forecast_file(Path(args.model), Path(args.data), Path(args.out), args.horizon)
        if args.json:
            print(json.dumps(res, indent=1))
        else:
            print(f"fleetmpi: wrote {res['horizon']}-step forecasts of {res['series']} series to {res['out']}",
                  file=sys.stderr)
        return ExitCode.OK
    data = Path(args.data)
    if args.text_field is not None:
        res = predict_text_file(Path(args.model), data, Path(args.out), args.text_field)
    elif data.suffix.lower() in TABLE_SUFFIXES:   # a .csv of raw text goes on to predict_text_file
        res = predict_table(Path(args.model), data, Path(args.out))
    else:   # HDF5 X, or raw text for a model trained on hashed text
        res = predict_file(Path(args.model), data, Path(args.out))
    for key, what in (("empty_documents", "empty document(s) (no token of 2+ word characters) predicted as an "
                       "all-zero row"), ("replaced_utf8", "document(s) held bytes that are not UTF-8 (replaced)")):
        if res.get(key):
            print(f"fleetmpi: warning: {res[key]} {what}", file=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"fleetmpi: wrote {res['rows']} predictions to {res['out']}", file=sys.stderr)
    return ExitCode.OK


BUILTIN_SOURCES = ("synthetic", "digits", "breast_cancer")
TABLE_SOURCES = ("csv", "parquet", "npy", "libsvm")


def _cmd_make_data(args: argparse.Namespace) -> int:
    check_folder_path(Path(args.out), "--out")
    kind, *rest = args.source
    if kind == "csv" and args.series_columns is not None:
        from fleetmpi.series import make_series
        if len(rest) != 1:
            raise BadInput("--from csv: expected one CSV file, e.g. --from csv data.csv --series-columns a,b")
        written = make_series(Path(rest[0]), [c.strip() for c in args.series_columns.split(",")], Path(args.out))
        for path, points in written.items():
            print(f"fleetmpi: wrote {path} ({points} points per series)", file=sys.stderr)
        return ExitCode.OK
    if kind == "text":
        return _make_text(args, rest)
    if args.series_columns is not None:
        raise BadInput(f"--series-columns: only --from csv FILE takes it, not --from {kind}")
    valid_sources = f"{', '.join(BUILTIN_SOURCES)}, {' | '.join(TABLE_SOURCES)} PATH, or text PATH"
    if kind not in BUILTIN_SOURCES + TABLE_SOURCES:
        hint = f" (for a file: --from {kind.rsplit('.', 1)[-1]} {kind})" if "." in kind else ""
        raise BadInput(f"--from {kind}: not a source; valid: {valid_sources}{hint}")
    if len(rest) != (kind in TABLE_SOURCES):
        raise BadInput(f"--from {' '.join(args.source)}: " + (f"{kind} needs the file: --from {kind} PATH"
                       if kind in TABLE_SOURCES else f"{kind} takes no file") + f"; valid: {valid_sources}")
    if kind in TABLE_SOURCES:
        out = _make_data_from_file(args, kind, Path(rest[0]))
    else:
        from fleetmpi.makedata import make_data
        for flag in ("label", "labels", "valid", "valid_labels", "fill"):
            if getattr(args, flag):
                raise BadInput(f"--{flag.replace('_', '-')}: only with --from {' | '.join(TABLE_SOURCES)} PATH")
        if args.categorical or args.standardize:
            raise BadInput(f"--categorical/--standardize: only with --from {' | '.join(TABLE_SOURCES)} PATH")
        default_task = {"digits": "multiclass"}.get(kind, "binary")
        fraction = 0.2 if args.valid_fraction is None else args.valid_fraction
        out = make_data(source=kind, task=args.task or default_task, n=args.n, d=args.d, classes=args.classes,
                        noise=args.noise, valid_fraction=fraction, seed=args.seed, out=Path(args.out))
    for path, rows in out.items():
        print(f"fleetmpi: wrote {path} ({rows} rows)", file=sys.stderr)
    return ExitCode.OK


def _make_text(args: argparse.Namespace, rest: list[str]) -> int:
    from fleetmpi.text import make_text_data
    from kernels import lean_numba_start
    lean_numba_start()   # the hashing kernels are numba's: load them without scipy.linalg or cffi
    if len(rest) != 1:
        raise BadInput("--from text: expected one PATH (a folder of class subfolders, a .jsonl or a .csv file), "
                       "e.g. --from text corpus/ --out data/")
    res = make_text_data(Path(rest[0]), Path(args.out), text_field=args.text_field, label_field=args.label_field,
                         valid_fraction=0.2 if args.valid_fraction is None else args.valid_fraction,
                         valid=Path(args.valid) if args.valid else None,
                         ngrams=args.ngrams, hash_bits=args.hash_bits, seed=args.seed)
    for line in res["warnings"]:
        print(f"fleetmpi: warning: {line}", file=sys.stderr)
    for path, st in res["files"].items():
        print(f"fleetmpi: wrote {path} ({st['rows']} rows, {st['nnz']} nonzeros, {len(res['classes'])} classes)",
              file=sys.stderr)
    return ExitCode.OK


def _make_data_from_file(args: argparse.Namespace, fmt: str, path: Path) -> dict[str, int]:
    from fleetmpi.convert import Source, convert
    if args.label and fmt not in ("csv", "parquet"):
        raise BadInput(f"--label: only for csv and parquet (--from {fmt} takes labels from "
                       f"{'--labels FILE.npy' if fmt == 'npy' else 'the first field of each row'})")
    if (args.labels or args.valid_labels) and fmt != "npy":
        raise BadInput(f"--labels/--valid-labels: only for --from npy; --from {fmt} takes "
                       f"{'--label COLUMN' if fmt in ('csv', 'parquet') else 'labels from the first field'}")
    if args.valid and args.valid_fraction:
        raise BadInput(f"--valid {args.valid} and --valid-fraction {args.valid_fraction}: give one of them")
    if fmt == "npy" and args.valid and not args.valid_labels:
        raise BadInput(f"--valid {args.valid}: give its labels with --valid-labels FILE.npy")
    fraction = 0.0 if args.valid else (0.2 if args.valid_fraction is None else args.valid_fraction)
    label = args.label if fmt in ("csv", "parquet") else "label"
    src = Source(path=path, fmt=fmt, label=label, labels=Path(args.labels) if args.labels else None,
                 valid=Path(args.valid) if args.valid else None,
                 valid_labels=Path(args.valid_labels) if args.valid_labels else None,
                 valid_fraction=fraction, seed=args.seed)
    if fmt == "npy" and src.labels is None:
        raise BadInput("--from npy: give the labels with --labels FILE.npy (one per row)")
    categorical = tuple(c.strip() for c in args.categorical.split(",") if c.strip())
    return convert(src, Path(args.out), task=args.task or "auto", standardize=args.standardize,
                   categorical=categorical, fill=args.fill == "mean")


def _cmd_approve(args: argparse.Namespace) -> int:
    from fleetmpi.jobdir import JobDir, atomic_write_bytes
    jd = JobDir(resolve_job(args.job).job_dir)
    state = jd.read_state()
    pending = state.get("pending_approval")
    if not pending:
        raise BadInput(f"{jd.root}: no rescale is waiting for approval (status {state.get('status')})")
    if not (isinstance(pending, dict) and isinstance(pending.get("id"), str) and isinstance(pending.get("goto"), str)):
        raise BadInput(f"{jd.state_path}: pending_approval is {pending!r}; expected an object with id and goto")
    # The event first: the worker may act on the file the moment it appears.
    jd.event("approved", id=pending["id"], goto=pending["goto"], user=os.environ.get("USER", ""))
    atomic_write_bytes(jd.approval, json.dumps({"id": pending["id"], "user": os.environ.get("USER", "")}).encode())
    print(f"fleetmpi: approved rescale to {pending['goto']} ({pending['id']})", file=sys.stderr)
    return ExitCode.OK


def _cmd_events(args: argparse.Namespace) -> int:
    from fleetmpi.jobdir import JobDir
    jd = JobDir(resolve_job(args.job).job_dir)
    from fleetmpi.cli.watch import follow_events, format_event
    jd.read_state()
    if args.follow:
        follow_events(jd, args.json)
        return ExitCode.OK
    for ev in jd.read_events():
        print(json.dumps(ev) if args.json else format_event(ev))
    return ExitCode.OK
