"""Talking to the scheduler, the ground floor of the driver: the `executor` section and submitit executors (executors.py), which jobs live (watch.py), straggler re-split (resplit.py)."""
