"""Render the sbatch script of one phase.

:func:`render_sbatch` is the one renderer: its keyword parameters are the sbatch options
fleetmpi sets, so valid keys, defaults and the error for an unknown key all come from its
signature (:data:`SBATCH_OPTIONS`). Every value is checked before it reaches an
``#SBATCH`` line (sbatch parses those itself, with its own quoting), and every value the
shell sees is ``shlex.quote``-d. sbatch runs in the job dir, so no ``#SBATCH`` line needs
the job dir's path, whatever characters it holds.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fleetmpi.schema import identifier, sbatch_extra_option

# Values sbatch reads from '#SBATCH' lines: nothing a shell or sbatch's own parser could split.
_COMMENT_RE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,200}$")
_GRES_ONE = r"[A-Za-z][A-Za-z0-9_]*(:[A-Za-z0-9_.-]+)?(:[0-9]+)?"
_GRES_RE = re.compile(rf"^{_GRES_ONE}(,{_GRES_ONE})*$")
_OUTPUT_RE = re.compile(r"^[A-Za-z0-9_.%][A-Za-z0-9_.%/-]*$")
RANKS_SIGNAL = {"srun": "USR2", "mpiexec": "TERM"}
# srun --wait: once one task has ended, the others get this long before srun kills them.
# Slurm's default (WaitTime=0) waits for ever, so a rank killed outright (the OOM killer, a
# native abort in MPI or UCX) left its peers spinning in a collective until the time limit,
# and the chain never learnt of it. A phase's ranks leave together: the last to exit after
# the first is rank 0 finishing its writes (model, events), seconds at most.
# scheduler.launcher_args come after it on the line, so a site can still pass its own --wait.
SRUN_WAIT_S = 60
# Starts of a phase's step when its ranks die of a signal before they are all up (the
# script's $up file): MPICH 5's PMI-2 client aborted in MPI_Init (SIGABRT after a malformed
# request, "mpi/pmi2: value not properly terminated" in slurmd's log) in 5 of the ~8,400
# tasks that the minicluster's slurmd logs record. Nothing was written then; a second
# start loses nothing.
STEP_TRIES = 2
# Ranks can also hang in MPI_Init: 4 ranks under srun --mpi=pmi2 sat 30 minutes in a read()
# inside libmpi, called from mpi4py's import, until scancel (the minicluster, once). A step
# whose ranks are not all through MPI_Init this long after it started is ended and counts
# as a death before start-up (started once more, or the chain ends as crashed). MPI start-up
# takes well under a second here and seconds at scale; $FLEETMPI_MPI_INIT_DEADLINE_S, read
# by the batch shell, changes it.
MPI_INIT_DEADLINE_S = 180
MPI_INIT_DEADLINE_ENV = "FLEETMPI_MPI_INIT_DEADLINE_S"
# The script's side of that contract with the ranks (read by the worker: ``say_up``,
# ``say_mpi_up``, ``step_try``).
UP_FILE_ENV = "FLEETMPI_UP_FILE"          # rank 0 creates it once every rank is up
MPI_UP_FILE_ENV = "FLEETMPI_MPI_UP_FILE"  # rank 0 creates it once every rank is through MPI_Init
STEP_TRY_ENV = "FLEETMPI_STEP_TRY"        # which start of the step this is, from 1
RETRY_RC_ENV = "FLEETMPI_STEP_RETRY_RC"   # the exit code of the start before
RETRY_STALLED_ENV = "FLEETMPI_STEP_RETRY_STALLED_S"   # set if it was ended for its MPI start-up: the deadline


def say_up() -> None:
    """Create $FLEETMPI_UP_FILE, if set (rank 0, every rank up, nothing written yet).

    A flag for the batch shell alone, removed when the step ends: not a durable record.
    If it cannot be made, a warning: the phase matters more than the retry (without the
    flag, a later crash may start the step again, which resumes from the checkpoint).
    """
    path = os.environ.get(UP_FILE_ENV)
    if path:
        try:
            with open(path, "wb"):
                pass
        except OSError as e:
            print(f"fleetmpi: warning: could not create {path}: {e}", file=sys.stderr, flush=True)


def say_mpi_up(comm: Any) -> None:
    """Create $FLEETMPI_MPI_UP_FILE, if set, once every rank is through MPI_Init (a barrier; rank 0).

    The batch shell ends a step whose ranks have not all got this far by the deadline
    (``MPI_INIT_DEADLINE_S``). Collective when set: every rank of the step sees the same
    environment. Like ``say_up``, a flag for the shell alone, and a warning if it cannot be made.
    """
    path = os.environ.get(MPI_UP_FILE_ENV)
    if not path:
        return
    comm.Barrier()
    if comm.Get_rank() == 0:
        try:
            with open(path, "wb"):
                pass
        except OSError as e:
            print(f"fleetmpi: warning: could not create {path}: {e}", file=sys.stderr, flush=True)


def step_try() -> dict[str, int]:
    """Return phase_start's fields for a step the batch script started again, else {}."""
    try:
        n = int(os.environ.get(STEP_TRY_ENV) or 1)
        rc = int(os.environ.get(RETRY_RC_ENV) or -1)
        stalled = int(os.environ.get(RETRY_STALLED_ENV) or 0)
    except ValueError:
        return {}
    if n <= 1:
        return {}
    out = {"step_try": n, "retried_after_exit_code": rc}
    if stalled > 0:
        out["retried_after_mpi_init_s"] = stalled
    return out


