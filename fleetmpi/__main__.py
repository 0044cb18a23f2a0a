"""``python -m fleetmpi``: the same as the ``fleetmpi`` command (and ``python -m fleetmpi.cli``)."""

import sys

from fleetmpi.cli import main

sys.exit(main())
