"""Typed configuration machinery shared by every config section (config -> every component).

Sections are stdlib dataclasses declared with ``@config_section``: field types (``Literal``
choices, pydantic's ``PositiveInt``/``NonNegativeFloat`` bounds, unions) are checked by pydantic
when ``build_config`` turns a composed Hydra config into the typed objects, and every failure
becomes a ``ConfigError`` naming the full key, the bad value and what is allowed. Unknown keys
fail with a "did you mean" suggestion. Cross-field rules stay hand-written in each section's
``validate(prefix)``, run after construction and before anything starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from pydantic import ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid config {key}={value!r}: {allowed}")

    def __reduce__(self):
        # Rebuild from the constructor's arguments so the error survives pickling (Ray
        # re-raises exceptions from actors in the driver).
        return type(self), (self.key, self.value, self.allowed)


class UnknownKeyError(ConfigError):
    """A key that no config section defines, with the closest known keys as suggestions (or, when
    nothing is close, the keys its section does define)."""

    def __init__(self, key: str, suggestions: tuple[str, ...] = (), siblings: tuple[str, ...] = ()):
        self.suggestions, self.siblings = tuple(suggestions), tuple(siblings)
        if self.suggestions:
            hint = f"did you mean {' or '.join(self.suggestions)}?"
        elif self.siblings:
            hint = f"no such key; {key.rpartition('.')[0] or 'the top level'} has {', '.join(self.siblings)}"
        else:
            hint = "no such key"
        hint += " (keys of earlier versions and their new names: docs/migration.md)"
        super().__init__(key, "<unknown key>", hint)
        self.args = (f"unknown config key {key}: {hint}",)

    def __str__(self) -> str:
        return self.args[0]

    def __reduce__(self):
        return type(self), (self.key, self.suggestions, self.siblings)

    @classmethod
    def for_key(cls, key: str, keys: dict[str, str]) -> UnknownKeyError:
        return cls(key, suggest_keys(key, keys), tuple(section_children(key, keys)))


@typing.dataclass_transform()
def config_section(cls: type[T]) -> type[T]:
    """A dataclass whose fields pydantic type-checks, refusing keys it does not declare."""
    cls.__pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[attr-defined]
    return dataclasses.dataclass(cls)


# ------------------------------------------------------------------------------------ the schema


def _section_type(tp: Any) -> type | None:
    """The dataclass behind a field's annotation (``X`` or ``X | None``), if any."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) is typing.Annotated:
        return None
    for arg in typing.get_args(tp):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _is_open_mapping(tp: Any) -> bool:
    """``dict[...]`` fields accept any sub-key (e.g. Ray's runtime_env)."""
    origin = typing.get_origin(tp) or tp
    return origin is dict or any((typing.get_origin(a) or a) is dict for a in typing.get_args(tp))


def schema_fields(cls: type) -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(name, field, resolved type) of a config dataclass, in declaration order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        yield f.name, f, hints[f.name]


def schema_keys(cls: type, prefix: str = "") -> dict[str, str]:
    """Every dotted key of the schema -> ``section``, ``leaf`` or ``open`` (a mapping: any sub-key)."""
    keys: dict[str, str] = {}
    for name, _, tp in schema_fields(cls):
        key = f"{prefix}{name}"
        sub = _section_type(tp)
        if sub is not None:
            keys[key] = "section"
            keys.update(schema_keys(sub, key + "."))
        else:
            keys[key] = "open" if _is_open_mapping(tp) else "leaf"
    return keys


def is_known_key(key: str, keys: dict[str, str]) -> bool:
    if key in keys:
        return True
    parts = key.split(".")
    return any(keys.get(".".join(parts[:i])) == "open" for i in range(1, len(parts)))


def suggest_keys(key: str, keys: Iterable[str], limit: int = 3) -> tuple[str, ...]:
    """Known keys a user most likely meant: the same ending under another section (a key that
    moved to veRL's tree), else close spellings among the siblings, else close spellings anywhere."""
    keys = list(keys)
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        tail = "." + ".".join(parts[-n:])
        moved = [k for k in keys if k.endswith(tail)]
        if moved:
            return tuple(moved[:limit])
    parent = ".".join(parts[:-1])
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(parts[-1], list(siblings), n=limit, cutoff=0.6)
    if close:
        return tuple(siblings[name] for name in close)
    return tuple(difflib.get_close_matches(key, keys, n=limit, cutoff=0.75))


def section_children(key: str, keys: Iterable[str]) -> list[str]:
    """The names a key's parent section defines (for an error with no close suggestion)."""
    parent = key.rpartition(".")[0]
    return sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)


def check_keys(data: Any, cls: type, prefix: str = "") -> None:
    """Raise ``UnknownKeyError`` for the first key in the nested mapping ``data`` that ``cls``
    does not declare (pydantic would refuse it too, but without a suggestion)."""
    if not isinstance(data, dict):
        return
    fields = {name: tp for name, _, tp in schema_fields(cls)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise UnknownKeyError.for_key(key, schema_keys(cls, prefix))
        sub = _section_type(fields[name])
        if sub is not None:
            check_keys(value, sub, key + ".")


# ------------------------------------------------------------------------------- construction


def build_config(cls: type[T], data: dict[str, Any], root_keys: dict[str, str] | None = None) -> T:
    """The typed ``cls`` from plain nested data, or a ``ConfigError`` naming the first bad key."""
    check_keys(data, cls)
    try:
        return TypeAdapter(cls).validate_python(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(key, first.get("input"), _describe(first)) from None


def _describe(error: dict[str, Any]) -> str:
    msg = error["msg"]
    if error["type"] == "literal_error":
        return f"must be one of {error['ctx']['expected']}"
    return msg[0].lower() + msg[1:] if msg else "invalid value"


def defaults_of(cls: type) -> dict[str, Any]:
    """The schema's defaults as plain nested data (the base node Hydra composes onto)."""
    return dataclasses.asdict(cls())


def check_range(key: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ConfigError(key, value, f"must be in [{low}, {high}]")


def check_divisible(key: str, value: int, divisor: int, divisor_key: str) -> None:
    if divisor <= 0 or value % divisor != 0:
        raise ConfigError(key, value, f"must be divisible by {divisor_key}={divisor}")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ConfigError(key, value, "must be >= 0" if allow_zero else "must be > 0")


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(key, value, f"must be one of {', '.join(map(repr, choices))}")