@dataclass(frozen=True)
class BatchCommand:
    """What the script runs (everything that is not an sbatch option)."""

    job_dir: str                       # absolute; the script's working directory
    python: str                        # absolute interpreter that has fleetmpi and mpi4py
    pythonpath: str                    # folder that holds the fleetmpi package
    phase: str
    shape: str
    launcher: Literal["srun", "mpiexec"] = "srun"
    launcher_args: tuple[str, ...] = ()
    mpiexec: str | None = None         # absolute; needed when launcher is mpiexec
    threads: int = 1                   # numba kernel threads per rank (the phase's threads_per_rank)


def render_sbatch(command: BatchCommand, *, job_name: str, comment: str, nodes: int = 1,
                  ntasks_per_node: int = 1, cpus_per_task: int = 1, partition: str | None = None,
                  gres: str | None = None, time_min: int | None = None, account: str | None = None,
                  qos: str | None = None, mem_mb: int | None = None, signal_grace_s: int = 120,
                  output: str = "logs/slurm-%j.out", open_mode: str = "append", requeue: bool = False,
                  additional: Sequence[str] = ()) -> str:
    """Return the batch script of one phase; raise ValueError naming a bad option value."""
    opts = {k: v for k, v in locals().items() if k in SBATCH_OPTIONS}
    for name, value in opts.items():
        err = _check_value(name, value)
        if err:
            raise ValueError(f"sbatch option {name} ({_flag(name)}): {err}")
    if command.launcher == "mpiexec" and not command.mpiexec:
        raise ValueError("launcher mpiexec needs the absolute path of mpiexec (BatchCommand.mpiexec)")
    return "\n".join([*_header(opts), *_body(command, nodes * ntasks_per_node, ntasks_per_node)])


def _header(opts: Mapping[str, Any]) -> list[str]:
    """Return the shebang and the '#SBATCH' lines of checked options ``opts`` (SBATCH_OPTIONS order)."""
    lines = ["#!/bin/bash"]
    for name, value in opts.items():
        if name == "additional" or value is None:
            continue
        if name == "requeue":
            lines.append("#SBATCH --requeue" if value else "#SBATCH --no-requeue")
        elif name == "signal_grace_s":
            lines.append(f"#SBATCH --signal=B:USR2@{value}")
        elif name == "mem_mb":
            lines.append(f"#SBATCH --mem={value}M")
        else:
            lines.append(f"#SBATCH --{_flag(name)}={value}")
    return lines + [f"#SBATCH {opt}" for opt in opts["additional"]]


