"""Spec loading under hostile input: size, node, depth and alias limits; bounds on phases and goals.

Each case loads a real spec file (examples/quickstart.yaml, edited) through fleetmpi.spec.load
and expects BadInput with one short line naming the file and the key, within a second.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetmpi import spec as specmod
from fleetmpi.errors import BadInput, quote

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
DEADLINE_S = 5.0


def load_within(path: Path, overrides: list[str] | None = None) -> BadInput | specmod.Spec:
    """Return the loaded spec or the BadInput it raised; fail if loading takes longer than DEADLINE_S."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(specmod.load(path, overrides))
        except BaseException as e:  # BadInput is expected; anything else is the failure under test
            box.append(e)

    t = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    t.start()
    t.join(DEADLINE_S)
    assert not t.is_alive(), f"loading {path} did not end within {DEADLINE_S} s"
    assert time.monotonic() - start < DEADLINE_S
    (out,) = box
    assert isinstance(out, (BadInput, specmod.Spec)), f"{type(out).__name__}: {str(out)[:500]}"
    return out


def assert_refused(path: Path, *expect: str, overrides: list[str] | None = None) -> str:
    out = load_within(path, overrides)
    assert isinstance(out, BadInput), f"{path} was accepted"
    msg = str(out)
    assert "\n" not in msg and len(msg) < 600, msg[:2000]
    for part in expect:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


def write(tmp_path: Path, spec: dict[str, Any] | str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


def alias_bomb(levels: int = 10, width: int = 9) -> str:
    lines = ["lol0: &lol0 [lol, lol]"]
    lines += [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def test_quote_cuts_long_values() -> None:
    long = "x" * 100_000
    q = quote(long)
    assert len(q) < 260 and q.startswith("'xxx") and "100002 characters" in q
    assert quote("short") == "'short'"
    assert quote("a\nb") == "'a\\nb'"


def test_alias_bomb_file_is_refused(tmp_path: Path) -> None:
    body = yaml.safe_dump(QUICKSTART, sort_keys=False) + alias_bomb()
    assert_refused(write(tmp_path, body), "spec.yaml", "aliases expand to more than 10000")


def test_alias_bomb_through_set(tmp_path: Path) -> None:
    path = write(tmp_path, QUICKSTART)
    flow = "{a0: &a0 [x, y], " + ", ".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 11)) + "}"
    assert_refused(path, "--set", "aliases expand to", overrides=[f"model.extra={flow}"])


def test_recursive_alias_is_refused(tmp_path: Path) -> None:
    assert_refused(write(tmp_path, yaml.safe_dump(QUICKSTART) + "loop: &loop [1, *loop]\n"), "recursive")


def test_deep_nesting_is_refused(tmp_path: Path) -> None:
    msg = assert_refused(write(tmp_path, yaml.safe_dump(QUICKSTART) + "deep: " + "[" * 3000 + "]" * 3000 + "\n"),
                  "nested deeper than 32")
    assert "Recursion" not in msg


def test_deep_set_key_is_refused(tmp_path: Path) -> None:
    assert_refused(write(tmp_path, QUICKSTART), "--set", "deeper", overrides=[".".join(["a"] * 5000) + "=1"])


def test_two_megabyte_spec_is_refused(tmp_path: Path) -> None:
    body = yaml.safe_dump(QUICKSTART) + "".join(f"# padding line {i:08d} {'z' * 80}\n" for i in range(22_000))
    assert len(body) > 2_000_000
    assert_refused(write(tmp_path, body), "spec.yaml", "at most 1048576 bytes")


def test_many_nodes_without_aliases_are_refused(tmp_path: Path) -> None:
    spec = copy.deepcopy(QUICKSTART)
    spec["fleet"]["phases"]["small"]["partition"] = list(range(20_000))
    assert_refused(write(tmp_path, spec), "more than 10000 values")


def test_huge_integer_is_refused(tmp_path: Path) -> None:
    assert_refused(write(tmp_path, yaml.safe_dump(QUICKSTART).replace("seed: 0", "seed: " + "7" * 5000)), "4300 digits")


def test_fifo_spec_is_refused_without_blocking(tmp_path: Path) -> None:
    import os
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    assert_refused(fifo, "not a regular file")


def test_long_value_is_quoted_short(tmp_path: Path) -> None:
    spec = copy.deepcopy(QUICKSTART)
    spec["optimizer"]["kind"] = "q" * 100_000
    msg = assert_refused(write(tmp_path, spec), "optimizer.kind", "100002 characters")
    assert len(msg) < 500


def test_long_unknown_key_is_quoted_short(tmp_path: Path) -> None:
    spec = copy.deepcopy(QUICKSTART)
    spec["k" * 50_000] = 1
    msg = assert_refused(write(tmp_path, spec), "unknown key")
    assert len(msg) < 500


PHASE = "fleet.phases.small"

