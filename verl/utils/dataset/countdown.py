"""Countdown task: generator, brute-force solver and parquet writer (the dataset end of the data flow).

A problem is a multiset of numbers and a target; a solution is an arithmetic expression that
uses every number exactly once, e.g. numbers 3,7,12 and target 43 -> ``12*3+7``. Targets are
the value of a random expression over all the numbers, so every problem is solvable. The
prompt is compact for a character-level model (``"3,7,12:43"``) and the answer is the bare
expression (``12*3+7``), ended by the tokenizer's end token. Rows carry the data source
``countdown_lenient``, the rule that reads bare expressions (the release's ``countdown`` rule
reads only ``<answer>`` or ``\\boxed{}`` answers; ``verl/utils/reward_score/countdown_lenient.py``).
"""

from __future__ import annotations

import functools
import itertools
import os
import random
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from verl.utils.config import ConfigError, check_positive, config_section

DATA_SOURCE = "countdown_lenient"
ABILITY = "arithmetic"
ALL_OPERATORS = "+-*/"

# Binding strength used to print expressions with the fewest parentheses.
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM_PRECEDENCE = 3


@config_section
class CountdownConfig:
    """Knobs of the generator. Numbers are drawn uniformly (repeats allowed) from
    [min_value, max_value]; targets outside [min_target, max_target] are redrawn."""

    num_numbers: int = 3
    """Numbers per problem (>= 2)."""
    min_value: int = 1
    """Smallest number drawn."""
    max_value: int = 20
    """Largest number drawn."""
    operators: str = "+-*"
    """Operators the solver may use."""
    min_target: int = 0
    """Smallest target."""
    max_target: int = 999
    """Largest target."""

    def validate(self, prefix: str) -> None:
        if self.num_numbers < 2:
            raise ConfigError(f"{prefix}.num_numbers", self.num_numbers, "must be >= 2")
        check_positive(f"{prefix}.min_value", self.min_value, allow_zero=True)
        if self.max_value < self.min_value:
            raise ConfigError(f"{prefix}.max_value", self.max_value, f"must be >= min_value={self.min_value}")
        if (not self.operators or len(set(self.operators)) != len(self.operators)
                or any(op not in ALL_OPERATORS for op in self.operators)):
            raise ConfigError(f"{prefix}.operators", self.operators,
                              f"must be a non-empty subset of {ALL_OPERATORS!r} without repeats")
        if self.max_target < self.min_target:
            raise ConfigError(f"{prefix}.max_target", self.max_target, f"must be >= min_target={self.min_target}")


