"""Hostile argument lists for every `fleetmpi` subcommand (issue 11).

Each call (a missing argument, a wrong type, a huge or non-finite number, an unknown flag,
a path that is a folder, a FIFO or missing, unicode, a 100 KB string) must end within its
deadline with exit 2 and one short line on stderr (a 100 KB argument is elided in it), or
with exit 0 where the call is valid after all, and never with a traceback. The cases are
generated from a seed: any 14 in a row cover every subcommand, and the kinds of damage
rotate over them.
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from campaign import Campaign, trials
from conftest import cli

pytestmark = pytest.mark.faults

DEADLINE_S = 30.0   # a refusal takes about a second (the interpreter's start)

# Each subcommand as a well-formed call on things that do not exist: {"pos": [...], "opt": {flag: value}}.
# `manager` always keeps --once: without it a valid call runs until stopped.
BASE: dict[str, tuple[list[str], dict[str, str]]] = {
    "run": (["{missing}"], {"--job-dir": "{tmp}/job"}),
    "inspect": (["{missing}"], {}),
    "predict": (["{missing}", "{missing}"], {"--out": "{tmp}/pred.h5", "--horizon": "3"}),
    "make-data": ([], {"--from": "synthetic", "--n": "50", "--d": "3", "--classes": "3", "--seed": "1",
                       "--valid-fraction": "0.2", "--out": "{tmp}/data"}),
    "approve": (["{missing}"], {}),
    "events": (["{missing}"], {}),
    "queue": (["{missing}"], {"--max-queued": "5"}),
    "sweep": (["{missing}"], {"--grid": "optimizer.lr=0.1,0.2", "--max-queued": "5"}),
    "manager": ([], {"--once": "", "--max-running": "2", "--poll-min-s": "0.1"}),
    "status": (["{missing}"], {}),
    "cancel": (["{missing}"], {}),
    "report": (["{missing}"], {"--out": "{tmp}/r.png"}),
    "ledger": (["rebuild"], {}),
    "submit": (["{missing}"], {"--backend": "local"}),
}
NUMBERS = ["-1", "0", "99999999999999999999999999", "1e400", "nan", "-inf", "0x10", "1_000", "", "٣"]
PATHS = ["{dir}", "{fifo}", "{missing}", "{tmp}/no/such/folder/x.yaml"]
STRINGS = ["ψ∂ƒ\u202eñ🙂", "x" * 100_000, "-", "--", "=", " "]
KINDS = ("missing", "positional", "option", "unknown flag", "extra", "huge string")


def _case(i: int) -> tuple[str, str, list[str]]:
    """Return (subcommand, kind of damage, argv) of case ``i``."""
    rng = random.Random(i)
    names = list(BASE)
    cmd = names[i % len(names)]
    kind = KINDS[(i // len(names) + i) % len(KINDS)]
    pos, opt = list(BASE[cmd][0]), dict(BASE[cmd][1])
    if kind == "missing":
        if pos:
            pos = pos[:-1]
        keep = [k for k in opt if k == "--once" or rng.random() < 0.5]
        opt = {k: opt[k] for k in keep}
    elif kind == "positional" and pos:
        pos[rng.randrange(len(pos))] = rng.choice(PATHS + STRINGS)
    elif kind in ("option", "positional") and opt:
        key = rng.choice([k for k in opt if k != "--once"] or list(opt))
        opt[key] = rng.choice(NUMBERS + PATHS + STRINGS[:1])
    elif kind == "unknown flag":
        opt[rng.choice(["--no-such-flag", "-Z", "--jso", "--json=yes"])] = rng.choice(["", "1"])
    elif kind == "extra":
        pos.append(rng.choice(PATHS + NUMBERS))
    else:   # a 100 KB or unicode value where a short word is expected
        if opt and rng.random() < 0.5:
            opt[rng.choice(list(opt))] = rng.choice(STRINGS[:2])
        elif pos:
            pos[rng.randrange(len(pos))] = rng.choice(STRINGS[:2])
        else:
            opt["--set"] = "x" * 100_000
    argv = [cmd, *pos]
    for k, v in opt.items():
        argv += [k] if v == "" and k in ("--once", "--json", "--no-such-flag", "-Z", "--jso") else [k, v]
    return cmd, kind, argv


@pytest.mark.parametrize("i", range(trials(ci=15, full=58)))
def test_hostile_cli_call_exits_2_with_one_line(tmp_path: Path, campaign: Campaign, i: int) -> None:
    _, kind, argv = _case(i)
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    subs = {"{dir}": str(tmp_path / "folder"), "{fifo}": str(tmp_path / "fifo"),
            "{missing}": str(tmp_path / "missing.yaml"), "{tmp}": str(tmp_path)}
    for key, value in subs.items():
        argv = [a.replace(key, value) for a in argv]
    shown = " ".join(a if len(a) < 80 else a[:20] + f"...({len(a)} chars)" for a in argv)
    try:
        proc = cli(*argv, cwd=tmp_path, timeout=DEADLINE_S, env={"FLEETMPI_HOME": str(tmp_path / "home")})
    except subprocess.TimeoutExpired:
        campaign.record("bad CLI call", ok=False, hang=True)
        pytest.fail(f"{kind}: fleetmpi {shown} did not end within {DEADLINE_S} s")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    # A refusal is one short line; a call that turns out valid (exit 0) may report what it did.
    ok = (proc.returncode in (0, 2) and "Traceback" not in proc.stderr + proc.stdout
          and (proc.returncode == 0 or (len(lines) == 1 and len(proc.stderr) < 1000)))
    campaign.record("bad CLI call", ok=ok)
    assert ok, f"{kind}: fleetmpi {shown}\nrc={proc.returncode}\nstderr ({len(proc.stderr)} chars):\n{proc.stderr[:3000]}"
