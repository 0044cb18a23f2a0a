"""``python -m fleetmpi.cli``: the same as the ``fleetmpi`` command."""

import sys

from fleetmpi.cli import main

sys.exit(main())
