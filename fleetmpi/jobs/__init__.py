"""What manages many jobs on the login node: the ledger, the manager loop, notifiers, reports.

ledger    SQLite index of job dirs (jobs, allocations, notes); rows: its schema and row types
manager   launch within limits, poll, classify, retry, notify; backends: local and Slurm
notify    command, webhook and mail notifiers
report    plots of a job's metrics
Compute nodes never write here: they write their job dir and the manager folds it in.
"""
