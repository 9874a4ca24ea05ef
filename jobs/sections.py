"""Config sections: the types they are made of, and command-line options made from a section.

Each section lives next to the code that reads it, in its group's ``config.py``; pipeline.config
composes the run's config from them and validates it with pydantic. A CLI never re-declares a
section: every field becomes ``--field-name VALUE`` with the section's default; values are read as
YAML where the text alone does not fit (``--zone-bounds '[0.2, 0.6, 0.9]'``), and the whole section
is validated by the same rules as a run's config file. A boolean field is also a flag (``--dedupe``).
Every YAML a user wrote (config files, overrides, option values) is read by ``load_yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from annotated_types import Ge, Gt, Le
from pydantic import TypeAdapter, ValidationError

from state import InputError

PositiveInt = Annotated[int, Ge(1)]
PositiveFloat = Annotated[float, Gt(0)]
Fraction = Annotated[float, Ge(0), Le(1)]

# Read by pydantic when pipeline.config validates a section: an unknown key is an error, not ignored.
REJECT_UNKNOWN_KEYS = {"extra": "forbid"}

T = TypeVar("T")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's reader, except that a key given twice in one mapping is an error naming both
    lines (yaml.safe_load keeps the last: a second ``generate:`` section silently replaces the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            # "<<: *base" merges are flattened by the parent class: their keys may be overridden.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first:
                lines = f", on lines {first[key]} and {line}," if first[key] != line else ""
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice{lines} and the second would replace the first; keep one",
                    key_node.start_mark)
            first[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``text`` read as yaml.safe_load reads it, but a key given twice is a yaml.YAMLError."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def check_writable(path: Path, key: str, folder: bool = False) -> None:
    """``path`` can be made or written: a ``folder``, or else a file; ValueError ``key: why`` otherwise.
    Nothing is created."""
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{key}: {path} is a file; give a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{key}: {path} is a folder; give the path of the file to write")
    existing = next((p for p in [path, *path.absolute().parents] if p.exists()), Path("/"))
    if existing != path and not existing.is_dir():
        raise ValueError(f"{key}: {existing} is a file, so {path} cannot be made under it; give another path")
    if not os.access(existing if existing.is_dir() else existing.parent, os.W_OK | os.X_OK):
        raise ValueError(f"{key}: cannot write in {existing} (permission denied); give a path you can write")


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, section: type[Any], skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass ``section`` (nested sections and ``skip`` left out)."""
    hints = typing.get_type_hints(section)
    group = parser.add_argument_group(f"{section.__name__} (as in the run's config)")
    for field in dataclasses.fields(section):
        if field.name in skip or dataclasses.is_dataclass(hints[field.name]):
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        if hints[field.name] is bool:
            group.add_argument(_option(field.name), nargs="?", const="true", default=None, metavar="BOOL",
                               help=f"default {default}")
        else:
            group.add_argument(_option(field.name), default=None, metavar="VALUE", help=f"default {default!r}")


def section_from_options(section: type[T], args: argparse.Namespace, skip: tuple[str, ...] = ()) -> T:
    """The section with the options given on the command line; InputError naming the option otherwise."""
    adapter = TypeAdapter(section)
    hints = typing.get_type_hints(section)
    given: dict[str, Any] = {}
    for field in dataclasses.fields(section):
        raw = getattr(args, field.name, None)
        if field.name in skip or raw is None or dataclasses.is_dataclass(hints[field.name]):
            continue
        # The text as it is first (a regex such as [0-9]+ is text, not a YAML list), then as YAML.
        try:
            TypeAdapter(hints[field.name]).validate_python(raw)
            given[field.name] = raw
        except ValidationError:
            try:
                given[field.name] = load_yaml(raw)
            except yaml.YAMLError:
                given[field.name] = raw
    try:
        return adapter.validate_python(given)
    except ValidationError as error:
        first = error.errors()[0]
        if first["type"] == "value_error":
            # A rule of the section itself ("filter.verifier: why"): said with the option's name.
            key, _, why = str(first["ctx"]["error"]).partition(": ")
            raise InputError(f"{_option(key.rsplit('.', 1)[-1])}: {why}") from None
        name = _option(str(first["loc"][0])) if first["loc"] else "options"
        raise InputError(f"{name}: {first['msg']} (got {first.get('input')!r})") from None
