"""The training-technique seam: registry, StepRecord, named sync extras, and a technique's
state round trip through a real checkpoint read back at other rank counts (real mpiexec)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, mpirun, write_spec

from fleetmpi.engine.technique import TECHNIQUES, StepRecord, Technique, technique_class
from fleetmpi.sync import N_EXTRAS, Extra, Extras


def test_every_registered_name_resolves_to_its_technique() -> None:
    assert {"sgd", "lbfgs", "bfgs"} <= set(TECHNIQUES)
    for name in TECHNIQUES:
        cls = technique_class(name)
        assert issubclass(cls, Technique) and cls.name == name
    valid = ", ".join(sorted(TECHNIQUES))
    with pytest.raises(ValueError, match=f"unknown training technique 'bogus'; valid: {valid}$"):
        technique_class("bogus")


def test_step_record_is_frozen_and_complete() -> None:
    rng = np.random.default_rng(7)
    vals = rng.standard_normal(4)
    rec = StepRecord(loss=vals[0], lr=vals[1], samples=50, batch_fp=vals[2], cursor=100, compute_s=0.1,
                     comm_s=0.2, payload_bytes=808, wire_bytes=vals[3], signal=0.0)
    with pytest.raises(AttributeError):
        rec.loss = 1.0  # type: ignore[misc]
    assert set(StepRecord._fields) >= {
        "loss", "lr", "samples", "batch_fp", "cursor", "compute_s", "comm_s", "payload_bytes", "wire_bytes", "signal"}


def test_extras_layout_is_named_and_loss_first() -> None:
    # GPU kernels write [gradient | loss] into the send buffer: the loss must come first.
    assert Extra.LOSS == 0 and N_EXTRAS == len(Extra) == 4
    vals = np.random.default_rng(3).standard_normal(4)
    ex = Extras(*vals)
    arr = ex.array()
    assert arr[Extra.LOSS] == vals[0] and arr[Extra.ROWS] == vals[1]
    assert arr[Extra.BATCH_FP] == vals[2] and arr[Extra.SIGNAL] == vals[3]
    assert Extras.of(arr) == ex
    assert [f.upper() for f in Extras._fields] == [e.name for e in Extra]   # of() reads by position
    with pytest.raises(AttributeError):
        ex.loss = 1.0  # type: ignore[misc]


ROUND_TRIP = textwrap.dedent('''
    import sys
    import numpy as np
    from mpi4py import MPI
    from fleetmpi.engine import checkpoint
    from fleetmpi.engine.worker import open_trainer
    from fleetmpi.jobdir import JobDir

    comm = MPI.COMM_WORLD
    jd = JobDir(sys.argv[1])
    t = open_trainer(comm, jd)                 # resumes the newest checkpoint at this rank count
    merged = t.technique.state()               # collective: merged back over these ranks
    if comm.Get_rank() == 0:
        ckpt, _ = checkpoint.latest_valid(jd.ckpt)
        assert t.optimizer == ckpt.meta["optimizer"], (t.optimizer, ckpt.meta["optimizer"])
        assert set(merged) == set(ckpt.arrays), (sorted(merged), sorted(ckpt.arrays))
        for name, want in ckpt.arrays.items():
            assert np.array_equal(merged[name], want, equal_nan=True), name
        assert np.abs(ckpt.arrays["sync_residual"]).sum() > 0, "residual should hold something"
        print("OK", t.step, sorted(merged))
''')


@pytest.mark.parametrize("ranks", [1, 2])
def test_state_round_trips_through_a_checkpoint_at_another_rank_count(tmp_path: Path, datasets: dict[str, Path],
                                                                      ranks: int) -> None:
    job = tmp_path / "job"
    spec = write_spec(tmp_path / "spec.yaml", datasets["multiclass"],
                      sync={"kind": "threshold", "tau": 0.05},
                      goal={"max_steps": 20}, checkpoint={"every_steps": 10, "keep": 2},
                      fleet={"start": "three", "phases": {"three": {"nodes": 1, "ranks_per_node": 3}}})
    proc = cli("run", str(spec), "--job-dir", str(job))
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "phase_start" and e["ranks"] == 3 for e in events)
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP)
    proc = mpirun(ranks, script, str(job))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK 20 " in proc.stdout     # the end at step 20 checkpoints too (a raised budget continues from it)


WARM = textwrap.dedent('''
    import sys
    from mpi4py import MPI
    from fleetmpi.engine.worker import open_trainer
    from fleetmpi.jobdir import JobDir
    from kernels import update

    t = open_trainer(MPI.COMM_WORLD, JobDir(sys.argv[1]))
    before = len(update._dense.signatures), len(update._adagrad_dense.signatures)
    t.warm_kernels()
    print("LOADED", *before, len(update._dense.signatures), len(update._adagrad_dense.signatures))
''')


@pytest.mark.parametrize("kind", ["sgd", "adagrad"])
def test_warming_the_kernels_loads_the_optimizers_update_before_the_first_step(
        tmp_path: Path, datasets: dict[str, Path], kind: str) -> None:
    # The first step of a phase used to load the update kernel itself (4.7-6.2 ms); the warm-up
    # that a pre-started phase runs while it waits now loads it, and only the one the optimizer uses.
    job = tmp_path / "job"
    optimizer = {"kind": kind, "lr": 0.1, "batch": 50, **({"momentum": 0.9} if kind == "sgd" else {})}
    spec = write_spec(tmp_path / "spec.yaml", datasets["multiclass"], optimizer=optimizer, goal={"max_steps": 2})
    assert cli("run", str(spec), "--job-dir", str(job)).returncode == 0
    script = tmp_path / "warm.py"
    script.write_text(WARM)
    proc = mpirun(1, script, str(job))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    want = "1 0" if kind == "sgd" else "0 1"
    assert f"LOADED 0 0 {want}" in proc.stdout, proc.stdout
