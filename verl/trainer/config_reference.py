"""The generated configuration reference, docs/config.md (config schema -> docs; checked in CI).

Every key of ``TrainerConfig`` with its type, its default and its meaning, read from the schema
itself: types from the resolved annotations (``Literal`` choices, pydantic's bounds), defaults
from ``defaults_of(TrainerConfig)`` (the base node Hydra composes onto), meanings from the
attribute docstrings (the string literal right after each field), read with ``ast`` because
Python keeps no trace of them at run time. ``--write`` regenerates the file; ``--check`` fails
when it is stale.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import textwrap
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from verl.trainer.config import REPO_ROOT, TrainerConfig
from verl.utils.config import _section_type, defaults_of, schema_fields

REFERENCE_PATH = REPO_ROOT / "docs" / "config.md"
REGENERATE_COMMAND = "python -m verl.trainer.config_reference --write"

INTRO = f"""\
# Configuration reference

Generated from the typed schema, `verl.trainer.config.TrainerConfig`: do not edit by hand;
regenerate with `{REGENERATE_COMMAND}` (the tests fail when this file is stale).

One table per section of veRL's key tree, with each key's default in the schema. A bare
`TrainerConfig()` is valid; the CPU default (`configs/ppo_trainer.yaml`) composes the `task` and
`method` groups from `configs/task/` and `configs/method/` on top of these defaults, and the
command line overrides any key, e.g. `actor_rollout_ref.actor.optim.lr=5e-5`. In the type
column `null` means "not set", `'a' | 'b'` lists the allowed values, and `> 0`, `>= 0`,
`in [0, 1]` are bounds checked before anything starts. Renamed keys: [migration.md](migration.md).
"""


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    key: str
    type: str
    default: str
    meaning: str


@dataclasses.dataclass(frozen=True)
class SectionDoc:
    path: str
    summary: str
    keys: tuple[KeyDoc, ...]


# ------------------------------------------------------------------------------ docstrings


@functools.cache
def _class_source_docs(cls: type) -> tuple[str, dict[str, str]]:
    """(class docstring, field -> attribute docstring) declared in ``cls``'s own body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return "", {}
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef))
    docs: dict[str, str] = {}
    for stmt, after in zip(node.body, node.body[1:] + [None]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[stmt.target.id] = after.value.value
    return ast.get_docstring(node) or "", docs


def attribute_docstrings(cls: type) -> dict[str, str]:
    """Field -> attribute docstring, inherited ones included (a subclass's own wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_class_source_docs(klass)[1])
    return docs


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _section_summary(cls: type) -> str:
    """The first paragraph of the class docstring without the section path it opens with (the
    heading gives the path, and a class used at two paths names only one of them)."""
    first = inspect.cleandoc(_class_source_docs(cls)[0]).split("\n\n")[0]
    text = _one_line(first)
    if text.startswith("``"):
        end = text.find("``", 2)
        if end > 0 and text[end + 2:end + 3] in (":", "."):
            text = text[end + 3:].strip()
    # Capitalise a sentence, not a name such as ``vLLM``.
    return text[:1].upper() + text[1:] if text[1:2].islower() else text


# ----------------------------------------------------------------------------------- types


def _bounds(metadata: list[Any]) -> str:
    """pydantic's annotated constraints (``Gt``/``Ge``/``Lt``/``Le``, also inside ``Field(...)``)."""
    found: dict[str, Any] = {}
    for item in metadata:
        inner = getattr(item, "metadata", None)
        for constraint in (inner if isinstance(inner, list) else [item]):
            for name in ("gt", "ge", "lt", "le"):
                value = getattr(constraint, name, None)
                if value is not None:
                    found[name] = value
    low_name = "gt" if "gt" in found else "ge" if "ge" in found else None
    high_name = "lt" if "lt" in found else "le" if "le" in found else None
    if low_name and high_name:
        return (f"in {'(' if low_name == 'gt' else '['}{found[low_name]:g}, "
                f"{found[high_name]:g}{')' if high_name == 'lt' else ']'}")
    if low_name:
        return f"{'>' if low_name == 'gt' else '>='} {found[low_name]:g}"
    if high_name:
        return f"{'<' if high_name == 'lt' else '<='} {found[high_name]:g}"
    return ""


def describe_type(tp: Any) -> str:
    """A field's type as a user reads it: ``int > 0``, ``float in [0, 1]``, ``'a' | 'b'``,
    ``list[str]``, ``str | null``."""
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *metadata = typing.get_args(tp)
        bounds = _bounds(metadata)
        return f"{describe_type(base)} {bounds}" if bounds else describe_type(base)
    if origin is typing.Literal:
        return " | ".join(repr(choice) for choice in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        # None last, as a reader expects "the value, or null".
        ordered = [a for a in args if a is not type(None)] + [a for a in args if a is type(None)]
        return " | ".join(describe_type(a) for a in ordered)
    if origin is dict:
        return "dict"
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"list[{describe_type(item)}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def format_default(value: Any) -> str:
    """A default as YAML prints it (``null``, ``true``, ``[0.9, 0.999]``, ``1.0e-06``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("...").strip()


# ---------------------------------------------------------------------------------- schema


def _sections(cls: type, path: str, defaults: dict[str, Any]) -> Iterator[SectionDoc]:
    docs = attribute_docstrings(cls)
    keys, subsections = [], []
    for name, _, tp in schema_fields(cls):
        key = f"{path}.{name}" if path else name
        sub = _section_type(tp)
        if sub is not None:
            subsections.append((sub, key, defaults[name]))
        else:
            keys.append(KeyDoc(key, describe_type(tp), format_default(defaults[name]),
                               _one_line(docs.get(name, ""))))
    if keys:
        yield SectionDoc(path, _section_summary(cls), tuple(keys))
    for sub, key, sub_defaults in subsections:
        yield from _sections(sub, key, sub_defaults)


def sections(root: type = TrainerConfig) -> list[SectionDoc]:
    """Every section that declares keys, in schema order (depth first), with its keys."""
    return list(_sections(root, "", defaults_of(root)))


def missing_docstrings(root: type = TrainerConfig) -> list[str]:
    """Leaf keys whose field has no attribute docstring."""
    return [k.key for s in sections(root) for k in s.keys if not k.meaning]


# ---------------------------------------------------------------------------------- render


def _cell(text: str, code: bool = False) -> str:
    text = text.replace("|", "\\|")
    return f"`{text}`" if code and text else text


def render_reference() -> str:
    """The Markdown of docs/config.md."""
    out = [INTRO]
    for section in sections():
        out.append(f"\n## `{section.path}`\n")
        if section.summary:
            out.append(f"\n{section.summary}\n")
        out.append("\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for k in section.keys:
            out.append(f"| {_cell(k.key, code=True)} | {_cell(k.type, code=True)} | "
                       f"{_cell(k.default, code=True)} | {_cell(k.meaning)} |\n")
    return "".join(out)


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m verl.trainer.config_reference",
                                     description="Print, write or check docs/config.md.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"write {_shown(REFERENCE_PATH)}")
    mode.add_argument("--check", action="store_true", help="exit 1 if the file differs from the schema")
    args = parser.parse_args(argv)
    text, path = render_reference(), REFERENCE_PATH
    if args.write:
        path.write_text(text)
        print(f"wrote {_shown(path)}")
    elif args.check:
        current = path.read_text() if path.exists() else None
        if current != text:
            what = "is missing" if current is None else "is stale (it differs from the schema)"
            print(f"{_shown(path)} {what}; regenerate it with `{REGENERATE_COMMAND}`", file=sys.stderr)
            return 1
        print(f"{_shown(path)} is up to date")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
