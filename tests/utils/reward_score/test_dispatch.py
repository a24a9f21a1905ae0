"""Routing by data_source follows the release's default_compute_score name for name, and the CPU
task's generated data (countdown_lenient) scores exactly as it did before the rules were split."""

from __future__ import annotations

import random
import string

import pytest

from verl.utils.dataset.countdown import DATA_SOURCE, problem_to_row, solve, split_problems
from verl.utils.reward_score import (
    RULES,
    RewardManager,
    check_data_sources,
    countdown_lenient,
    default_compute_score,
    rule_name,
)

# The release's routing (verl/utils/reward_score/__init__.py of the VCPO release), restated.
RELEASE_ROUTING = {
    "openai/gsm8k": "gsm8k",
    **dict.fromkeys(["lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500", "math-500",
                     "deepscaler", "test-math-aime24", "test-math-aime25", "dapo_filter"], "math_reward"),
    **dict.fromkeys(["math_dapo", "math", "math_dapo_reasoning", "aime2024", "aime2025", "aime"], "math_dapo"),
    "countdown": "countdown",
}


@pytest.mark.parametrize("source, rule", sorted(RELEASE_ROUTING.items()))
def test_release_data_sources_get_the_release_rule(source, rule):
    assert rule_name(source) == rule


def test_our_names_and_in_process_rules():
    assert [rule_name(s) for s in ("gsm8k", "countdown_lenient", "gsm8k_lenient", "math_lenient")] == [
        "gsm8k", "countdown_lenient", "gsm8k_lenient", "math_lenient"]
    # Only math-verify (a third-party parser that can hang) goes to the worker process.
    assert [name for name, rule in RULES.items() if not rule.in_process] == ["math_lenient"]


def test_unknown_and_unavailable_sources_fail_the_start_up_check():
    check_data_sources(["countdown", "countdown_lenient", "openai/gsm8k", "math-500", "aime2025"])
    with pytest.raises(ValueError) as info:
        check_data_sources(["countdown", "AIME2024"])  # the release matches names case-sensitively
    assert "AIME2024" in str(info.value) and "aime*" in str(info.value) and "custom_reward_function" in str(info.value)
    with pytest.raises(ValueError, match="did you mean 'countdown'"):
        check_data_sources(["Countdown"])
    with pytest.raises(ValueError, match="prime_math.*custom_reward_function.path"):
        check_data_sources(["numina_olympiads"])
    with pytest.raises(ValueError, match="no reward function for data_source='my_task'"):
        default_compute_score("my_task", "x", "x")


CPU_TRUTH = {"target": 43, "numbers": [3, 7, 12]}
# CPU-task responses and the scores the countdown rule gave them before the rules were split
# (recorded by running that rule, then data source "countdown", on each).
CPU_CASES_BEFORE = [
    ("12*3+7", 1.0), ("7+3*12", 1.0), ("3*12+7", 1.0), ("(12*3)+7", 1.0), (" 12*3+7 ", 1.0), ("12*3+7\n", 1.0),
    ("12*3+7<|end|>", 1.0), ("<answer>12*3+7</answer>", 1.0), ("x<answer>7+12*3</answer>", 1.0),
    ("12 * 3 + 7", 1.0), ("12*3+ 7", 1.0), ("7+(12*3)", 1.0), ("7+12*(3)", 1.0), ("((7))+12*3", 1.0),
    ("<answer> 12*3+7 </answer>", 1.0), ("<answer>12*3+7</answer>x", 1.0), ("12*3+7<|end|>junk", 1.0),
    ("12*3-7", 0.0), ("12*3+7+3", 0.0), ("12*3", 0.0), ("3+7+12", 0.0), ("12*3+7=43", 0.0), ("-12*-3+7", 0.0),
    ("12.0*3+7", 0.0), ("12*3+7)", 0.0), ("(12*3+7", 0.0), ("", 0.0), (" ", 0.0), ("<answer>12*3+7", 0.0),
    ("\\boxed{12*3+7}", 0.0), ("12*3+07", 0.0), ("1 2*3+7", 0.0), ("12*3//7", 0.0), ("12**3+7", 0.0),
    ("43", 0.0), ("12*(3+7)", 0.0), ("12x3+7", 0.0), ("12*3+7;", 0.0), ("12/3+7", 0.0), ("abc", 0.0),
    ("12*3+7+0", 0.0), ("7--36", 0.0),
]


@pytest.mark.parametrize("response, before", CPU_CASES_BEFORE)
def test_cpu_task_scores_as_before(response, before):
    assert default_compute_score(DATA_SOURCE, response, CPU_TRUTH) == before


def _cpu_style_responses(rng: random.Random, numbers: tuple[int, ...], target: int) -> list[str]:
    """Solver solutions, their near misses, and noise of the tiny model's length and alphabet."""
    solutions = solve(numbers, target)[:3]
    responses = list(solutions)
    for solution in solutions:
        position = rng.randrange(len(solution))
        responses += [solution[:position] + solution[position + 1:],                   # a character lost
                      solution[:position] + rng.choice("+-*/()0123456789 ") + solution[position:],
                      solution.replace("+", "-", 1), solution + "+1", f"<answer>{solution}</answer>",
                      f"({solution})", f"\\boxed{{{solution}}}"]
    responses += ["".join(rng.choice(string.printable[:95]) for _ in range(rng.randint(0, 16))) for _ in range(3)]
    responses += ["".join(rng.choice("0123456789+-*()") for _ in range(rng.randint(1, 16))) for _ in range(3)]
    return responses


def test_generated_cpu_data_is_scored_by_the_reward_manager_as_the_lenient_rule_scores_it():
    rng = random.Random(0)
    _, problems = split_problems(0, 60, seed=11)
    sources, responses, truths = [], [], []
    for index, problem in enumerate(problems):
        row = problem_to_row(problem, "test", index)
        for response in _cpu_style_responses(rng, problem.numbers, problem.target):
            sources.append(row["data_source"])
            responses.append(response)
            truths.append(row["reward_model"]["ground_truth"])
    with RewardManager() as manager:
        scores, stats = manager.score(sources, responses, truths)
    expected = [countdown_lenient.compute_score(r, t) for r, t in zip(responses, truths)]
    assert scores.tolist() == expected
    assert stats["reward/num_errors"] == 0
    assert 150 < sum(expected) < len(expected) - 500  # correct and wrong answers both well represented
    # The release's rule would read none of the bare solutions: why the CPU task has its own source.
    bare = [(r, t) for r, t, s in zip(responses, truths, expected) if s == 1.0 and r[0] not in "<\\"]
    assert bare and all(default_compute_score("countdown", r, t) == 0.0 for r, t in bare)
