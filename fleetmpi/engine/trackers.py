"""Experiment trackers fed by rank 0's monitor: TensorBoard event files and MLflow.

Both are optional extras (``pip install 'fleetmpi[tensorboard]'`` / ``'fleetmpi[mlflow]'``).
Every call is queued to one background thread, so a slow tracker (a remote MLflow server)
never holds a training step up, and any error (a missing package, a refused write, a server
down) becomes one warning line and turns that tracker off for the rest of the phase:
tracking never fails a run.

TensorBoard: one run dir per job, ``JOB_DIR/tensorboard/NAME``; each phase (a new process)
adds an event file there, and ``tensorboard --logdir JOB_DIR/tensorboard`` reads them as one
run. Scalars per logged step (tag = the metrics.jsonl field: loss, valid_loss, ranks, ...),
phases and rescales as text summaries under the tag ``fleet``.

MLflow: one run per job. Its id is kept in state.json (``mlflow_run_id``) so later phases,
which are new processes, log to the same run. Params are the spec, flattened
(``optimizer.lr``); each phase start is a tag ``phase.N`` and each rescale ``rescale.N``;
model.h5 is logged as an artifact when the run ends.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fleetmpi.jobdir import JobDir
from fleetmpi.spec import Spec

# Fields of a metrics.jsonl record that are not metrics (identifiers, fingerprints, clocks).
NOT_METRICS = frozenset({"step", "cursor", "batch_fp", "t", "eval", "phase", "optimizer"})
CLOSE_WAIT_S = 30.0   # how long the end of a phase waits for queued tracker calls


def numeric_metrics(rec: dict[str, Any]) -> dict[str, float]:
    """Return the finite numeric fields of a metrics record, by name (NaN/inf and non-numbers left out)."""
    out: dict[str, float] = {}
    for k, v in rec.items():
        if k in NOT_METRICS or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


def flat_params(spec: Spec) -> dict[str, str]:
    """Return the spec as flat ``section.key`` -> text pairs (MLflow params)."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                if not str(k).startswith("_"):
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
        elif v is not None:
            out[prefix] = str(v)[:6000]   # MLflow's limit on a param's value

    walk("", _plain(spec))
    return out


