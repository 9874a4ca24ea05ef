"""The driver: configuration, planning, submission, waiting, and the iteration loop."""
