"""Generate Countdown train/test parquet files in veRL's schema (the dataset end of the data flow).

Usage: python scripts/data/prepare_countdown.py --out_dir data/countdown --train_size 20000 --test_size 500 --seed 1234
"""

from __future__ import annotations

import argparse
import statistics

import pyarrow.parquet as pq

from verl.utils.dataset.countdown import CountdownConfig, row_to_problem, solve, write_countdown_parquet


def main(argv: list[str] | None = None) -> None:
    defaults = CountdownConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--train_size", type=int, default=20000)
    parser.add_argument("--test_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--num_numbers", type=int, default=defaults.num_numbers)
    parser.add_argument("--min_value", type=int, default=defaults.min_value)
    parser.add_argument("--max_value", type=int, default=defaults.max_value)
    parser.add_argument("--operators", default=defaults.operators)
    parser.add_argument("--min_target", type=int, default=defaults.min_target)
    parser.add_argument("--max_target", type=int, default=defaults.max_target)
    args = parser.parse_args(argv)

    paths = write_countdown_parquet(args.out_dir, args.train_size, args.test_size, args.seed,
                                    num_numbers=args.num_numbers, min_value=args.min_value,
                                    max_value=args.max_value, operators=args.operators,
                                    min_target=args.min_target, max_target=args.max_target)
    for split, path in paths.items():
        rows = pq.read_table(path).to_pylist()
        problems = [row_to_problem(row) for row in rows]
        targets = [p.target for p in problems]
        # Solving every row of a large train split takes seconds; a prefix shows the difficulty.
        solutions = [len(solve(p.numbers, p.target, args.operators)) for p in problems[:1000]]
        print(f"{split}: {len(rows)} problems -> {path}")
        if rows:
            print(f"  targets {min(targets)}..{max(targets)} (median {statistics.median(targets)}); "
                  f"solutions per problem (first {len(solutions)}): mean {statistics.mean(solutions):.2f}, "
                  f"min {min(solutions)}")
            print(f"  example prompt {rows[0]['prompt'][0]['content']!r}, "
                  f"ground truth {rows[0]['reward_model']['ground_truth']}")


if __name__ == "__main__":
    main()