BAD_VALUES = [
    (f"{PHASE}.ranks_per_node", 100_000, "<= 1024"),
    (f"{PHASE}.ranks_per_node", 0, "<= 1024"),
    (f"{PHASE}.nodes", 10**30, "<= 10000"),
    (f"{PHASE}.nodes", 1.0e30, "integer"),
    (f"{PHASE}.cpus_per_rank", 5000, "<= 1024"),
    (f"{PHASE}.gpus_per_node", 1000, "[0, 64]"),
    (f"{PHASE}.gpus_per_node", -1, "[0, 64]"),
    (f"{PHASE}.mem_gb", 1.0e9, "<= 65536"),
    (f"{PHASE}.time_min", 10**9, "<= 525600"),
    ("goal.loss_below", -1, "> 0"),
    ("goal.valid_loss_below", 0, "> 0"),
    ("goal.valid_accuracy_above", 1.5, "[0, 1)"),
    ("goal.valid_accuracy_above", 1.0, "[0, 1)"),
    ("goal.max_steps", 10**15, "<= 1e+12"),
    ("goal.max_steps", -3, "> 0"),
    ("goal.max_epochs", 1.0e12, "<= 1e+06"),
]


@pytest.mark.parametrize(("key", "value", "valid"), BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_out_of_bounds_values_are_refused(tmp_path: Path, key: str, value: Any, valid: str) -> None:
    spec = copy.deepcopy(QUICKSTART)
    node = spec
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    assert_refused(write(tmp_path, spec), "spec.yaml", key, valid)


def test_bounds_apply_to_phases_not_yet_reached(tmp_path: Path) -> None:
    # 'single' is reached only after two rescales; its bound is still checked at load.
    assert_refused(write(tmp_path, QUICKSTART), "fleet.phases.single.nodes", "<= 10000",
            overrides=["fleet.phases.single.nodes=1000000"])


def test_too_many_ranks_in_total(tmp_path: Path) -> None:
    assert_refused(write(tmp_path, QUICKSTART), "fleet.phases.wide", "at most 1048576",
            overrides=["fleet.phases.wide.nodes=10000", "fleet.phases.wide.ranks_per_node=1000"])


def test_bounds_accept_real_values(tmp_path: Path) -> None:
    spec = copy.deepcopy(QUICKSTART)
    spec["fleet"]["phases"]["wide"].update(nodes=8000, ranks_per_node=128, gpus_per_node=8, mem_gb=1024,
                                           time_min=2880, cpus_per_rank=2)
    spec["goal"].update(loss_below=1e-6, valid_accuracy_above=0.0, max_steps=10**9)
    out = load_within(write(tmp_path, spec))
    assert isinstance(out, specmod.Spec)
    assert out.phase("wide").ranks == 8000 * 128


def test_local_fit_refuses_more_ranks_than_cores(tmp_path: Path) -> None:
    sp = specmod.load(write(tmp_path, QUICKSTART), ["scheduler.oversubscribe=false"])   # the demo allows it
    with pytest.raises(BadInput, match=r"fleet\.phases\.wide: 3 ranks .* 2 cores.*oversubscribe"):
        specmod.check_local_fit(sp, cores=2, environ={})
    specmod.check_local_fit(sp, cores=3, environ={})
    specmod.check_local_fit(sp, cores=2, environ={"FLEETMPI_OVERSUBSCRIBE": "1"})
    with pytest.raises(BadInput, match="FLEETMPI_OVERSUBSCRIBE"):
        specmod.check_local_fit(sp, cores=2, environ={"FLEETMPI_OVERSUBSCRIBE": "yes"})


def test_local_fit_spec_flag_and_env_precedence(tmp_path: Path) -> None:
    sp = specmod.load(write(tmp_path, QUICKSTART), ["scheduler.oversubscribe=true"])
    specmod.check_local_fit(sp, cores=1, environ={})
    with pytest.raises(BadInput, match="1 cores"):
        specmod.check_local_fit(sp, cores=1, environ={"FLEETMPI_OVERSUBSCRIBE": "0"})
    slurm = specmod.load(write(tmp_path, QUICKSTART), ["scheduler.backend=slurm"])
    specmod.check_local_fit(slurm, cores=1, environ={})   # Slurm places ranks on its own nodes


def test_anchors_in_small_numbers_still_load(tmp_path: Path) -> None:
    text = (ROOT / "examples" / "quickstart.yaml").read_text()
    text = text.replace("    small:  {nodes: 1, ranks_per_node: 2}", "    small:  &base {nodes: 1, ranks_per_node: 2}")
    text = text.replace("    wide:   {nodes: 1, ranks_per_node: 3}", "    wide:   {<<: *base, ranks_per_node: 3}")
    out = load_within(write(tmp_path, text))
    assert isinstance(out, specmod.Spec), out
    assert (out.phase("small").ranks, out.phase("wide").ranks) == (2, 3)
