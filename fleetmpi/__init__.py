"""fleetmpi: data-parallel training over MPI ranks whose fleet changes while it trains."""

__version__ = "0.1.0"

# Exit codes of one training phase (DESIGN.md); every backend and the CLI use these.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RESCALE = 3
EXIT_STOPPED = 4