@dataclass(frozen=True)
class CountdownProblem:
    numbers: tuple[int, ...]
    target: int

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Identity for de-duplication and split disjointness: the order of numbers does not count."""
        return tuple(sorted(self.numbers)), self.target


def format_prompt(numbers: Iterable[int], target: int) -> str:
    """The user message of a problem: numbers comma-separated, a colon, the target (``"3,7,12:45"``)."""
    return ",".join(str(n) for n in numbers) + f":{target}"


def apply_operator(op: str, left: int, right: int) -> int | None:
    """One exact integer step; ``None`` when division is by zero or leaves a remainder."""
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "*":
        return left * right
    if right == 0 or left % right != 0:
        return None
    return left // right


def render(op: str, left: tuple[str, int], right: tuple[str, int]) -> tuple[str, int]:
    """Print ``left op right`` with minimal parentheses; each operand is (text, precedence).

    A left operand needs parentheses only when it binds weaker than ``op``; a right operand also
    when it binds equally and ``op`` is ``-`` or ``/`` (a-(b-c) != a-b-c). Dropping them for
    ``a+(b-c)`` and ``a*(b/c)`` is safe: with exact division both readings have the same value.
    """
    prec = _PRECEDENCE[op]
    left_text = left[0] if left[1] >= prec else f"({left[0]})"
    right_needs = right[1] < prec or (right[1] == prec and op in "-/")
    right_text = f"({right[0]})" if right_needs else right[0]
    return f"{left_text}{op}{right_text}", prec


@functools.lru_cache(maxsize=65536)
def _ordered_expressions(numbers: tuple[int, ...], operators: str) -> tuple[tuple[int, str, int], ...]:
    """Every (value, text, precedence) of binary trees whose leaves are ``numbers`` in this order."""
    if len(numbers) == 1:
        return ((numbers[0], str(numbers[0]), _ATOM_PRECEDENCE),)
    results = []
    for split in range(1, len(numbers)):
        lefts = _ordered_expressions(numbers[:split], operators)
        rights = _ordered_expressions(numbers[split:], operators)
        for (lv, lt, lp), (rv, rt, rp) in itertools.product(lefts, rights):
            for op in operators:
                value = apply_operator(op, lv, rv)
                if value is not None:
                    text, prec = render(op, (lt, lp), (rt, rp))
                    results.append((value, text, prec))
    return tuple(results)


def solve(numbers: Iterable[int], target: int, operators: str = "+-*") -> list[str]:
    """All distinct expressions (sorted) that use every number exactly once and equal ``target``.

    Brute force over distinct orderings of the numbers and all binary trees on each ordering,
    with exact integer arithmetic (division only when it leaves no remainder; intermediate values
    may be negative). Expressions are distinct as strings, so ``3+4`` and ``4+3`` both appear.
    """
    found: set[str] = set()
    for order in set(itertools.permutations(tuple(numbers))):
        for value, text, _ in _ordered_expressions(order, operators):
            if value == target:
                found.add(text)
    return sorted(found)


def _random_expression_value(rng: random.Random, numbers: list[int], operators: str) -> int | None:
    """Value of a random binary tree over ``numbers`` (in this order) with random operators."""
    if len(numbers) == 1:
        return numbers[0]
    split = rng.randint(1, len(numbers) - 1)
    left = _random_expression_value(rng, numbers[:split], operators)
    right = _random_expression_value(rng, numbers[split:], operators)
    op = rng.choice(operators)
    if left is None or right is None:
        return None
    return apply_operator(op, left, right)


def random_problem(rng: random.Random, config: CountdownConfig) -> CountdownProblem:
    """Draw numbers, then a target as the value of a random expression over all of them."""
    while True:
        numbers = [rng.randint(config.min_value, config.max_value) for _ in range(config.num_numbers)]
        order = numbers[:]
        rng.shuffle(order)
        target = _random_expression_value(rng, order, config.operators)
        if target is not None and config.min_target <= target <= config.max_target:
            return CountdownProblem(tuple(numbers), target)


def generate_problems(count: int, rng: random.Random, config: CountdownConfig, unique: bool = True,
                      exclude: AbstractSet[tuple] = frozenset(),
                      max_attempts_per_problem: int = 1000) -> list[CountdownProblem]:
    """``count`` problems none of whose keys is in ``exclude``; with ``unique`` no key repeats.

    Raises ValueError when the problem space looks exhausted (``max_attempts_per_problem``
    consecutive rejected draws) instead of looping forever.
    """
    problems: list[CountdownProblem] = []
    rejected = set(exclude)
    misses = 0
    while len(problems) < count:
        problem = random_problem(rng, config)
        if problem.key in rejected:
            misses += 1
            if misses >= max_attempts_per_problem:
                raise ValueError(f"countdown: only {len(problems)} acceptable problems found of {count} "
                                 f"requested with {config}; widen the number or target range")
            continue
        misses = 0
        if unique:
            rejected.add(problem.key)
        problems.append(problem)
    return problems


def split_problems(train_size: int, test_size: int, seed: int,
                   config: CountdownConfig | None = None) -> tuple[list[CountdownProblem], list[CountdownProblem]]:
    """Disjoint train and test problem lists, deterministic from ``seed``.

    The test split comes from its own random stream first, so it does not change with
    ``train_size``, and holds distinct keys (sorted numbers, target). Train problems are
    independent draws from the same distribution minus every test key: repeats within train are
    allowed because the default space is small (3 numbers in 1..20 with +-* reach only about
    22k distinct keys in 0..999), so requiring distinct keys would cap the train size.
    """
    config = config or CountdownConfig()
    config.validate("data.countdown")
    test = generate_problems(test_size, random.Random(f"countdown-test-{seed}"), config, unique=True)
    train = generate_problems(train_size, random.Random(f"countdown-train-{seed}"), config, unique=False,
                              exclude={p.key for p in test})
    return train, test


def sft_pairs(problems: Iterable[CountdownProblem], operators: str = "+-*",
              max_per_problem: int | None = None) -> list[tuple[str, str]]:
    """(prompt_text, answer_text) pairs for supervised warm-up: every solver solution of each
    problem (sorted, at most ``max_per_problem``). The prompt text is the user-message content;
    the SFT trainer wraps it in the chat template and ends the answer with the end token."""
    pairs: list[tuple[str, str]] = []
    for problem in problems:
        solutions = solve(problem.numbers, problem.target, operators)
        if max_per_problem is not None:
            solutions = solutions[:max_per_problem]
        prompt = format_prompt(problem.numbers, problem.target)
        pairs.extend((prompt, solution) for solution in solutions)
    return pairs


def problem_to_row(problem: CountdownProblem, split: str, index: int) -> dict:
    """One parquet row in veRL's RL schema."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": format_prompt(problem.numbers, problem.target)}],
        "ability": ABILITY,
        "reward_model": {"style": "rule",
                         "ground_truth": {"target": problem.target, "numbers": list(problem.numbers)}},
        "extra_info": {"split": split, "index": index},
    }


def row_to_problem(row: dict) -> CountdownProblem:
    """Inverse of ``problem_to_row`` (accepts numpy arrays as parquet readers return them)."""
    truth = row["reward_model"]["ground_truth"]
    return CountdownProblem(tuple(int(n) for n in truth["numbers"]), int(truth["target"]))


def write_countdown_parquet(out_dir: str | os.PathLike, train_size: int, test_size: int, seed: int,
                            num_numbers: int = 3, min_value: int = 1, max_value: int = 20, operators: str = "+-*",
                            min_target: int = 0, max_target: int = 999) -> dict[str, str]:
    """Generate disjoint splits and write ``out_dir/train.parquet`` and ``out_dir/test.parquet``.

    The knobs are those of ``CountdownConfig``. Returns the paths by split name. The trainer
    calls this on first run when no data exists.
    """
    config = CountdownConfig(num_numbers, min_value, max_value, operators, min_target, max_target)
    train, test = split_problems(train_size, test_size, seed, config)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, problems in (("train", train), ("test", test)):
        rows = [problem_to_row(p, split, i) for i, p in enumerate(problems)]
        path = os.path.join(os.fspath(out_dir), f"{split}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
        paths[split] = path
    return paths
