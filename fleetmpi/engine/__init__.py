"""What runs on the ranks: one training phase, from data and checkpoint to model.

``python -m fleetmpi.engine.worker JOB_DIR`` is the entry point a launcher starts on every
rank. Nothing here imports ``fleetmpi.jobs`` or ``fleetmpi.cli`` (see docs/architecture.md).
"""
