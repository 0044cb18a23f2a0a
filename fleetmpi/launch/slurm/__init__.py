"""The Slurm backend: each phase is one batch job; the job resubmits itself with a new shape.

backend  login side: pre-flight, submit, follow the chain, status
batch    inside an allocation: ``begin`` / ``continue`` of the phase's script
script   the sbatch script of one phase (header of options, body of steps)
submit   sbatch / scontrol / scancel with retries and an idempotency key
cmd      the one door to Slurm's commands, and their state names
chain    JOB_DIR/slurm/: what was submitted, what ran, how it ended
"""
