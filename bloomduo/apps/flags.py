"""Command-line flags derived from settings dataclasses, and back.

Each field whose metadata has a "help" is one flag: `--field-name`, or `--no-field-name` for a boolean
that defaults to True; metadata "flag" names it otherwise and "choices" limits its values. So a
setting's default and help are written once, where the setting is defined. `to_flags` turns a settings
object into the flags that reproduce it: that is how `bloomduo up` forwards its settings to the services
it starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

Settings = TypeVar("Settings")


def _flagged(settings_type: type) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(settings_type)
    fields = [f for f in dataclasses.fields(settings_type) if "help" in f.metadata]
    return [(f, _plain_type(hints[f.name])) for f in fields]


def _plain_type(hint: Any) -> type:
    """int | None -> int."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (plain,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
        return plain
    return hint


def _flag_name(field: dataclasses.Field, kind: type) -> str:
    if "flag" in field.metadata:
        return field.metadata["flag"]
    name = field.name.replace("_", "-")
    return f"--no-{name}" if kind is bool and field.default is True else f"--{name}"


def add_flags(parser: argparse.ArgumentParser, settings_type: type, title: str | None = None) -> None:
    """One flag per flagged field of `settings_type`, in a group titled `title` when given."""
    group = parser.add_argument_group(title) if title else parser
    for field, kind in _flagged(settings_type):
        flag, help_text = _flag_name(field, kind), field.metadata["help"]
        if kind is bool:
            action = "store_false" if field.default is True else "store_true"
            group.add_argument(flag, dest=field.name, action=action, help=help_text)
            continue
        group.add_argument(
            flag,
            dest=field.name,
            type=kind,
            default=field.default,
            choices=field.metadata.get("choices"),
            help=help_text if field.default is None else f"{help_text} (default: {field.default})",
        )


def from_args(settings_type: type[Settings], args: argparse.Namespace, **fields: Any) -> Settings:
    """The settings the parsed flags say, plus `fields` for the ones that are not flags."""
    flagged = {field.name: getattr(args, field.name) for field, _ in _flagged(settings_type)}
    return settings_type(**flagged, **fields)


def to_flags(settings: Any) -> list[str]:
    """The flags that make add_flags' parser rebuild `settings`: only those that differ from the default."""
    flags: list[str] = []
    for field, kind in _flagged(type(settings)):
        value = getattr(settings, field.name)
        if value == field.default:
            continue
        flags += [_flag_name(field, kind)] if kind is bool else [_flag_name(field, kind), str(value)]
    return flags
