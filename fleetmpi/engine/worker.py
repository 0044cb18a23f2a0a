"""The rank main loop: batch -> kernel -> sync -> step -> monitor, one training phase.

Run as ``python -m fleetmpi.engine.worker JOB_DIR`` under mpiexec or srun. Exit codes as in
docs/architecture.md (``fleetmpi.errors.ExitCode``): 0 ended with the model written, 1 failure,
2 bad input, 3 rescale, 4 stopped by a signal after a checkpoint, 5 target not met under
``goal.require_target`` (the model is written all the same). Any rank's unexpected exception aborts
the whole world with rank/size@host. A step is the technique's
(``fleetmpi.engine.technique``): this loop knows none of them by name.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # A rank's start-up makes some 110k long-lived objects (numpy, numba, llvmlite, h5py), and the
    # cyclic collector went over them again and again while they were made: 50-60 ms of a rank's
    # 0.55-0.6 CPU-s, which 4 ranks on 2 cores wait for in sum. Off until the kernels are loaded
    # (fleetmpi.engine.trainer.gc_after_startup); the few cycles made meanwhile (~1300 objects) stay.
    gc.disable()

import contextlib
import math
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from enum import IntEnum
from typing import Any

import numpy as np

from fleetmpi.engine.checkpoint import newest_valid_path
from fleetmpi.engine.rank_end import abort_world, exit_now, fail
from fleetmpi.engine.standby import STANDBY_ENV, Cancelled, Standby, await_go
from fleetmpi.engine.standby import from_env as standby_from_env
from fleetmpi.engine.technique import TECHNIQUES, StepRecord
from fleetmpi.engine.trainer import Trainer, gc_after_startup
from fleetmpi.errors import BadInput, DiskFull, ExitCode, TrainingFailed, disk_full
from fleetmpi.jobdir import JobDir
from fleetmpi.launch.slurm.script import say_mpi_up, say_up, step_try
from kernels import lean_numba_start


class Decision(IntEnum):
    """What rank 0 decided at an evaluation point; broadcast with one integer argument."""

    CONTINUE = 0
    GOAL = 1      # write the model and end the phase
    GOTO = 2      # argument: index of the next phase in fleet.phases
    SWITCH = 3    # argument: index of the technique in TECHNIQUES
    STOP = 4      # a stop rule fired: checkpoint, then end as at the goal
    FAIL = 5      # rank 0 could not write the job dir (disk full): every rank ends with its line


def open_trainer(comm: Any, jd: JobDir, standby: Standby | None = None,
                 stopped: Callable[[], bool] = lambda: False, marks: dict[str, float] | None = None) -> Trainer:
    """Return this rank's trainer for the job's phase on the device the phase asks for (collective).

    The spec is loaded here, once per rank. ``device: gpu`` or ``auto`` resolve through
    ``fleetmpi.engine.device.choose`` (every rank alike); a GPU phase gets a ``GpuTrainer``,
    which imports numba.cuda only then. A pre-started phase (``standby``, CPU phases only)
    opens its data and kernels, then waits for the launcher's word before it reads the job's
    state and checkpoint (:mod:`fleetmpi.engine.standby`; Cancelled if called off); ``marks``
    gets when it began to wait and when the word came.
    """
    from fleetmpi import spec as specmod
    sp = specmod.load(jd.spec)
    if standby is not None:
        if standby.phase not in sp.fleet.phases or sp.fleet.phases[standby.phase].device != "cpu":
            raise BadInput(f"{STANDBY_ENV}: phase {standby.phase!r} is not a CPU phase of {jd.spec}; "
                           f"only those are pre-started")

        marks = {} if marks is None else marks

        def ready() -> dict[str, Any]:
            marks["standby_ready"] = time.time()
            state = await_go(comm, jd.root, standby, stopped, jd.read_state)
            marks["go"] = time.time()
            return state

        return Trainer(comm, jd, sp, {"phase": standby.phase}, ready=ready)
    state = jd.read_state()
    phase = str(state.get("phase"))
    setting = sp.fleet.phases[phase].device if phase in sp.fleet.phases else "cpu"
    if setting == "cpu":
        return Trainer(comm, jd, sp, state)
    from fleetmpi.engine import device
    # The GPU MLP kernels are softmax ones: a regression MLP is named apart, so it is refused there.
    kind = "mlp (task regression)" if sp.model.kind == "mlp" and sp.model.task == "regression" else sp.model.kind
    dev = device.choose(comm, phase, setting, kind, sp.sync.kind, sp.optimizer.kind)
    if dev.kind == "gpu":
        from fleetmpi.engine.gpu import GpuTrainer
        return GpuTrainer(comm, jd, sp, state, dev)
    return Trainer(comm, jd, sp, state, dev.describe())


class Phase:
    """Run one phase to its end; return the exit code."""

    def __init__(self, comm: Any, jd: JobDir) -> None:
        self.comm, self.jd = comm, jd
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.goal_reason = "goal"   # set by _decide on rank 0
        self.solved = False         # the last step's technique reported its fit solved
        self.ended_by = "budget"    # target | budget | patience | stop rule (rank 0)
        self.hit: list[str] = []    # the targets met (rank 0)
        self.disk_error: str | None = None  # rank 0: the line of a write the disk refused, told at the next decision
        self.marks: dict[str, float] = {}   # start-up timestamps (s since the epoch) for phase_start
        self.cpu_ready = 0.0                # process CPU seconds when the kernels were loaded (rank 0 records it)

    def run(self) -> int:
        """Start the phase on every rank, then train until a decision ends it; return the exit code."""
        # Before start-up (data, checkpoint, kernel load): a signal that comes early waits for
        # the first step and a checkpoint instead of killing a rank.
        self.stop_flag = {"n": 0}

        def on_signal(signum: int, _frame: Any) -> None:
            self.stop_flag["n"] = signum

        for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            signal.signal(s, on_signal)
        from fleetmpi.engine.watchdog import watch_parent
        watch_parent()   # SIGTERM to this rank if the local driver dies (no-op elsewhere)
        standby = standby_from_env()
        try:
            t = open_trainer(self.comm, self.jd, standby, stopped=lambda: bool(self.stop_flag["n"]), marks=self.marks)
        except Cancelled:
            # Called off before it read or wrote anything of the job: by a signal, the
            # phase stopped (4); by the launcher (the old phase ended otherwise), nothing to say.
            return ExitCode.STOPPED if self.stop_flag["n"] else ExitCode.OK
        self.marks["trainer_open"] = time.time()
        mon = self._start(t)
        return self._loop(t, mon)

    def _start(self, t: Trainer) -> Any:
        """Warm the model's kernels; on rank 0 record the phase's start and return its Monitor (None elsewhere)."""
        sp, jd = t.spec, self.jd
        cold = False
        if not t.kernels_warmed:   # a pre-started phase loaded them while it waited
            cold = cold_kernels()
            if cold and self.rank == 0:
                # Precompiled at install, so only a cold cache (a new checkout, NUMBA_CACHE_DIR, a numba
                # upgrade) compiles here: say so instead of pausing silently for seconds.
                print("fleetmpi: compiling kernels (first run only)", file=sys.stderr, flush=True)
            t.warm_kernels()
        gc_after_startup()
        self.marks["kernels_ready"] = time.time()
        # This rank's CPU seconds from its process start to here: with more ranks than cores,
        # start-up takes the sum of the ranks' CPU time, not the slowest one's wall time.
        self.cpu_ready = time.process_time()
        hosts = self.comm.gather(socket.gethostname(), root=0)
        if self.rank != 0:
            return None
        say_up()   # every rank is up, and nothing is written yet (the Slurm script's retry)
        from fleetmpi.engine.monitor import Monitor
        from fleetmpi.rules import parse_condition
        self.conditions = [parse_condition(r.when) for r in sp.fleet.rules]
        progress = _progress_mode(sp.monitor.progress)
        mon = Monitor(jd, sp, t.phase_name, self.size, t.n, t.carried, t.job_start, progress,
                      idle_nodes=_idle_nodes(sp), start_step=t.step, start_epoch=t.samples_seen / t.n)
        state = jd.read_state()
        runs = state.get("phases_run", [])
        runs.append({"phase": t.phase_name, "ranks": self.size, "start": time.time(), "step": t.step,
                     "slurm_job_id": os.environ.get("SLURM_JOB_ID")})
        jd.update_state(status="RUNNING", phases_run=runs)
        for path, why in t.skipped:
            # Keep the bytes for a post-mortem, but out of the step-*.h5 namespace so
            # that pruning counts only good checkpoints.
            aside = f"{path}.corrupt"
            os.replace(path, aside)
            jd.event("checkpoint_skipped", path=path, moved_to=aside, reason=why)
        if t.resumed_from:
            jd.event("resume", checkpoint=t.resumed_from, step=t.step, phase=t.phase_name)
        retried = step_try()
        jd.event("phase_start", phase=t.phase_name, ranks=self.size, hosts=sorted(set(hosts)),
                 step=t.step, optimizer=t.optimizer, shape=sp.phase(t.phase_name).shape(), device=t.device,
                 startup=_startup_marks(self.marks), startup_cpu_s=round(self.cpu_ready, 3), compiled_kernels=cold,
                 **retried)
        mon.say(f"fleetmpi: phase {t.phase_name} on {self.size} rank(s) "
                f"({', '.join(sorted(set(hosts)))}), step {t.step}, optimizer {t.optimizer}"
                + (f", resumed from {os.path.basename(t.resumed_from)}" if t.resumed_from else "")
                + f", device {t.device_detail}")
        for note in t.notes:
            mon.say(f"fleetmpi: note: {note}")
        if retried:
            why = (f"were not all through MPI_Init after {retried['retried_after_mpi_init_s']} s"
                   if "retried_after_mpi_init_s" in retried else
                   f"ended with exit code {retried['retried_after_exit_code']} before all of them were up")
            mon.say(f"fleetmpi: note: step started again (try {retried['step_try']}): the ranks of the try before {why}")
        return mon

    def _loop(self, t: Trainer, mon: Any) -> int:
        """Step until the goal, a rescale, a stop rule or a signal; return the exit code (collective)."""
        import psutil
        sp, jd = t.spec, self.jd
        proc = psutil.Process()
        goal, ev = sp.goal, sp.monitor.eval_every_steps
        fault = _test_fault(self.rank)
        first_step = True
        decision = np.zeros(2, dtype=np.int64)
        if _budget_spent(goal, t.step, t.samples_seen / t.n):
            # Resumed with nothing left (stopped after its last step, or only patience was raised):
            # judge the goal at this step rather than take one past the budget.
            return self._at_evaluation(t, mon, proc, decision, budget_done=True)
        while True:
            t.stop_signal = 1 if self.stop_flag["n"] else 0   # summed over ranks: a count, not a number
            rec: StepRecord = t.train_step()
            t.step += 1
            if fault is not None and t.step == fault:
                raise RuntimeError(f"injected fault at step {t.step} (FLEETMPI_TEST_FAULT)")
            if first_step and self.rank == 0:
                with self._disk_guard():
                    jd.event("first_step", phase=t.phase_name, step=t.step)
                first_step = False
            if not math.isfinite(rec.loss):
                raise TrainingFailed(f"training loss is {rec.loss} at step {t.step} (phase {t.phase_name}); "
                                     f"lower optimizer.lr or raise model.l2")
            epoch = t.samples_seen / t.n
            if mon is not None:
                try:   # not _disk_guard: a generator context costs ~1 us a step, a try nothing
                    mon.step(rec, step=t.step, epoch=epoch, optimizer=t.optimizer)
                except OSError as e:
                    self._disk_refused(e)
            if rec.signal:
                return self._stopped(t, mon, self.stop_flag["n"])
            self.solved = rec.solved
            budget_done = _budget_spent(goal, t.step, epoch) or rec.solved
            if t.step % ev == 0 or budget_done:
                code = self._at_evaluation(t, mon, proc, decision, budget_done)
                if code is not None:
                    return code
            if t.step % sp.checkpoint.every_steps == 0:
                t.checkpoint("schedule", mon.summary() if mon else {})

    def _at_evaluation(self, t: Trainer, mon: Any, proc: Any, decision: np.ndarray, budget_done: bool) -> Any:
        """Evaluate, decide on rank 0 and act on it; return the phase's exit code, or None to go on (collective)."""
        valid = t.evaluate()
        util = t.utilisation(proc)
        if mon is not None:
            metrics = mon.evaluated(valid, util)
            with self._disk_guard():
                decision[:] = self._decide(t, metrics, budget_done, mon)
            if self.disk_error is not None:
                decision[:] = (Decision.FAIL, 0)
        self.comm.Bcast(decision, root=0)
        code, arg = Decision(int(decision[0])), int(decision[1])
        if code == Decision.FAIL:
            raise DiskFull(self.comm.bcast(self.disk_error, root=0))
        if code == Decision.GOAL:
            return self._goal(t, mon)
        if code == Decision.STOP:
            t.checkpoint("stop rule", mon.summary() if mon else {})
            return self._goal(t, mon)
        if code == Decision.SWITCH:
            t.switch(list(TECHNIQUES)[arg])
        if code == Decision.GOTO:
            return self._rescale(t, mon, list(t.spec.fleet.phases)[arg])
        return None

    def _judge_best(self, t: Trainer, mon: Any, metrics: dict[str, float]) -> None:
        """Count the evaluation for patience; on a better valid_loss write best.h5 (keep_best, rank 0)."""
        if mon.judge_valid(t.step, t.spec.goal.min_delta) and t.spec.keep_best:
            t.write_model(metrics, t.best_path, best=True)
            self.jd.event("best", step=t.step, valid_loss=metrics.get("valid_loss"), path=str(t.best_path))

    def _decide(self, t: Trainer, metrics: dict[str, float], budget_done: bool,
                mon: Any = None) -> tuple[Decision, int]:
        """Judge goal, early stopping, approvals and rules on rank 0; return (decision, argument)."""
        sp, jd = t.spec, self.jd
        goal = sp.goal
        reached = [
            ("loss_below", goal.loss_below is not None and metrics["loss"] < goal.loss_below),
            ("valid_loss_below", goal.valid_loss_below is not None
             and metrics.get("valid_loss", np.inf) < goal.valid_loss_below),
            ("valid_accuracy_above", goal.valid_accuracy_above is not None
             and metrics.get("valid_accuracy", -1.0) > goal.valid_accuracy_above),
        ]
        hit = [name for name, ok in reached if ok]
        if "valid_loss" in metrics and mon is not None:
            self._judge_best(t, mon, metrics)
        patience_out = goal.patience is not None and mon is not None and mon.evals_since_best >= goal.patience
        if hit or patience_out or budget_done:
            self.hit = hit
            self.ended_by = ("target" if hit else "patience" if patience_out else "solved" if self.solved
                             else "budget")
            self.goal_reason = ", ".join(hit) if hit else self.ended_by
            return Decision.GOAL, 0
        phases = list(sp.fleet.phases)
        if t.pending is not None:
            approval = _read_json(jd.approval)
            if approval and approval.get("id") == t.pending["id"]:
                jd.event("approval_used", id=t.pending["id"], goto=t.pending["goto"])
                return Decision.GOTO, phases.index(t.pending["goto"])
        for i, (rule, cond) in enumerate(zip(sp.fleet.rules, self.conditions)):
            if rule.phases is not None and t.phase_name not in rule.phases:
                continue
            act = rule.then
            if act.goto == t.phase_name or (act.optimizer and (act.optimizer == t.optimizer or i in t.fired)):
                continue
            if t.pending is not None and act.goto == t.pending["goto"]:
                continue
            if not cond.holds(metrics):
                continue
            used = {k: metrics.get(k) for k in sorted(cond.metrics_used())}
            jd.event("rule_fired", rule=i, when=rule.when, action=act.describe(), phase=t.phase_name,
                     step=t.step, metrics=used)
            if act.goto:
                if sp.fleet.approval == "manual":
                    t.pending = {"id": f"{t.phase_name}-{t.step}-r{i}", "goto": act.goto, "rule": i,
                                 "step": t.step}
                    jd.update_state(pending_approval=t.pending)
                    jd.event("approval_pending", **t.pending)
                    # Training goes on in this phase meanwhile; say so where the user looks, once.
                    line = (f"fleetmpi: rule {i} wants a rescale {t.phase_name} -> {act.goto} at step {t.step}; "
                            f"training goes on in phase {t.phase_name} until approved: fleetmpi approve {jd.root}")
                    if mon is not None:
                        mon.say(line)   # above the progress bar, not through it
                    else:
                        print(line, file=sys.stderr, flush=True)
                    continue
                return Decision.GOTO, phases.index(act.goto)
            if act.optimizer:
                t.fired.add(i)
                jd.event("optimizer_switch", step=t.step, **{"from": t.optimizer, "to": act.optimizer})
                return Decision.SWITCH, list(TECHNIQUES).index(act.optimizer)
            self.goal_reason = f"stop rule {i}: {rule.when}"
            self.ended_by, self.hit = "stop rule", []
            return Decision.STOP, 0
        return Decision.CONTINUE, 0

    def _goal(self, t: Trainer, mon: Any) -> int:
        """End the run: checkpoint (so a raised budget can continue), write model.h5, say the outcome (collective)."""
        if t.checkpointed_step != t.step:
            t.checkpoint("end", mon.summary() if mon else {})
        code = ExitCode.OK
        if self.rank == 0 and self.disk_error is None:
            with self._disk_guard():
                code = self._goal_root(t, mon)
        self._sync_disk()
        return int(self.comm.bcast(int(code), root=0))

    def _goal_root(self, t: Trainer, mon: Any) -> ExitCode:
        """Write model.h5, the goal event and state; say the outcome; return the exit code (rank 0)."""
        code = ExitCode.OK
        from fleetmpi.engine.monitor import outcome
        sp = t.spec
        metrics = mon.metrics()
        use_best = sp.keep_best and not self.hit
        model_step = t.write_final_model(metrics, mon.best_valid_step, use_best)
        budget = ", ".join(f"{k} {_fmt(v)}" for k, v in (("max_steps", sp.goal.max_steps),
                                                        ("max_epochs", sp.goal.max_epochs)) if v is not None)
        out = outcome(sp.goal, ended_by=self.ended_by, hit=self.hit, metrics=metrics, step=t.step,
                      budget=budget, best_step=mon.best_valid_step, best=mon.best_valid, model_step=model_step,
                      model_name=self.jd.model.name, stop=self.goal_reason if self.ended_by == "stop rule" else "")
        if sp.goal.require_target and out["target_met"] is False:
            code = ExitCode.TARGET_MISSED
        out["exit_code"] = int(code)
        self.jd.event("goal", step=t.step, epoch=t.samples_seen / t.n, model=str(self.jd.model),
                      loss=out["metrics"].get("loss"), valid_loss=out["metrics"].get("valid_loss"), **out)
        self.jd.update_state(status="COMPLETED", reason=out["reason"], outcome=out, pending_approval=None)
        # The bar is closed first, so the outcome line stands below it, not inside it.
        mon.end(f"fleetmpi: {out['reason']}" + (f"; model written to {self.jd.model}" if self.hit
                                                 else f" ({self.jd.model})"), outcome=out, model=self.jd.model)
        return code

    def _rescale(self, t: Trainer, mon: Any, target: str) -> int:
        t.checkpoint(f"rescale to {target}", mon.summary() if mon else {})
        if self.rank == 0:
            self._rescale_root(t, mon, target)
        self._sync_disk()
        return ExitCode.RESCALE

    def _rescale_root(self, t: Trainer, mon: Any, target: str) -> None:
        """Record the rescale and name the next phase in state.json (rank 0)."""
        with self._disk_guard():
            sp = t.spec
            to = sp.phase(target)
            self.jd.event("rescale", step=t.step, **{"from": t.phase_name, "to": target},
                          from_ranks=self.size, to_ranks=to.ranks, shape=to.shape())
            if t.pending is not None:
                self.jd.approval.unlink(missing_ok=True)
            self.jd.update_state(phase=target, status="RESCALING", pending_approval=None)
        if sp.scheduler.backend == "slurm" and os.environ.get("SLURM_JOB_ID"):
            # Off the critical path: Slurm's scheduling pass and the next batch shell's start
            # overlap this phase's exit; a failure only loses that head start.
            from fleetmpi.launch.slurm.batch import submit_ahead
            submit_ahead(self.jd, sp, target)
        what = f"{t.phase_name} x{self.size} -> {target} x{to.ranks} at step {t.step}"
        mon.end(f"fleetmpi: rescale {what}", rescale=what)

    def _stopped(self, t: Trainer, mon: Any, signum: int) -> int:
        """Checkpoint and end the phase after a signal (``signum`` 0: it reached another rank)."""
        name = signal.Signals(signum).name if signum else "a signal on another rank"
        t.checkpoint(f"signal {name}", mon.summary() if mon else {})
        if self.rank == 0:
            with self._disk_guard():
                self.jd.event("signal", signal=name, step=t.step)
                self.jd.update_state(status="STOPPED")
            mon.end(f"fleetmpi: stopped by {name} at step {t.step} after a checkpoint")
        self._sync_disk()
        return ExitCode.STOPPED

    # -- a full disk: rank 0's writes refused, told to every rank at the next collective -----
    @contextlib.contextmanager
    def _disk_guard(self) -> Iterator[None]:
        """Run rank 0's writes; a full disk's error is kept (first one) for the next collective, not raised."""
        try:
            yield
        except OSError as e:
            self._disk_refused(e)

    def _disk_refused(self, e: OSError) -> None:
        """Keep a full disk's error (the first) for the next collective; raise any other."""
        full = disk_full(e, self.jd.root, newest_valid_path(self.jd.ckpt))
        if full is None:
            raise e
        self.disk_error = self.disk_error or full

    def _sync_disk(self) -> None:
        """Tell every rank whether rank 0's writes were refused; end all of them alike if so (collective)."""
        err = self.comm.bcast(self.disk_error, root=0)
        if err is not None:
            raise DiskFull(err)