def _body(command: BatchCommand, ranks: int, ranks_per_node: int) -> list[str]:
    """Return the shell lines that begin the phase, run its ranks, and hand the exit code on."""
    q = shlex.quote
    if command.launcher == "srun":
        step = ["srun", "--mpi=pmi2", f"--wait={SRUN_WAIT_S}"]
    else:
        step = ['"$mpiexec"', "-n", str(ranks), "-ppn", str(ranks_per_node)]
    step += [q(a) for a in command.launcher_args] + ['"$python"', "-m", "fleetmpi.engine.worker", '"$job_dir"']
    sig = RANKS_SIGNAL[command.launcher]
    return [
        "# One phase of a fleetmpi job, rendered by fleetmpi.launch.slurm.script.render_sbatch.",
        f"# Phase {command.phase} ({command.shape}). sbatch runs this in the job dir; logic lives in",
        "# `python -m fleetmpi.launch.slurm.batch begin|continue`, the shell only starts and signals the ranks.",
        "set -u",
        f"job_dir={q(command.job_dir)}",
        f"python={q(command.python)}",
        f"phase={q(command.phase)}",
        *([f"mpiexec={q(command.mpiexec or '')}"] if command.launcher == "mpiexec" else []),
        f"export PYTHONPATH={q(command.pythonpath)}${{PYTHONPATH:+:$PYTHONPATH}}",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}",
        f"export MKL_NUM_THREADS=${{MKL_NUM_THREADS:-1}} NUMBA_NUM_THREADS={int(command.threads)}",
        'cd -- "$job_dir" || exit 2',
        "# One writer per job dir: this shell holds JOB_DIR/lock (flock) while the allocation lasts.",
        'exec 9>>lock && export FLEETMPI_LOCK_FD=9 || exit 2',
        'run="$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}"',
        "stop_signal='' stop_time='' step=''",
        "on_stop() {",
        "    # Slurm signals only this shell (--signal=B:USR2, scancel --batch). Ranks checkpoint",
        "    # on USR2 or TERM, but srun turns TERM into SIGKILL and hydra's mpiexec dies on USR2.",
        '    stop_signal=$1 stop_time=$(date +%s)',
        f'    [[ -z $step ]] || kill -s {sig} "$step" 2>/dev/null',
        "}",
        "trap 'on_stop USR2' USR2",
        "trap 'on_stop TERM' TERM",
        "# Rank 0 creates $up once every rank is up (MPI started, data and checkpoint open), before",
        "# it writes anything. A step whose ranks died of a signal before that (MPICH's PMI-2 client",
        "# now and then aborts in MPI_Init under srun) wrote nothing, so it starts once more.",
        "# $mpi_up comes earlier, once every rank is through MPI_Init: ranks that hang there instead",
        "# are ended after $mpi_wait s (watch_mpi, which leaves $stall) and count as such a death.",
        'up="slurm/.$run.up" mpi_up="slurm/.$run.mpi" stall="slurm/.$run.stalled" stalled=0',
        f'mpi_wait=${{{MPI_INIT_DEADLINE_ENV}:-{MPI_INIT_DEADLINE_S}}}',
        f'[[ $mpi_wait =~ ^[1-9][0-9]*$ ]] || {{ echo "fleetmpi: warning: {MPI_INIT_DEADLINE_ENV}=$mpi_wait is not '
        f'a whole number of seconds; using {MPI_INIT_DEADLINE_S}" >&2; mpi_wait={MPI_INIT_DEADLINE_S}; }}',
        f'export {UP_FILE_ENV}="$job_dir/$up" {MPI_UP_FILE_ENV}="$job_dir/$mpi_up" {STEP_TRY_ENV}=1',
        "watch_mpi() {",
        "    local end=$((SECONDS + mpi_wait))",
        "    while ((SECONDS < end)); do",
        '        if [[ -e $mpi_up ]] || ! kill -0 "$step" 2>/dev/null; then return; fi',
        "        sleep 1",
        "    done",
        "    [[ -e $mpi_up ]] && return",
        '    echo "fleetmpi: the ranks were not all through MPI_Init after $mpi_wait s; ending the step" >&2',
        '    : >"$stall"',
        f'    kill -s {sig} "$step" 2>/dev/null',
        "    end=$((SECONDS + 30))",
        '    while ((SECONDS < end)) && kill -0 "$step" 2>/dev/null; do sleep 1; done',
        '    kill -s KILL "$step" 2>/dev/null',
        "}",
        "rc=0",
        '"$python" -m fleetmpi.launch.slurm.batch begin "$job_dir" --phase "$phase" || rc=$?',
        'if ((rc == 0)) && [[ -z $stop_signal ]]; then',
        "    while :; do",
        '        rm -f -- "$up" "$mpi_up" "$stall"',
        f"        {' '.join(step)} &",
        "        step=$!",
        "        watch_mpi &",
        "        watcher=$!",
        '        wait "$step"; rc=$?',
        "        # A trapped signal interrupts wait; wait again until the step has really ended.",
        '        while kill -0 "$step" 2>/dev/null; do wait "$step"; rc=$?; done',
        '        wait "$step"; rc=$?',
        '        kill "$watcher" 2>/dev/null; wait "$watcher" 2>/dev/null',
        "        stalled=0",
        '        if [[ -e $stall ]]; then',
        "            stalled=$mpi_wait",
        "            ((rc > 128)) || rc=$((128 + 15))   # ended by the watcher: a death, whatever srun said",
        "        fi",
        f"        if ((rc > 128 && {STEP_TRY_ENV} < {STEP_TRIES})) && [[ -z $stop_signal && ! -e $up ]]; then",
        '            echo "fleetmpi: the ranks ended with exit code $rc before all were up; starting the step once more" >&2',
        f"            export {STEP_TRY_ENV}=$(({STEP_TRY_ENV} + 1)) {RETRY_RC_ENV}=$rc {RETRY_STALLED_ENV}=$stalled",
        "            continue",
        "        fi",
        "        break",
        "    done",
        '    rm -f -- "$up" "$mpi_up" "$stall"',
        "fi",
        'printf \'%s\\n\' "$rc" >"slurm/.$run.exit.tmp" && mv -f "slurm/.$run.exit.tmp" "slurm/$run.exit"',
        "# The continuation must not be cut short: it ignores USR2 and TERM (inherited, so also",
        "# while Python starts; a TERM then comes e.g. from a node set DOWN). SIGKILL still ends it.",
        "trap '' USR2 TERM",
        'exec "$python" -m fleetmpi.launch.slurm.batch continue "$job_dir" --phase "$phase" --exit-code "$rc" \\',
        '    --signal "$stop_signal" --signal-time "$stop_time" --stalled-s "$stalled"',
        "",
    ]