def _plain(v: Any) -> Any:
    """Return a spec value as dicts and lists (dataclasses, read-only mappings and tuples included)."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


class _Tracker:
    name = "tracker"

    def scalars(self, step: int, values: dict[str, float]) -> None: ...
    def note(self, key: str, text: str, step: int) -> None: ...
    def finish(self, outcome: dict[str, Any], model: Path | None) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker(_Tracker):
    name = "tensorboard"

    def __init__(self, jd: JobDir, spec: Spec) -> None:
        from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self._pb = (summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2)
        self._Event = Event
        self.logdir = jd.root / "tensorboard" / spec.name
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._w = EventFileWriter(str(self.logdir), flush_secs=5)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        summary_pb2 = self._pb[0]
        s = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
        self._w.add_event(self._Event(wall_time=time.time(), step=step, summary=s))

    def note(self, key: str, text: str, step: int) -> None:
        summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2 = self._pb
        meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="text"))
        tensor = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[text.encode()],
                                        tensor_shape=tensor_shape_pb2.TensorShapeProto())
        s = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="fleet", metadata=meta, tensor=tensor)])
        self._w.add_event(self._Event(wall_time=time.time(), step=step, summary=s))

    def finish(self, outcome: dict[str, Any], model: Path | None) -> None:
        self.note("outcome", f"{outcome.get('outcome')}: {outcome.get('reason')}", int(outcome.get("step", 0)))

    def close(self) -> None:
        self._w.close()


class MlflowTracker(_Tracker):
    name = "mlflow"

    def __init__(self, jd: JobDir, spec: Spec, run_id: str | None, keep_run_id: Callable[[str], None]) -> None:
        from mlflow.tracking import MlflowClient
        cfg = spec.monitor.mlflow
        assert cfg is not None
        self.uri = cfg.tracking_uri or (jd.root / "mlruns").resolve().as_uri()
        if self.uri.startswith("file:") or "://" not in self.uri:
            # MLflow 3 refuses its file store unless asked for it; the job dir's own store is the
            # point of the default (no server, no database package), so ask (this rank only).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=self.uri)
        if run_id is None:
            name = cfg.experiment or spec.name
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run = self.client.create_run(exp_id, run_name=jd.root.name,
                                         tags={"fleetmpi.job_dir": str(jd.root.resolve())})
            run_id = run.info.run_id
            keep_run_id(run_id)
            from mlflow.entities import Param
            params = [Param(k, v) for k, v in flat_params(spec).items()]
            for i in range(0, len(params), 100):   # MLflow takes at most 100 params a batch
                self.client.log_batch(run_id, params=params[i:i + 100])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def scalars(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric
        ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def note(self, key: str, text: str, step: int) -> None:
        self.client.set_tag(self.run_id, key, text)

    def finish(self, outcome: dict[str, Any], model: Path | None) -> None:
        for k in ("outcome", "reason", "target_met"):
            self.client.set_tag(self.run_id, f"fleetmpi.{k}", str(outcome.get(k)))
        if model is not None and model.exists():
            self.client.log_artifact(self.run_id, str(model))
        self.client.set_terminated(self.run_id, "FINISHED")

    def close(self) -> None:
        pass


# Warnings raised inside the trackers' libraries (MLflow's file-store notices, urllib3's missing
# SOCKS extra, ...) are noise on the user's terminal. Filtered by the module they come from, once,
# process-wide (catch_warnings is not thread-safe, and this runs on a background thread).
TRACKER_MODULES = (r"(fleetmpi\.engine\.trackers|mlflow|tensorboard|urllib3|requests|google|pydantic|databricks"
                   r"|opentelemetry|absl)(\.|$)")


def _silence_tracker_warnings() -> None:
    warnings.filterwarnings("ignore", module=TRACKER_MODULES)


class Trackers:
    """The trackers a spec asks for, driven from rank 0's monitor through one background thread."""

    def __init__(self, jd: JobDir, spec: Spec, *, phase: str, ranks: int, step: int, say: Callable[[str], None]) -> None:
        self.jd, self.spec, self.say = jd, spec, say
        self.live: list[_Tracker] = []
        self._state: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._q: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._phases, self._run_id = 0, None
        self._thread: threading.Thread | None = None
        if spec.monitor.tensorboard or spec.monitor.mlflow is not None:
            state = jd.read_state()
            self._phases, self._run_id = len(state.get("phases_run", [])), state.get("mlflow_run_id")
            self._thread = threading.Thread(target=self._work, name="fleetmpi-trackers", daemon=True)
            self._thread.start()
            self._q.put(("_open", ()))
            self.note("phase", f"phase {phase} on {ranks} rank(s) from step {step}", step)

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    # -- called by the monitor (never blocks: queued) -------------------------------------
    def scalars(self, step: int, rec: dict[str, Any]) -> None:
        if self._thread is not None:
            self._q.put(("scalars", (step, numeric_metrics(rec))))

    def note(self, kind: str, text: str, step: int) -> None:
        """Record a phase start or rescale (kind "phase" or "rescale") as a text summary / tag."""
        if self._thread is not None:
            self._q.put(("note", (kind, text, step)))

    def finish(self, outcome: dict[str, Any], model: Path | None) -> None:
        if self._thread is not None:
            self._q.put(("finish", (outcome, model)))

    def take_state(self) -> dict[str, Any]:
        """Return (once) the fields the trackers want kept in state.json; the caller writes them."""
        with self._lock:
            out, self._state = self._state, {}
        return out

    def close(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Flush and close every tracker, waiting at most ``wait_s`` seconds (then warn and go on)."""
        if self._thread is None:
            return
        self._q.put(None)
        self._thread.join(wait_s)
        if self._thread.is_alive():
            self.say(f"fleetmpi: warning: trackers still busy after {wait_s:.0f} s; not waiting for them")
        self._thread = None

    # -- the background thread ------------------------------------------------------------------
    def _work(self) -> None:
        counters = {"phase": self._phases, "rescale": 0}
        while True:
            item = self._q.get()
            if item is None:
                for t in list(self.live):
                    self._call(t, "close", ())
                return
            what, args = item
            if what == "_open":
                self._open()
                continue
            if what == "note":
                kind, text, step = args
                n = counters.get(kind, 0) if kind == "phase" else self._count_rescales()
                counters[kind] = n + 1
                args = (f"{kind}.{n}" if kind in ("phase", "rescale") else kind, text, step)
            for t in list(self.live):
                self._call(t, what, args)

    def _count_rescales(self) -> int:
        return sum(1 for e in self.jd.read_events() if e.get("event") == "rescale") - 1

    def _call(self, t: _Tracker, what: str, args: tuple[Any, ...]) -> None:
        try:
            getattr(t, what)(*args)
        except Exception as e:  # a tracker must never fail training
            self.live.remove(t)
            self.say(f"fleetmpi: warning: {t.name} tracking off for this phase: {type(e).__name__}: {e}")

    def _open(self) -> None:
        _silence_tracker_warnings()
        m = self.spec.monitor
        if m.tensorboard:
            try:
                self.live.append(TensorBoardTracker(self.jd, self.spec))
            except ImportError:
                self.say("fleetmpi: warning: monitor.tensorboard is on but the tensorboard package is missing; "
                         "install it with `pip install 'fleetmpi[tensorboard]'` (training goes on without it)")
            except Exception as e:  # reported, never raised
                self.say(f"fleetmpi: warning: tensorboard tracking off: {type(e).__name__}: {e}")
        if m.mlflow is not None:
            def keep(run_id: str) -> None:
                with self._lock:
                    self._state["mlflow_run_id"] = run_id
            try:
                self.live.append(MlflowTracker(self.jd, self.spec, self._run_id, keep))
            except ImportError:
                self.say("fleetmpi: warning: monitor.mlflow is set but mlflow is missing; install it with "
                         "`pip install 'fleetmpi[mlflow]'` (training goes on without it)")
            except Exception as e:  # reported, never raised
                self.say(f"fleetmpi: warning: mlflow tracking off: {type(e).__name__}: {e}")
