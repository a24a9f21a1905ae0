"""The generated configuration reference: docs/config.md is current, every key is documented, and
every key is read by the code it configures (or is listed as accepted-and-unused, with a reason)."""

from __future__ import annotations

import ast
import fnmatch
import typing
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import Field, PositiveInt

from verl.trainer import config_reference
from verl.trainer.config import REPO_ROOT, CountdownDataConfig, TrainerConfig
from verl.trainer.config_reference import (
    REFERENCE_PATH,
    REGENERATE_COMMAND,
    attribute_docstrings,
    describe_type,
    format_default,
    missing_docstrings,
    render_reference,
)
from verl.utils.config import schema_keys

LEAF_KEYS = [key for key, kind in schema_keys(TrainerConfig).items() if kind != "section"]

# --------------------------------------------------------------------------- the reference


def test_docs_config_md_matches_the_schema():
    current = REFERENCE_PATH.read_text() if REFERENCE_PATH.exists() else ""
    assert current == render_reference(), (
        f"{REFERENCE_PATH.relative_to(REPO_ROOT)} is stale; regenerate it with `{REGENERATE_COMMAND}`")


def test_every_key_has_a_docstring():
    missing = missing_docstrings()
    assert not missing, ("config keys without an attribute docstring (add a string literal on the line "
                         "after the field):\n  " + "\n  ".join(missing))


def test_reference_lists_every_leaf_key_once():
    rows = [line.split("|")[1].strip().strip("`") for line in render_reference().splitlines()
            if line.startswith("| `")]
    assert sorted(rows) == sorted(LEAF_KEYS)


def test_check_fails_on_a_stale_file_and_passes_after_write(tmp_path, monkeypatch, capsys):
    path = tmp_path / "config.md"
    monkeypatch.setattr(config_reference, "REFERENCE_PATH", path)
    assert config_reference.main(["--check"]) == 1
    path.write_text(render_reference() + "edited by hand\n")
    assert config_reference.main(["--check"]) == 1
    assert REGENERATE_COMMAND in capsys.readouterr().err
    assert config_reference.main(["--write"]) == 0
    assert config_reference.main(["--check"]) == 0
    assert path.read_text() == render_reference()


@pytest.mark.parametrize(
    "tp, expected",
    [
        (int, "int"),
        (PositiveInt | None, "int > 0 | null"),
        (Annotated[float, Field(ge=0.0, le=1.0)], "float in [0, 1]"),
        (Annotated[float, Field(gt=0.0, le=1.0)], "float in (0, 1]"),
        (Literal["a", "b"] | None, "'a' | 'b' | null"),
        (list[Literal["x", "y"]], "list['x' | 'y']"),
        (dict[str, typing.Any], "dict"),
    ],
)
def test_types_read_as_a_user_writes_them(tp, expected):
    assert describe_type(tp) == expected


@pytest.mark.parametrize("value, expected", [(None, "null"), (True, "true"), (1e-6, "1.0e-06"), ([], "[]"),
                                             (["a", "b"], "[a, b]"), ("preset:tiny", "preset:tiny")])
def test_defaults_print_as_yaml(value, expected):
    assert format_default(value) == expected


def test_inherited_fields_keep_their_docstrings():
    docs = attribute_docstrings(CountdownDataConfig)
    assert docs["num_numbers"].startswith("Numbers per problem")  # declared in CountdownConfig
    assert docs["train_size"].startswith("Problems in the generated training split")


# ------------------------------------------------------------------------- keys are read

SOURCE_DIRS = ("verl", "recipe")
# Where the schema is declared: only reads inside their function bodies count (validation,
# derived values, start-up notes), never a field's own declaration.
CONFIG_DEFINITION_FILES = {
    "verl/trainer/config.py",
    "verl/workers/actor/config.py",
    "verl/workers/rollout/config.py",
    "verl/utils/config.py",
}
# Reads every field generically to render it; it proves nothing about any one key.
IGNORED_FILES = {"verl/trainer/config_reference.py"}

