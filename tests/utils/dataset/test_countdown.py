"""Countdown generator and solver: solutions are valid and complete, splits are disjoint and reproducible."""

from __future__ import annotations

import ast
import random
from fractions import Fraction

import pyarrow.parquet as pq
import pytest

from verl.utils.config import ConfigError
from verl.utils.dataset.countdown import (
    CountdownConfig,
    CountdownProblem,
    format_prompt,
    generate_problems,
    row_to_problem,
    sft_pairs,
    solve,
    split_problems,
    write_countdown_parquet,
)
from verl.utils.reward_score.countdown_lenient import compute_score


def exact_value(expression: str) -> Fraction:
    """Independent evaluation of a trusted solver output in exact rationals."""
    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant):
            return Fraction(node.value)
        left, right = walk(node.left), walk(node.right)
        return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right,
                ast.Div: left / right if right else Fraction(10**18)}[type(node.op)]
    return walk(ast.parse(expression, mode="eval").body)


def leaves(expression: str) -> list[int]:
    return sorted(node.value for node in ast.walk(ast.parse(expression, mode="eval")) if isinstance(node, ast.Constant))


def test_small_cases_equal_hand_enumerated_sets():
    assert solve([1, 2], 3) == ["1+2", "2+1"]
    assert solve([2, 2], 4) == ["2*2", "2+2"]
    assert solve([5, 3], 2) == ["5-3"]
    assert solve([6, 3], 2, operators="+-*/") == ["6/3"]
    assert solve([6, 4], 2, operators="+-*") == ["6-4"]
    assert solve([6, 4], 2, operators="+*") == []
    # 1,2,3 -> 0 by hand: a+b-c with a+b=c, c-a-b, and c-(a+b) in both orders of a, b.
    assert solve([1, 2, 3], 0, operators="+-") == sorted(
        ["1+2-3", "2+1-3", "3-1-2", "3-2-1", "3-(1+2)", "3-(2+1)", "1-3+2", "2-3+1", "1-(3-2)", "2-(3-1)"])
    assert solve([2, 3, 4], 20, operators="+*") == ["(2+3)*4", "(3+2)*4", "4*(2+3)", "4*(3+2)"]


def test_division_only_when_exact():
    assert solve([7, 2], 3, operators="/") == []  # 7/2 leaves a remainder
    # By hand: 12 = (8/2)*3 = 3*(8/2) = (8*3)/2 = (3*8)/2; 8*(3/2) is excluded (3/2 is not exact),
    # and 3*(8/2) prints as 3*8/2 like (3*8)/2.
    assert solve([8, 2, 3], 12, operators="*/") == ["3*8/2", "8*3/2", "8/2*3"]


def test_solver_returns_only_valid_solutions_and_one_for_every_generated_problem():
    config = CountdownConfig(operators="+-*/")
    problems = generate_problems(300, random.Random(7), config)
    for problem in problems:
        solutions = solve(problem.numbers, problem.target, config.operators)
        assert solutions, problem
        assert len(set(solutions)) == len(solutions)
        truth = {"target": problem.target, "numbers": list(problem.numbers)}
        for expression in solutions:
            assert exact_value(expression) == problem.target
            assert leaves(expression) == sorted(problem.numbers)
            assert compute_score(expression, truth) == 1.0


def test_minimal_parentheses():
    solutions = solve([2, 3, 4], 2, operators="+-*")
    assert "(2*3)-4" not in solutions and "2*3-4" in solutions and "(4-3)*2" in solutions
    assert {"4-(3-2)", "4-3+2", "4+(2-3)"} & set(solve([2, 3, 4], 3, operators="+-")) == {"4-(3-2)", "4-3+2"}
    # Every pair of parentheses printed is needed: removing it changes the value.
    for expression in solutions + solve([2, 3, 4], 3, operators="+-"):
        for start in (i for i, ch in enumerate(expression) if ch == "("):
            depth, end = 0, start
            for end in range(start, len(expression)):
                depth += {"(": 1, ")": -1}.get(expression[end], 0)
                if depth == 0:
                    break
            stripped = expression[:start] + expression[start + 1:end] + expression[end + 1:]
            assert exact_value(stripped) != exact_value(expression), (expression, stripped)


def test_problems_respect_the_config():
    config = CountdownConfig(num_numbers=4, min_value=2, max_value=9, operators="+*", min_target=10, max_target=200)
    for problem in generate_problems(200, random.Random(1), config):
        assert len(problem.numbers) == 4
        assert all(2 <= n <= 9 for n in problem.numbers)
        assert 10 <= problem.target <= 200


def test_splits_are_disjoint_unique_and_deterministic():
    train, test = split_problems(3000, 300, seed=5)
    assert len(train) == 3000 and len(test) == 300
    assert len({p.key for p in test}) == 300
    assert not {p.key for p in train} & {p.key for p in test}
    assert split_problems(3000, 300, seed=5) == (train, test)
    # The test split does not depend on the train size, and another seed gives other problems.
    assert split_problems(100, 300, seed=5)[1] == test
    assert split_problems(3000, 300, seed=6)[1] != test


def test_exhausted_space_raises_instead_of_looping():
    tiny = CountdownConfig(num_numbers=2, min_value=1, max_value=2, operators="+")
    with pytest.raises(ValueError, match="distinct|acceptable"):
        generate_problems(10, random.Random(0), tiny, max_attempts_per_problem=200)


def test_prompt_format_and_sft_pairs():
    assert format_prompt([3, 7, 12], 45) == "3,7,12:45"
    problems = [CountdownProblem((3, 7, 12), 45), CountdownProblem((1, 2), 3)]
    pairs = sft_pairs(problems)
    assert pairs[-2:] == [("1,2:3", "1+2"), ("1,2:3", "2+1")]
    assert {answer for prompt, answer in pairs if prompt == "3,7,12:45"} == set(solve((3, 7, 12), 45))
    assert sft_pairs(problems, max_per_problem=1)[-1] == ("1,2:3", "1+2")


@pytest.mark.parametrize("field, value", [("num_numbers", 1), ("operators", "+^"), ("operators", "++"),
                                          ("max_value", 0), ("max_target", -1)])
def test_config_errors_name_the_key(field, value):
    config = CountdownConfig(**{field: value})
    with pytest.raises(ConfigError) as info:
        config.validate("data.countdown")
    assert info.value.key == f"data.countdown.{field}"


def test_parquet_round_trip(tmp_path):
    paths = write_countdown_parquet(tmp_path, train_size=50, test_size=20, seed=3)
    train, test = split_problems(50, 20, seed=3)
    for split, problems in (("train", train), ("test", test)):
        rows = pq.read_table(paths[split]).to_pylist()
        assert [row_to_problem(row) for row in rows] == problems
        row = rows[0]
        assert row["data_source"] == "countdown_lenient"  # the rule that reads bare expressions
        assert row["prompt"] == [{"role": "user", "content": format_prompt(problems[0].numbers, problems[0].target)}]
        assert row["reward_model"] == {"style": "rule", "ground_truth": {"target": problems[0].target,
                                                                         "numbers": list(problems[0].numbers)}}
        assert row["extra_info"] == {"split": split, "index": 0}