SBATCH_OPTIONS: tuple[str, ...] = tuple(
    name for name, p in inspect.signature(render_sbatch).parameters.items() if p.kind is p.KEYWORD_ONLY)
_FLAGS = {"time_min": "time", "mem_mb": "mem", "signal_grace_s": "signal"}


def _flag(name: str) -> str:
    return _FLAGS.get(name, name.replace("_", "-"))


def _positive_int(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        return f"expected an integer >= 1, got {v!r}"
    return None


def _name(v: Any) -> str | None:
    return f"expected a string, got {v!r}" if not isinstance(v, str) else identifier(v)


def _check_value(name: str, v: Any) -> str | None:
    """Return why ``v`` is not a valid value of option ``name``, or None."""
    if v is None and name in ("partition", "gres", "time_min", "account", "qos", "mem_mb"):
        return None
    if name in ("nodes", "ntasks_per_node", "cpus_per_task", "time_min", "mem_mb"):
        return _positive_int(v)
    if name in ("job_name", "partition", "account", "qos"):
        return _name(v)
    if name == "comment":
        ok = isinstance(v, str) and _COMMENT_RE.match(v) is not None
        return None if ok else f"expected 1-200 of letters, digits, '_.:@+-', got {v!r}"
    if name == "gres":
        ok = isinstance(v, str) and _GRES_RE.match(v) is not None
        return None if ok else f"expected NAME[:TYPE][:COUNT][,...], e.g. gpu:1, got {v!r}"
    if name == "signal_grace_s":
        bad = isinstance(v, bool) or not isinstance(v, int) or not 10 <= v <= 65535
        return f"expected seconds in [10, 65535], got {v!r}" if bad else None
    if name == "output":
        ok = isinstance(v, str) and _OUTPUT_RE.match(v) is not None and ".." not in v.split("/")
        return None if ok else f"expected a path relative to the job dir of letters, digits, '_.%/-', got {v!r}"
    if name == "open_mode":
        return None if v in ("append", "truncate") else f"expected 'append' or 'truncate', got {v!r}"
    if name == "requeue":
        return None if isinstance(v, bool) else f"expected true or false, got {v!r}"
    if name == "additional":
        if isinstance(v, str) or not isinstance(v, (list, tuple)):
            return f"expected a list of options, got {v!r}"
        for opt in v:
            err = sbatch_extra_option(opt)
            if err:
                return err
        return None
    return f"unknown option; valid: {', '.join(SBATCH_OPTIONS)}"  # pragma: no cover


def check_options(options: Mapping[str, Any]) -> None:
    """Raise ValueError for a key that is not an sbatch option fleetmpi knows (listing the valid ones)."""
    unknown = sorted(set(options) - set(SBATCH_OPTIONS))
    if unknown:
        raise ValueError(f"unknown sbatch option(s) {', '.join(unknown)}; valid: {', '.join(SBATCH_OPTIONS)}")


def phase_options(spec: Any, phase: str, *, comment: str) -> dict[str, Any]:
    """Return the sbatch options of ``phase`` of ``spec`` (a fleetmpi.spec.Spec)."""
    ph = spec.phase(phase)
    sch = spec.scheduler
    opts: dict[str, Any] = {
        "job_name": spec.name, "comment": comment, "nodes": ph.nodes, "ntasks_per_node": ph.ranks_per_node,
        "cpus_per_task": ph.cpus_per_rank, "partition": ph.partition,
        "gres": f"gpu:{ph.gpus_per_node}" if ph.gpus_per_node else None,
        "time_min": ph.time_min, "account": sch.account, "qos": sch.qos,
        "mem_mb": math.ceil(ph.mem_gb * 1024) if ph.mem_gb else None,
        "signal_grace_s": sch.signal_grace_s, "requeue": sch.requeue, "additional": tuple(sch.extra_sbatch),
    }
    check_options(opts)
    return opts
