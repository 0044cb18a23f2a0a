"""The real Slurm command behind a fault injector: the next one on PATH after the injector's own folder.

The fault injectors (fakes for tests only) are linked first on PATH under the command's
name; they hand what they do not fake to this one. Standard library only.
"""

import os
import sys


def real_command(name: str) -> str:
    """Return the path of the real ``name`` (skipping the folder and the file of argv[0]); exit if none."""
    here = os.path.dirname(os.path.abspath(sys.argv[0]))
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        if not folder or os.path.abspath(folder) == here:
            continue
        cand = os.path.join(folder, name)
        if os.access(cand, os.X_OK) and os.path.realpath(cand) != os.path.realpath(sys.argv[0]):
            return cand
    sys.exit(f"{os.path.basename(sys.argv[0])} fault injector: no real {name} on PATH")
