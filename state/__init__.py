"""The run's filesystem ledger. Imports nothing else of selftrain, so jobs and tools can rely on it."""

from state.errors import InputError, PermanentJobError, read_user_text
from state.ledger import Ledger, Status, atomic_write_bytes, atomic_write_json

__all__ = ["InputError", "Ledger", "PermanentJobError", "Status", "atomic_write_bytes", "atomic_write_json", "read_user_text"]
