"""The ``fleetmpi`` command: one parser, one command table, one mapping of errors to exit codes.

Each module adds its subcommands with ``add_parsers(sub)`` and returns their handlers:
fleetmpi.cli.train (run, inspect, predict, make-data, approve, events), fleetmpi.cli.jobs
(the ledger: queue, sweep, manager, status, cancel, report) and fleetmpi.cli.slurm (submit).
Bad input exits 2 with one line on stderr (a traceback only with --debug).
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence

from fleetmpi import __version__
from fleetmpi.cli import jobs, slurm, train
from fleetmpi.errors import BadInput, ExitCode, FleetError, disk_full

Handler = Callable[[argparse.Namespace], int]

_LONG_WORD = re.compile(r"[^\s'\"]{401,}")


def _short(message: object) -> str:
    """Return ``message`` with every word over 400 characters elided (a 100 KB argument stays one short line)."""
    return _LONG_WORD.sub(lambda m: f"{m[0][:40]}...({len(m[0])} characters)", str(message))


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line and exit 2 (its default is usage + 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """Return the ``fleetmpi`` parser and its command table (subcommand name -> handler)."""
    p = _Parser(prog="fleetmpi", description="Data-parallel training over MPI ranks whose fleet changes while it trains.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"fleetmpi {__version__}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    commands: dict[str, Handler] = {}
    for module in (train, jobs, slurm):
        added = module.add_parsers(sub)
        twice = set(added) & set(commands)
        if twice:
            raise RuntimeError(f"subcommand(s) {', '.join(sorted(twice))} defined twice")  # a programming error
        commands.update(added)
    return p, commands


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FLEETMPI_DEBUG") == "1"
    try:
        parser, commands = build_parser()
        args = parser.parse_args(argv)
        rc = commands[args.cmd](args)
        sys.stdout.flush()   # a closed pipe shows here, not in the interpreter's exit flush
        return rc
    except BrokenPipeError:
        # The reader went away (`fleetmpi events --json JOB | head -3`): what is left is
        # unwanted, so stop quietly. Point stdout at devnull so the interpreter's final
        # flush does not raise again, and exit as a process killed by SIGPIPE would.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13
    except (BadInput, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError,
            PermissionError) as e:
        if debug:
            traceback.print_exc()
        print(f"fleetmpi: error: {_short(e)}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except FleetError as e:
        if debug:
            traceback.print_exc()
        print(f"fleetmpi: error: {_short(e)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except OSError as e:   # a full disk is an outcome: one line, exit 1; anything else stays a bug to see
        if e.errno == errno.ENAMETOOLONG:   # a path argument longer than the file system takes: bad input
            if debug:
                traceback.print_exc()
            print(f"fleetmpi: error: {_short(e)} (expected a path whose names fit the file system, "
                  "commonly 255 bytes each)", file=sys.stderr)
            return ExitCode.BAD_INPUT
        if e.errno == errno.EROFS:   # a job dir or --out on a read-only mount: as a folder without write permission
            if debug:
                traceback.print_exc()
            print(f"fleetmpi: error: {e.filename or _short(e)}: on a read-only file system; give a path on a "
                  "writable one (or remount it read-write)", file=sys.stderr)
            return ExitCode.BAD_INPUT
        full = disk_full(e, getattr(e, "filename", None) or ".")
        if full is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"fleetmpi: {full}", file=sys.stderr)
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
