"""Write jobscripts/*.sbatch: the batch script of each phase of examples/slurm.yaml, annotated.

    python jobscripts/render.py            (from the repository root; tests/unit/test_jobscripts.py
                                            checks the committed files equal what this renders now)

Each script is what ``fleetmpi submit`` hands to sbatch for that phase (the project's own
renderer, fleetmpi.launch.slurm.script.render_sbatch), with a comment above every
``#SBATCH`` line naming the spec key or submit option it comes from. Options the spec passes
through untouched (``scheduler.extra_sbatch``) are marked PASSTHROUGH. Paths are
placeholders a reader replaces; fleetmpi fills them in itself when it submits.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "examples" / "slurm.yaml"
OUT = ROOT / "jobscripts"

# Placeholders for what fleetmpi knows only at submission.
JOB_DIR = "/path/to/runs/digits-mlp-slurm"
PYTHON = "/path/to/venv/bin/python"
PYTHONPATH = "/path/to/fleetmpi"
COMMENT = "fleetmpi.JOBKEY.0"

_SOURCES = {
    "job-name": "from the spec's name",
    "comment": "set by fleetmpi: the submission key: looked up with squeue before a retry, so one intent is one job",
    "nodes": "from fleet.phases.{p}.nodes",
    "ntasks-per-node": "from fleet.phases.{p}.ranks_per_node (one task per rank)",
    "cpus-per-task": "from fleet.phases.{p}.cpus_per_rank",
    "partition": "from fleet.phases.{p}.partition (submit -p for phases without one)",
    "gres": "from fleet.phases.{p}.gpus_per_node",
    "time": "from fleet.phases.{p}.time_min in minutes (submit -t for phases without one)",
    "account": "from scheduler.account (submit -A)",
    "qos": "from scheduler.qos (submit -q)",
    "mem": "from fleet.phases.{p}.mem_gb",
    "signal": "from scheduler.signal_grace_s: USR2 this long before the time limit; the ranks checkpoint",
    "output": "set by fleetmpi: one log per Slurm job in JOB_DIR/logs",
    "open-mode": "set by fleetmpi: a requeued job appends to its log",
    "requeue": "from scheduler.requeue",
    "no-requeue": "from scheduler.requeue",
}


def annotate(text: str, phase: str, passthrough: tuple[str, ...]) -> str:
    """Return ``text`` with a comment above each '#SBATCH' line saying where it comes from."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            option = line.split()[1]
            flag = option[2:].split("=", 1)[0]
            if option in passthrough:
                out.append("# PASSTHROUGH: scheduler.extra_sbatch, handed to sbatch as written")
            else:
                out.append(f"# {_SOURCES[flag].format(p=phase)}")
        out.append(line)
    return "\n".join(out) + "\n"


def render_all() -> dict[str, str]:
    """Return {file name: annotated script} for every phase of examples/slurm.yaml."""
    sys.path.insert(0, str(ROOT))
    from fleetmpi import spec as specmod
    from fleetmpi.launch.slurm.script import BatchCommand, phase_options, render_sbatch

    spec = specmod.load(SPEC)
    sch = spec.scheduler
    files = {}
    for phase in spec.fleet.phases:
        cmd = BatchCommand(job_dir=JOB_DIR, python=PYTHON, pythonpath=PYTHONPATH, phase=phase,
                           shape=spec.phase(phase).shape(), launcher=sch.launcher,
                           launcher_args=tuple(sch.launcher_args),
                           mpiexec="/path/to/mpiexec" if sch.launcher == "mpiexec" else None)
        text = render_sbatch(cmd, **phase_options(spec, phase, comment=COMMENT))
        head = (f"# jobscripts/{phase}.sbatch: phase {phase} of examples/slurm.yaml as `fleetmpi submit` renders it\n"
                "# (regenerate: python jobscripts/render.py). fleetmpi writes and submits this itself; read it to\n"
                "# see what runs, or adapt a copy for a site whose rules differ.\n")
        body = annotate(text, phase, tuple(sch.extra_sbatch))
        first, rest = body.split("\n", 1)     # the shebang stays the first line
        files[f"{phase}.sbatch"] = f"{first}\n{head}{rest}"
    return files


def main() -> int:
    """Write every rendered script next to this file (atomically); return 0."""
    for name, text in render_all().items():
        path = OUT / name
        tmp = path.with_name(f".{name}.tmp.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
