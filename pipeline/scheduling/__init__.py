"""Talking to the scheduler: submitit executors and resources (executors.py), which jobs live (watch.py), and submission as a narrow interface (submitter.py)."""
