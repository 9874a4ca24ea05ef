"""The types config sections are made of (each section lives next to the code that reads it, in its
group's ``config.py``; pipeline.config composes the run's config from them and validates it with pydantic)."""

from __future__ import annotations

from typing import Annotated

from annotated_types import Ge, Gt, Le

PositiveInt = Annotated[int, Ge(1)]
PositiveFloat = Annotated[float, Gt(0)]
Fraction = Annotated[float, Ge(0), Le(1)]

# Read by pydantic when pipeline.config validates a section: an unknown key is an error, not ignored.
REJECT_UNKNOWN_KEYS = {"extra": "forbid"}
