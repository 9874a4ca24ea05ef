"""The console every command and job of the pipeline prints to."""

from __future__ import annotations

from rich.console import Console


def console() -> Console:
    """A console for terminals and log files alike: logs get room for the tables' columns."""
    plain = Console()
    return plain if plain.is_terminal else Console(width=120)
