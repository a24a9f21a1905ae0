"""Convert local MATH problems (``problem``, ``solution`` with ``\\boxed{}``) to veRL-schema parquet.

Usage: python scripts/data/prepare_math.py --input MATH/test --out data/math/test.parquet --split test
``--input`` is a jsonl file, a json file (one problem or a list), or a directory searched
recursively for ``*.json`` (the original release's one-file-per-problem layout). No downloads.
The ground truth is the content of the solution's last ``\\boxed{}``, braces matched. The data
source is veRL's ``DigitalLearningGmbH/MATH-lighteval``, which veRL's boxed-answer string match
scores (verl/utils/reward_score/math_reward.py; ``--data_source math_lenient`` for math-verify).
Not ``math``: veRL and the release route that name to DAPO's ``Answer:`` rule.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from verl.utils.reward_score.math import extract_boxed_answer

INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def read_records(input_path: str) -> Iterator[tuple[str, dict]]:
    """(location, record) pairs; the location names the file (and line) for error messages."""
    if os.path.isdir(input_path):
        for directory, _, names in sorted(os.walk(input_path)):
            for name in sorted(names):
                if name.endswith(".json"):
                    yield from read_records(os.path.join(directory, name))
    elif input_path.endswith(".jsonl"):
        with open(input_path, encoding="utf-8") as lines:
            for line_number, line in enumerate(lines, start=1):
                if line.strip():
                    yield f"{input_path}:{line_number}", json.loads(line)
    else:
        with open(input_path, encoding="utf-8") as handle:
            content = json.load(handle)
        for position, record in enumerate(content if isinstance(content, list) else [content]):
            yield f"{input_path}[{position}]" if isinstance(content, list) else input_path, record


def convert(input_path: str, split: str, data_source: str) -> list[dict]:
    """One veRL row per problem; a record without ``problem`` or a boxed answer raises ValueError
    naming where it came from."""
    rows = []
    for location, record in read_records(input_path):
        problem, solution = record.get("problem"), record.get("solution")
        ground_truth = extract_boxed_answer(solution) if isinstance(solution, str) else None
        if not isinstance(problem, str) or not ground_truth:
            raise ValueError(f"{location}: not a MATH record with a problem and a \\boxed{{}} answer")
        rows.append({
            "data_source": data_source,
            "prompt": [{"role": "user", "content": f"{problem} {INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": ground_truth},
            "extra_info": {"split": split, "index": len(rows), "level": str(record.get("level", "")),
                           "type": str(record.get("type", "")), "solution": solution},
        })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="MATH jsonl/json file or directory of json files")
    parser.add_argument("--out", required=True, help="output parquet path")
    parser.add_argument("--split", default="test")
    parser.add_argument("--data_source", default="DigitalLearningGmbH/MATH-lighteval",
                        help="selects the reward rule (docs/rewards.md)")
    args = parser.parse_args(argv)

    rows = convert(args.input, args.split, args.data_source)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out)
    print(f"{args.split}: {len(rows)} MATH problems -> {args.out}")
    if rows:
        print(f"  example ground truth {rows[0]['reward_model']['ground_truth']!r}")


if __name__ == "__main__":
    main()
