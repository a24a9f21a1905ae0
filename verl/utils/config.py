"""Start-up validation helpers shared by every typed config section.

Each config dataclass has a ``validate(prefix)`` method that raises ``ConfigError`` naming the
full key (``actor.optim.lr``), the bad value and what would be valid, before Ray starts.
"""

from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
    """An invalid configuration value; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"invalid config {key}={value!r}: {allowed}")

    def __reduce__(self):
        # Rebuild from the constructor's arguments so the error survives pickling (Ray
        # re-raises exceptions from actors in the driver).
        return type(self), (self.key, self.value, self.allowed)


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(key, value, f"must be one of {', '.join(map(repr, choices))}")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ConfigError(key, value, "must be >= 0" if allow_zero else "must be > 0")


def check_range(key: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ConfigError(key, value, f"must be in [{low}, {high}]")


def check_divisible(key: str, value: int, divisor: int, divisor_key: str) -> None:
    if divisor <= 0 or value % divisor != 0:
        raise ConfigError(key, value, f"must be divisible by {divisor_key}={divisor}")
