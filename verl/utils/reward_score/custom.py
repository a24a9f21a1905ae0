"""A user's reward function loaded from a file path, veRL's ``custom_reward_function`` (reward step after rollout).

``CustomRewardFunction(path, name, reward_kwargs)`` loads ``name`` from the Python file at ``path``
and calls it as veRL's reward managers do::

    fn(data_source=..., solution_str=..., ground_truth=..., extra_info=..., **reward_kwargs)

It returns a float, or a dict whose ``score`` is the reward and whose other numeric entries are
logged as ``reward/extra/<key>/mean``. Constructing one is the start-up check: a missing file, a
file that fails to import, a missing or non-callable ``name``, or a function that cannot take
those arguments raises ``ConfigError`` naming the file and the name. It pickles as (path, name,
kwargs), and unpickling loads the file again: that is how the reward worker process gets the
function, since one loaded from a path cannot be imported by name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from verl.utils.config import ConfigError


def load_reward_function(path: str, name: str) -> Callable[..., Any]:
    """The callable ``name`` defined by the Python file at ``path``; ``ConfigError`` otherwise."""
    resolved = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(resolved):
        raise ConfigError("custom_reward_function.path", path,
                          f"no such file ({resolved}); it must be a Python file defining {name}()")
    # A module name of its own per file, registered so that dataclasses and pickling inside it work.
    module_name = "verl_custom_reward_" + hashlib.sha256(resolved.encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise ConfigError("custom_reward_function.path", path, f"{resolved} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a script's top-level sys.exit() too
        sys.modules.pop(module_name, None)
        raise ConfigError("custom_reward_function.path", path,
                          f"importing {resolved} (for custom_reward_function.name={name!r}) failed: {exc!r}") from exc
    function = getattr(module, name, None)
    if function is None:
        defined = sorted(key for key, value in vars(module).items() if callable(value) and not key.startswith("_"))
        raise ConfigError("custom_reward_function.name", name,
                          f"{resolved} defines no {name!r}; its functions: {', '.join(defined) or 'none'}")
    if not callable(function):
        raise ConfigError("custom_reward_function.name", name,
                          f"{name!r} in {resolved} is a {type(function).__name__}, not a function")
    return function


def _check_signature(function: Callable[..., Any], path: str, name: str, reward_kwargs: Mapping[str, Any]) -> None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # some builtins and C callables have none to inspect
        return
    try:
        signature.bind(data_source="", solution_str="", ground_truth=None, extra_info=None, **reward_kwargs)
    except TypeError as exc:
        raise ConfigError("custom_reward_function.name", name,
                          f"{name}{signature} in {path} cannot be called as {name}(data_source, solution_str, "
                          f"ground_truth, extra_info=None, **reward_kwargs) with reward_kwargs="
                          f"{dict(reward_kwargs)}: {exc}") from exc


class CustomRewardFunction:
    """``compute_score(data_source, solution_str, ground_truth, extra_info)`` backed by a user's file."""

    def __init__(self, path: str, name: str = "compute_score", reward_kwargs: Mapping[str, Any] | None = None):
        self.path = os.path.abspath(os.path.expanduser(path))
        self.name = name
        self.reward_kwargs = dict(reward_kwargs or {})
        self._function = load_reward_function(path, name)
        _check_signature(self._function, self.path, name, self.reward_kwargs)

    def __call__(self, data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> Any:
        return self._function(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth,
                              extra_info=extra_info, **self.reward_kwargs)

    def __reduce__(self):
        return type(self), (self.path, self.name, self.reward_kwargs)

    def __repr__(self) -> str:
        return f"CustomRewardFunction({self.path!r}, {self.name!r}, reward_kwargs={self.reward_kwargs!r})"
