"""Pure parts of the Slurm launch layer, without a cluster: the exit classifier, the sbatch flags."""

from __future__ import annotations

import pytest

from fleetmpi.errors import ExitCode
from fleetmpi.launch.slurm.batch import Action, PhaseExit, classify_exit
from fleetmpi.launch.slurm.script import SBATCH_OPTIONS, _flag
from fleetmpi.schema import SBATCH_MANAGED_FLAGS, sbatch_extra_option

# (rc, stop signal, goal reached, Slurm's lost state) -> what the continuation does
CASES = [
    ((0, "", True, None), PhaseExit(Action.COMPLETE)),
    ((0, "", True, "NODE_FAIL"), PhaseExit(Action.COMPLETE)),        # the goal outranks a late node failure
    ((0, "", False, None), PhaseExit(Action.NO_GOAL)),               # srun exits 0 when its node fails
    ((0, "", False, "NODE_FAIL"), PhaseExit(Action.LOST)),
    ((1, "", False, None), PhaseExit(Action.FAIL)),
    ((2, "", False, None), PhaseExit(Action.FAIL)),
    ((1, "TERM", False, None), PhaseExit(Action.FAIL, cancelled=True)),
    ((3, "", False, None), PhaseExit(Action.RESCALE)),
    ((3, "TERM", False, None), PhaseExit(Action.CANCEL, cancelled=True)),
    ((3, "USR2", False, None), PhaseExit(Action.RESCALE)),
    ((4, "", False, None), PhaseExit(Action.RESUBMIT, stopped=True)),
    ((5, "", True, None), PhaseExit(Action.MISSED)),                 # target missed (require_target): final
    ((5, "", True, "NODE_FAIL"), PhaseExit(Action.MISSED)),          # the run's end outranks a late node failure
    ((4, "USR2", False, None), PhaseExit(Action.RESUBMIT, stopped=True)),
    ((4, "TERM", False, None), PhaseExit(Action.CANCEL, cancelled=True)),
    ((4, "", False, "PREEMPTED"), PhaseExit(Action.LOST)),
    ((137, "USR2", False, None), PhaseExit(Action.RESUBMIT, stopped=True)),  # killed before its handler
    ((137, "", False, None), PhaseExit(Action.CRASHED)),
    ((-9, "", False, None), PhaseExit(Action.CRASHED)),
    ((137, "TERM", False, None), PhaseExit(Action.CANCEL, cancelled=True)),
]


@pytest.mark.parametrize(("given", "want"), CASES, ids=[f"rc{c[0][0]}-{c[0][1] or 'nosig'}-{c[0][2]}-{c[0][3]}"
                                                        for c in CASES])
def test_exit_classifier(given: tuple[int, str, bool, str | None], want: PhaseExit) -> None:
    assert classify_exit(*given) == want


def test_classifier_covers_every_exit_code() -> None:
    seen = {args[0] for args, _ in CASES}
    assert set(ExitCode) <= seen
    assert {want.action for _, want in CASES} == set(Action)


def test_extra_option_check_knows_every_flag_the_renderer_sets() -> None:
    assert {_flag(n) for n in SBATCH_OPTIONS if n != "additional"} == SBATCH_MANAGED_FLAGS
    assert sbatch_extra_option("--constraint=ib") is None
    err = sbatch_extra_option("--time=10")
    assert err is not None and "sets --time" in err
