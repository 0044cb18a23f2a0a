"""The launcher's choice of a phase to pre-start, its setting, and the handover word (no MPI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleetmpi.engine import standby
from fleetmpi.errors import BadInput
from fleetmpi.launch.local import goto_targets, prestart_mode
from fleetmpi.spec import Spec, from_raw


def _spec(rules: list[dict]) -> Spec:
    return from_raw({"name": "t", "data": {"train": "x.h5"}, "model": {"kind": "softmax"}, "goal": {"max_steps": 9},
                     "fleet": {"start": "a", "phases": {p: {"ranks_per_node": 1} for p in "abc"}, "rules": rules}},
                    "spec.yaml", Path("."))


def test_goto_targets_are_the_rules_phases_for_this_phase_once_each_in_rule_order() -> None:
    sp = _spec([{"in": "a", "when": "epoch >= 1", "then": {"goto": "c"}},
                {"when": "epoch >= 2", "then": {"goto": "b"}},          # any phase
                {"in": "a", "when": "epoch >= 3", "then": {"goto": "c"}},
                {"in": "b", "when": "epoch >= 4", "then": {"goto": "a"}},
                {"in": "a", "when": "loss < 0.1", "then": {"stop": True}}])
    assert goto_targets(sp, "a") == ["c", "b"]
    assert goto_targets(sp, "b") == ["a"]        # a rule's goto to the phase itself is no target
    assert goto_targets(sp, "c") == ["b"]


@pytest.mark.parametrize("value, want", [("", "next"), ("next", "next"), ("rule", "rule"), ("off", "off")])
def test_prestart_setting(monkeypatch: pytest.MonkeyPatch, value: str, want: str) -> None:
    monkeypatch.setenv("FLEETMPI_PRESTART", value)
    assert prestart_mode() == want


def test_bad_prestart_setting_names_the_variable_and_the_valid_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETMPI_PRESTART", "always")
    with pytest.raises(BadInput, match=r"FLEETMPI_PRESTART='always' is not valid; valid: next, rule, off"):
        prestart_mode()


class _OneRank:
    """A one-rank communicator: enough for await_go's broadcast."""

    def Get_rank(self) -> int:
        return 0

    def Ibcast(self, buf: np.ndarray, root: int) -> object:
        class Done:
            def Test(self) -> bool:
                return True
        return Done()

    def bcast(self, obj: object, root: int) -> object:
        return obj


def test_word_for_another_token_is_not_taken_and_a_stop_calls_off(tmp_path: Path) -> None:
    sb = standby.Standby("t2", "b")
    standby.write_handover(tmp_path, "t1", True, "for the standby before")
    assert standby._read_word(tmp_path, "t2") is None
    (tmp_path / "standby.json").write_text('{"token": "t2", "go"')   # never seen: writes are atomic
    assert standby._read_word(tmp_path, "t2") is None
    standby.write_handover(tmp_path, "t2", True, "go")
    assert standby.await_go(_OneRank(), tmp_path, sb, lambda: False, lambda: {"phase": "b"}) == {"phase": "b"}
    with pytest.raises(standby.Cancelled):
        standby.await_go(_OneRank(), tmp_path, sb, lambda: True, lambda: {"phase": "b"})
    standby.write_handover(tmp_path, "t2", False, "old phase failed")
    with pytest.raises(standby.Cancelled):
        standby.await_go(_OneRank(), tmp_path, sb, lambda: False, lambda: {"phase": "b"})


def test_standby_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(standby.STANDBY_ENV, "abc:wide")
    assert standby.from_env() == standby.Standby("abc", "wide")
    for bad in ("", "abc", ":wide", "abc:"):
        monkeypatch.setenv(standby.STANDBY_ENV, bad)
        assert standby.from_env() is None