def _fmt(v: float) -> str:
    return f"{v:g}"


def _startup_marks(marks: dict[str, float]) -> dict[str, float]:
    """Return rank 0's start-up timestamps (s since the epoch), process creation first.

    Read by bench/bench_rescale.py to split a rescale's start-up into launcher, interpreter
    and imports, MPI init, data and checkpoint open, and kernel load.
    """
    from fleetmpi.engine.watchdog import started_at
    marks = dict(marks)
    process = started_at()
    if process is not None:   # not Linux: the split starts at the worker's imports
        marks["process"] = process
    return marks


def _idle_nodes(sp: Any) -> Callable[[], dict[str, float]] | None:
    """Return the sampler of idle_nodes metrics when a rule reads them on Slurm, else None."""
    if sp.scheduler.backend != "slurm" or not any("idle_nodes" in r.when for r in sp.fleet.rules):
        return None
    # sinfo is asked at most every 30 s, and only here: the engine knows no scheduler otherwise.
    from fleetmpi.launch.slurm.cmd import IdleNodes
    return IdleNodes().metrics


def _test_fault(rank: int) -> int | None:
    """Return the step at which this rank raises, from FLEETMPI_TEST_FAULT='RANK:STEP'.

    A fault injector for tests: a Python exception on one chosen rank is a fault no real
    component produces on demand. Unset in normal runs.
    """
    spec = os.environ.get("FLEETMPI_TEST_FAULT")
    if not spec:
        return None
    r, _, step = spec.partition(":")
    return int(step) if int(r) == rank else None