# Keys accepted for veRL / the VCPO release's compatibility that change nothing in a run: nothing
# reads them, or only a start-up note ("no effect") or a check that refuses a non-default value
# does. ``prefix.*`` covers a whole section.
UNUSED_BY_DESIGN = {
    "critic.*": "every advantage estimator here is critic-free; veRL accepts the section unused",
    "actor_rollout_ref.ref.megatron.*": "the reference policy shares the actor's layout (only param_offload is read); a start-up note says so",
    "actor_rollout_ref.ref.fsdp_config.model_dtype": "the reference policy takes the actor's dtype; a start-up note says so",
    "actor_rollout_ref.hybrid_engine": "rollout and training are always separate workers; true is refused",
    "actor_rollout_ref.model.use_remove_padding": "batches are padded; a start-up note says so",
    "actor_rollout_ref.actor.megatron.use_remove_padding": "batches are padded; a start-up note says so",
    "actor_rollout_ref.actor.megatron.param_offload": "offload is not in this build; true is refused",
    "actor_rollout_ref.actor.megatron.optimizer_offload": "offload is not in this build; true is refused",
    "actor_rollout_ref.actor.megatron.grad_offload": "offload is not in this build; true is refused",
    "actor_rollout_ref.actor.use_dynamic_bsz": "token-budget micro-batches are not in this build; true is refused",
    "actor_rollout_ref.actor.use_rollout_log_probs": "behaviour log-probs always come from the engine; false is refused",
    "actor_rollout_ref.rollout.mode": "the rollouter always drives its engine asynchronously; a start-up note says so",
    "actor_rollout_ref.rollout.calculate_log_probs": "every loss needs the behaviour log-probs; false is refused",
    "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz": "token-budget micro-batches are not in this build; true is refused",
    "actor_rollout_ref.rollout.multi_turn.*": "the multi-turn agent loop is not in this build; enable=true is refused",
    "data.gen_batch_size": "the rollouter admits one prompt group at a time; a start-up note says so",
    "data.filter_overlong_prompts_workers": "prompts are filtered in-process; a start-up note says so",
    "data.return_raw_chat": "prompts are tokenized once by the dataset; a start-up note says so",
    "async_training.use_rollout_log_probs": "behaviour log-probs always come from the engine; false is refused",
    "reward_model.enable": "rewards are rule-based; true is refused",
    "reward_model.reward_manager": "one manager, 'naive' (scored one by one by data_source); the only value allowed",
}


def _names_read(tree: ast.AST, functions_only: bool) -> set[str]:
    """Attribute names loaded (``x.name``) and exact string constants (``"name"``, as in
    ``getattr(cfg, "name")``) in ``tree``; with ``functions_only``, only inside function bodies."""
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        in_function = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if in_function or not functions_only:
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                found.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    return found


def names_read_in_sources(root: Path = REPO_ROOT) -> set[str]:
    names: set[str] = set()
    for directory in SOURCE_DIRS:
        for path in sorted((root / directory).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            if rel in IGNORED_FILES:
                continue
            names |= _names_read(ast.parse(path.read_text(), filename=rel), rel in CONFIG_DEFINITION_FILES)
    return names


def _allowed(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in UNUSED_BY_DESIGN)


def test_name_scan_sees_reads_and_ignores_declarations():
    source = ("class C:\n    declared: int = 0\n    '''doc'''\n"
              "    def method(self):\n        return self.read_attr, getattr(self, 'read_string')\n")
    assert _names_read(ast.parse(source), functions_only=True) >= {"read_attr", "read_string"}
    assert "declared" not in _names_read(ast.parse(source), functions_only=True)
    assert "module_level" not in _names_read(ast.parse("x = cfg.module_level\n"), functions_only=True)
    assert "module_level" in _names_read(ast.parse("x = cfg.module_level\n"), functions_only=False)


def test_every_key_is_read_by_the_code_it_configures():
    names = names_read_in_sources()
    unread = [key for key in LEAF_KEYS if key.rpartition(".")[2] not in names and not _allowed(key)]
    assert not unread, (
        "config keys read by nothing in verl/ or recipe/ (outside their declarations):\n  " + "\n  ".join(unread)
        + "\nread them where they take effect, or add them to UNUSED_BY_DESIGN with a reason")


def test_unused_by_design_names_existing_keys_with_reasons():
    stale = [pattern for pattern in UNUSED_BY_DESIGN if not any(fnmatch.fnmatchcase(k, pattern) for k in LEAF_KEYS)]
    assert not stale, f"UNUSED_BY_DESIGN entries that match no config key (renamed or removed?): {stale}"
    assert all(reason.strip() for reason in UNUSED_BY_DESIGN.values())
