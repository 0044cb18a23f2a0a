"""Local backend: each phase is ``mpiexec -n P python -m fleetmpi.engine.worker JOB_DIR``.

The launcher holds the job dir's lock (:mod:`fleetmpi.lock`) for the whole run, runs phases
until one ends with something other than a rescale, passes SIGTERM/SIGINT/SIGUSR2 on to the
ranks as what they were (they checkpoint and exit 4), and turns every exit into an event and
a one-line reason. Its ranks do not outlive it: mpiexec gets SIGTERM when the launcher dies
(PR_SET_PDEATHSIG), and the ranks watch the launcher's pid (:mod:`fleetmpi.engine.watchdog`).

A rescale overlaps the next phase's start-up with the running phase: as it starts a phase,
the launcher pre-starts the one phase its rules can go to (or, when several can, the one a
rule fired for, once it fired), whose ranks import, open the data, load kernels and
then wait (:mod:`fleetmpi.engine.standby`). When the old phase's mpiexec has ended with a
rescale to it and its ``phase_exit`` is recorded, the launcher says go; any other end calls
it off (it exits having written nothing) and is reported as ever. The pre-started ranks
share the lock's open file, as every phase's do. While they start up the machine runs both
phases' ranks (oversubscribed on a small one); once waiting they take no core.
``FLEETMPI_PRESTART``: ``next`` (default, as above), ``rule`` (only once a rule fired), ``off``.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import fleetmpi
from fleetmpi.engine import checkpoint
from fleetmpi.engine.standby import STANDBY_ENV, handover_path, write_handover
from fleetmpi.engine.watchdog import DRIVER_ENV, driver_token
from fleetmpi.errors import BadInput, ExitCode, disk_full, one_line
from fleetmpi.jobdir import JobDir
from fleetmpi.lock import LOCK_FD_ENV, JobLock
from fleetmpi.spec import Spec, check_local_fit


def find_mpiexec(spec: Spec) -> list[str]:
    """Return the mpiexec command: $FLEETMPI_MPIEXEC > spec > next to this Python > PATH."""
    choice = os.environ.get("FLEETMPI_MPIEXEC") or spec.scheduler.mpiexec
    if choice:
        found = shutil.which(choice)
        if not found:
            raise BadInput(f"mpiexec {choice!r} (from FLEETMPI_MPIEXEC or scheduler.mpiexec) is not an executable")
        return [found]
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("mpiexec")
    if not found:
        raise BadInput("no mpiexec found: `pip install mpich` (or fleetmpi[mpich]) puts one next to python, "
                       "or set FLEETMPI_MPIEXEC to your cluster's mpiexec")
    return [found]


def worker_env(progress: str | None = None, threads: int = 1) -> dict[str, str]:
    """Return the environment of a rank: ``threads`` numba kernel threads, one BLAS thread."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    # The phase's threads_per_rank decides, not the caller's environment: results do not
    # depend on it (fixed row chunks), only the speed and the cores a rank takes do.
    env["NUMBA_NUM_THREADS"] = str(threads)
    root = str(Path(fleetmpi.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if progress:
        env["FLEETMPI_PROGRESS"] = progress
    env.pop(LOCK_FD_ENV, None)   # a lock handed to this process is not the ranks' to take
    return env


PRESTART_ENV = "FLEETMPI_PRESTART"
PRESTART_MODES = ("next", "rule", "off")
CANCEL_WAIT_S = 10.0   # a called-off pre-started phase gets this long to end before it is killed


def prestart_mode() -> str:
    """Return $FLEETMPI_PRESTART (default ``next``); BadInput naming the valid values otherwise."""
    mode = os.environ.get(PRESTART_ENV, "") or "next"
    if mode not in PRESTART_MODES:
        raise BadInput(f"{PRESTART_ENV}={mode!r} is not valid; valid: {', '.join(PRESTART_MODES)}")
    return mode


def goto_targets(spec: Spec, phase: str) -> list[str]:
    """Return the phases the rules can move ``phase`` to, in rule order."""
    out: list[str] = []
    for rule in spec.fleet.rules:
        to = rule.then.goto
        if to and to != phase and (rule.phases is None or phase in rule.phases) and to not in out:
            out.append(to)
    return out


@dataclass
class _Started:
    """A phase's mpiexec and where its output goes (``token`` set while it is a pre-started one)."""

    proc: subprocess.Popen[bytes]
    phase: str
    log: Path
    out_from: int
    token: str = ""


class LocalBackend:
    """Run a job's phases one after another on this machine."""

    def __init__(self, jd: JobDir, spec: Spec, out: TextIO = sys.stderr,
                 on_started: Callable[[], object] | None = None) -> None:
        self.jd, self.spec, self.out = jd, spec, out
        # Called once the first phase's mpiexec (and its pre-started next phase) runs: the
        # CLI's bookkeeping then overlaps the ranks' start-up instead of delaying it.
        self._on_started = on_started
        self._proc: subprocess.Popen[bytes] | None = None
        self._standby: _Started | None = None     # the pre-started next phase, waiting for its word
        self._launch: tuple[list[str], str | None, int] = ([], None, 0)   # mpiexec, progress, running index
        self._prestart = "off"
        # (signal, how it was passed on, whether its event is written), for the main loop to say
        self._signals: list[tuple[int, str, bool]] = []
        self._lock: JobLock | None = None
        self._signals_seen: list[int] = []
        self._skipped: list[tuple[str, str]] = []     # checkpoint_skipped events of the phase starting
        self._errors: list[str] = []                  # the running phase's error events (their lines)

    def run(self) -> int:
        """Run phases until the goal, a failure or a stop; return the exit code."""
        mpiexec = find_mpiexec(self.spec)
        self._prestart = prestart_mode()
        check_local_fit(self.spec, source=str(self.jd.spec))
        progress = None
        if self.spec.monitor.progress == "auto":
            progress = "bar" if self.out.isatty() else "lines"
        with JobLock(self.jd, "fleetmpi run") as lock:
            self._lock = lock
            status = self.jd.read_state().get("status")
            if status not in ("NEW", None):   # recorded only once this run holds the job dir
                self.jd.event("resume_requested", status=status)
            for path, pid in checkpoint.remove_stale_temps(self.jd.ckpt):
                self.jd.event("temp_removed", path=str(path), pid=pid,
                              reason="left by a writer that was killed during a checkpoint write")
            prev = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)}
            try:
                return self._phases(mpiexec, progress)
            finally:
                self._call_off("the run ended")
                # The word file is the launcher's and lives as long as its run: a job dir
                # at rest holds none (and a refused resume leaves the job dir as it found it).
                handover_path(self.jd.root).unlink(missing_ok=True)
                for s, h in prev.items():
                    signal.signal(s, h)
                self._lock = None

    def _phases(self, mpiexec: list[str], progress: str | None) -> int:
        while True:
            state = self.jd.read_state()
            phase = state["phase"]
            if self._signals:
                name = _signame(self._signals[0][0])
                self._report_signals()
                self.jd.update_state(status="STOPPED", reason=f"stopped by {name}")
                self._say(f"fleetmpi: stopped by {name} before phase {phase} started; "
                          f"`fleetmpi run {self.jd.root}` resumes from the newest checkpoint")
                return ExitCode.STOPPED
            index = len(state.get("phases_run", []))
            self._launch = (mpiexec, progress, index)
            t0 = time.time()
            ready = self._standby if self._standby is not None and self._standby.phase == phase else None
            if ready is not None and ready.proc.poll() is not None:
                ready = None   # it ended while it waited (a signal, a crash): the phase starts afresh
            if ready is not None:
                # The old phase's mpiexec has ended and its phase_exit is recorded: the
                # pre-started ranks may now read its checkpoint and write.
                self._standby = None
                self.jd.event("handover", backend="local", phase=phase, ranks=self.spec.phase(phase).ranks,
                              log=str(ready.log))
                events_from = self._events_size()   # before the word: its phase_start comes after
                write_handover(self.jd.root, ready.token, True, f"phase {phase} starts")
                ready.token = ""
                started = ready
            else:
                self._call_off(f"the job goes on in phase {phase}")
                events_from = self._events_size()
                started = self._start(phase, index, progress, mpiexec)
            # Pre-start the one phase the rules can go to now, while this one starts up too:
            # waiting for this phase's phase_start measured 0.9-1.2 s per rescale instead of
            # 0.5-0.6 s on a quiet 2-core box (short phases leave no lead time after it).
            if self._prestart == "next":
                targets = goto_targets(self.spec, phase)
                if len(targets) == 1:   # several: wait for the rule that picks one
                    self._pre_start(targets[0])
            if self._on_started is not None:
                started_hook, self._on_started = self._on_started, None
                try:
                    started_hook()
                except Exception as e:   # mpiexec runs now: a failing record must not orphan its ranks
                    print(f"fleetmpi: warning: after mpiexec started: {one_line(e)}", file=sys.stderr)
            rc = self._follow(started, events_from, tee=progress != "bar")
            log = started.log
            self._report_signals()
            after = self.jd.read_state()
            code = ExitCode.of(rc)
            try:
                self.jd.event("phase_exit", phase=phase, exit_code=rc, seconds=round(time.time() - t0, 3),
                              meaning=code.meaning if code is not None else "killed or crashed")
            except OSError as e:
                full = disk_full(e, self.jd.root, checkpoint.newest_valid_path(self.jd.ckpt))
                if full is None:
                    raise
                # The ranks' own line said it if the log could take it; else say it here, once.
                if "no space left on" not in _tail(log):
                    self._say(f"fleetmpi: {full}")
                return ExitCode.FAILED
            if rc not in (0, ExitCode.RESCALE, ExitCode.STOPPED):
                self._say_lost_errors(started, tee=progress != "bar")
            if rc == ExitCode.RESCALE:
                if after["phase"] == phase:
                    self._say(f"fleetmpi: phase {phase} asked for a rescale but named no new phase; stopping")
                    return ExitCode.FAILED
                continue
            if code is None:
                self.jd.update_state(status="FAILED", reason=f"exit code {rc}")
                self._say(f"fleetmpi: phase {phase} failed with exit code {rc} ({_describe_rc(rc)}); "
                          f"log: {log}; `fleetmpi run {self.jd.root}` resumes from the newest checkpoint")
                return ExitCode.FAILED
            if rc in (ExitCode.FAILED, ExitCode.BAD_INPUT):
                self.jd.update_state(status="FAILED", reason=code.meaning)
            if rc == ExitCode.STOPPED and self._signals_seen:
                self.jd.update_state(reason=f"stopped by {_signame(self._signals_seen[0])}")
            return rc

    def _start(self, phase: str, index: int, progress: str | None, mpiexec: list[str],
               token: str = "") -> _Started:
        """Start phase ``phase``'s mpiexec as run ``index``; ``token``: as a pre-started phase.

        mpiexec writes to the log file, never to a pipe of ours: if this process dies, a
        pipe would break and hydra would die of SIGPIPE and kill the ranks mid-checkpoint.
        """
        ranks = self.spec.phase(phase).ranks
        cmd = [*mpiexec, "-n", str(ranks), *self.spec.scheduler.launcher_args,
               sys.executable, "-m", "fleetmpi.engine.worker", str(self.jd.root)]
        log = self.jd.phase_log(index, phase)
        self.jd.event("prestart" if token else "launch", backend="local", phase=phase, ranks=ranks, command=cmd,
                      log=str(log))
        env = worker_env(progress, self.spec.phase(phase).threads)
        env[DRIVER_ENV] = driver_token()
        if token:
            env[STANDBY_ENV] = f"{token}:{phase}"
        tee = progress != "bar"
        lock_fd = self._lock.fd if self._lock is not None else None
        with open(log, "ab") as logf:
            logf.write(f"$ {' '.join(cmd)}\n".encode())
            logf.flush()
            # The lock goes with mpiexec: ranks that outlive this process still hold the job dir.
            proc = subprocess.Popen(cmd, env=env, preexec_fn=_dies_with(os.getpid()),
                                    pass_fds=(lock_fd,) if lock_fd is not None else (),
                                    stdout=logf if tee else None, stderr=subprocess.STDOUT if tee else None)
            return _Started(proc, phase, log, logf.tell(), token)

    def _events_size(self) -> int:
        return self.jd.events.stat().st_size if self.jd.events.exists() else 0

    def _follow(self, started: _Started, events_from: int, tee: bool) -> int:
        """Wait for a started phase's mpiexec, reading events from ``events_from``; with ``tee``, copy
        its output from the log to ``out`` as it comes."""
        had_checkpoints = bool(checkpoint.list_checkpoints(self.jd.ckpt))
        self._errors = []
        self._proc = started.proc
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        with open(started.log, "rb") as follow:
            follow.seek(started.out_from)
            while True:
                rc = self._proc.poll()
                chunk = follow.read() if tee else b""
                if chunk:
                    self.out.write(decoder.decode(chunk))
                    self.out.flush()
                events_from = self._watch_events(events_from, had_checkpoints)
                self._report_signals()
                if rc is not None and not chunk:
                    return rc
                if not chunk:
                    try:   # returns as soon as mpiexec ends: no poll lag between phases
                        self._proc.wait(timeout=0.1)
                    except subprocess.TimeoutExpired:
                        pass

    def _watch_events(self, offset: int, had_checkpoints: bool) -> int:
        """Say on the terminal what only the events tell: a start from step 0 over corrupt checkpoints."""
        try:
            with open(self.jd.events, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return offset
        end = data.rfind(b"\n") + 1
        for line in data[:end].splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev.get("event") == "error" and isinstance(ev.get("message"), str):
                self._errors.append(ev["message"])
            elif ev.get("event") == "checkpoint_skipped":
                self._skipped.append((str(ev.get("path")), str(ev.get("reason"))))
            elif ev.get("event") == "phase_start" and ev.get("step") == 0 and had_checkpoints:
                note = checkpoint.restart_note(False, self._skipped)
                if note:
                    self._say(note)
                self._skipped = []
            elif ev.get("event") == "rule_fired" and str(ev.get("action", "")).startswith("goto "):
                if self._prestart != "off":
                    self._pre_start(str(ev["action"])[5:])
        return offset + end

    def _say_lost_errors(self, started: _Started, tee: bool) -> None:
        """Say the ranks' error lines of a failed phase that its output lacks, and add them to its log.

        A rank that fails alone prints its line and calls MPI_Abort; hydra can end before it
        has forwarded what the rank wrote last (CI saw exit 1 and no line). The ranks also
        record the line in events.jsonl, which ``_watch_events`` read while the phase ran. Only
        with the output tee'd: on a terminal (progress bar) this process cannot see what
        mpiexec showed.
        """
        if not tee or not self._errors:
            return
        shown = _read_from(started.log, started.out_from)
        lost = [m for m in dict.fromkeys(self._errors) if m not in shown]
        if not lost:
            return
        try:
            with open(started.log, "a", encoding="utf-8") as logf:
                logf.write("".join(f"{m}\n" for m in lost))
        except OSError:
            pass
        for m in lost:
            self._say(m)

    def _pre_start(self, phase: str) -> None:
        """Pre-start ``phase`` as the next one (a CPU phase only), calling off one for another phase."""
        if self._standby is not None:
            if self._standby.phase == phase:
                return
            self._call_off(f"a rule chose phase {phase}")
        if phase not in self.spec.fleet.phases or self.spec.phase(phase).device != "cpu":
            return   # a GPU phase would take the device while the old phase still holds it
        mpiexec, progress, index = self._launch
        self._standby = self._start(phase, index + 1, progress, mpiexec, token=uuid.uuid4().hex)

    def _call_off(self, reason: str) -> None:
        """End the pre-started phase, if any: its word says no, SIGTERM ends a start-up; no orphans."""
        sb, self._standby = self._standby, None
        if sb is None:
            return
        write_handover(self.jd.root, sb.token, False, reason)
        if sb.proc.poll() is None:
            sb.proc.send_signal(signal.SIGTERM)   # hydra forwards it; ranks still importing just end
        try:
            rc = sb.proc.wait(timeout=CANCEL_WAIT_S)
        except subprocess.TimeoutExpired:
            _kill_tree(sb.proc)
            rc = sb.proc.wait()
        self.jd.event("prestart_called_off", phase=sb.phase, reason=reason, exit_code=rc, log=str(sb.log))

    def _forward(self, signum: int, _frame: Any) -> None:
        # Runs between bytecodes of the main loop. The event is written here, before the
        # signal is passed on, so that events.jsonl has it ahead of what the ranks write
        # about it (their checkpoint, phase_exit); from the loop it could land after them.
        # jd.event is one os.write on a descriptor of its own: it cannot tear a line the
        # interrupted loop is writing. The terminal line waits for the loop (a stream write
        # here could re-enter one in progress), as does an event that could not be written.
        def record(how: str) -> None:
            try:
                self.jd.event("driver_signal", signal=_signame(signum), passed_on=how)
                self._signals.append((signum, how, True))
            except Exception:   # a full disk, say: the loop writes it, or says why not
                self._signals.append((signum, how, False))

        proc = self._proc
        if proc is not None and proc.poll() is None:
            _pass_on(proc, signum, record)
        else:
            record("none running")
        self._signals_seen.append(signum)

    def _report_signals(self) -> None:
        while self._signals:
            signum, how, written = self._signals.pop(0)
            name = _signame(signum)
            if not written:
                self.jd.event("driver_signal", signal=name, passed_on=how)
            self._say(f"fleetmpi: received {name}; " + (f"passed on ({how}): the ranks checkpoint and stop"
                                                        if how != "none running" else "no phase is running"))

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def _tail(path: Path, size: int = 8192) -> str:
    """Return the last ``size`` bytes of ``path`` as text ("" if unreadable)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _read_from(path: Path, start: int, limit: int = 4 << 20) -> str:
    """Return ``path``'s text from byte ``start`` on, its last ``limit`` bytes at most ("" if unreadable)."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            f.seek(max(start, end - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _pass_on(proc: subprocess.Popen[bytes], signum: int, announce: Callable[[str], None]) -> None:
    """Send ``signum`` to the ranks under mpiexec ``proc``, calling ``announce(how)`` just before."""
    if signum != signal.SIGUSR2:
        # Hydra's mpiexec forwards SIGTERM and SIGINT to every rank as they are.
        announce(f"{_signame(signum)} to mpiexec, which forwards it")
        proc.send_signal(signum)
        return
    # Hydra dies on SIGUSR2 (killing the ranks), so it goes straight to the ranks, which
    # run on this host under mpiexec's proxies; before they exist, SIGTERM does the job.
    ranks = _ranks_under(proc.pid)
    if not ranks:
        announce("SIGTERM to mpiexec: no rank had started yet")
        proc.send_signal(signal.SIGTERM)
        return
    announce(f"SIGUSR2 to {len(ranks)} rank(s)")
    for pid in ranks:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _ranks_under(pid: int) -> list[int]:
    import psutil
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    found = []
    for k in kids:
        try:
            if "fleetmpi.engine.worker" in k.cmdline():
                found.append(k.pid)
        except psutil.Error:
            continue
    return found


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL mpiexec ``proc`` and every process under it (ranks included)."""
    import psutil
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        kids = []
    for p in [*kids, proc]:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _dies_with(parent: int) -> Callable[[], None] | None:
    """Return a preexec function that makes the child get SIGTERM when ``parent`` dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None   # the ranks' own watch on the driver pid still ends them
    prctl = ctypes.CDLL(None, use_errno=True).prctl   # resolved before fork: the child only calls it
    pr_set_pdeathsig = 1

    def preexec() -> None:
        # SIGTERM: hydra forwards it and the ranks checkpoint. The death signal follows the
        # thread that forked, so the launcher must run phases from one thread (it does).
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:   # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _describe_rc(rc: int) -> str:
    sig = rc - 128 if rc > 128 else (-rc if rc < 0 else rc)
    try:
        return f"a rank ended by {signal.Signals(sig).name}"
    except ValueError:
        return "a rank crashed"