def _read_json(path: Any) -> dict[str, Any] | None:
    import json
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def cold_kernels() -> bool:
    """Return whether numba's cache lacks a fresh compiled kernel of kernels.cpu, so that warm-up compiles.

    Reads each cached dispatcher's index the way numba does (missing, another numba version or a
    changed source all count as cold); anything unexpected in numba's internals counts as warm.
    """
    from numba.core.registry import CPUDispatcher

    from kernels import cpu
    try:
        for d in vars(cpu).values():
            if isinstance(d, CPUDispatcher) and getattr(d, "_cache", None) is not None:
                if not d._cache._cache_file._load_index():  # type: ignore[attr-defined]
                    return True
    except Exception:  # a guess about a pause must never stop a run
        return False
    return False


def _budget_spent(goal: Any, step: int, epoch: float) -> bool:
    """Return whether the goal's max_steps or max_epochs is reached at ``step`` / ``epoch``."""
    return ((goal.max_steps is not None and step >= goal.max_steps)
            or (goal.max_epochs is not None and epoch >= goal.max_epochs - 1e-12))


def _progress_mode(setting: str) -> str:
    env = os.environ.get("FLEETMPI_PROGRESS")
    if env in ("bar", "lines", "none"):
        return env
    if setting != "auto":
        return setting
    return "bar" if sys.stderr.isatty() else "lines"


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank; returns the phase exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m fleetmpi.engine.worker JOB_DIR", file=sys.stderr)
        return ExitCode.BAD_INPUT
    lean_numba_start()   # before the first kernel or data read loads numba's registries
    t_main = time.time()
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    debug = os.environ.get("FLEETMPI_DEBUG") == "1"
    jd = JobDir(argv[0])
    phase = Phase(comm, jd)
    try:
        say_mpi_up(comm)   # the Slurm script's deadline on MPI_Init
        phase.marks.update(imported=t_main, mpi_ready=time.time())
        code = phase.run()
        # The phase is over and its checkpoint or model is written: a stop signal now must
        # not kill the rank on its way out (at finalisation Python restores the default
        # handler of every signal it handled, but leaves ignored ones ignored).
        for s in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
            signal.signal(s, signal.SIG_IGN)
        return code
    except BadInput as e:
        return fail(comm, _events_to(phase), ExitCode.BAD_INPUT, f"fleetmpi: error: {e}", debug)
    except DiskFull as e:
        return fail(comm, _events_to(phase), ExitCode.FAILED, f"fleetmpi: {e}", debug)
    except TrainingFailed as e:
        return fail(comm, _events_to(phase), ExitCode.FAILED, f"fleetmpi: training failed: {e}", debug)
    except Exception as e:
        full = disk_full(e, jd.root, newest_valid_path(jd.ckpt))
        if full is not None:   # a write only this rank made: the others cannot be told, so the world ends
            return fail(comm, _events_to(phase), ExitCode.FAILED, f"fleetmpi: {full}", debug)
        if debug:
            traceback.print_exc()
        return abort_world(comm, _events_to(phase), ExitCode.FAILED, f"fleetmpi: {type(e).__name__}: {e}")


def _events_to(phase: Phase) -> JobDir | None:
    """Return the job dir a failure is recorded in: none for a pre-started phase before its word.

    Until the launcher said go, the phase still running is the job dir's only writer; the
    failure shows in this phase's own log, and the launcher starts the phase afresh.
    """
    return phase.jd if standby_from_env() is None or "go" in phase.marks else None


if __name__ == "__main__":
    exit_now(main())

