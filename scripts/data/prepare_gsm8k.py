"""Convert a local GSM8K jsonl file (``question``, ``answer`` ending in ``#### N``) to veRL-schema parquet.

Usage: python scripts/data/prepare_gsm8k.py --input gsm8k/train.jsonl --out data/gsm8k/train.parquet --split train
No downloads: fetch the original files yourself. The ground truth is the number after ``####``
with thousands separators removed, and the data source veRL's ``openai/gsm8k``, which veRL's
GSM8K rule scores (verl/utils/reward_score/gsm8k.py; ``--data_source gsm8k_lenient`` for ours).
"""

from __future__ import annotations

import argparse
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from verl.utils.reward_score.gsm8k import reference_answer

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def convert(input_path: str, split: str, data_source: str) -> list[dict]:
    """One veRL row per non-empty line; a record without ``question`` or a ``####`` answer
    raises ValueError naming the file and line."""
    rows = []
    with open(input_path, encoding="utf-8") as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                question, answer = record["question"], record["answer"]
                ground_truth = reference_answer(answer)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{input_path}:{line_number}: not a GSM8K record ({exc!r})") from exc
            rows.append({
                "data_source": data_source,
                "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": ground_truth},
                "extra_info": {"split": split, "index": len(rows), "question": question, "answer": answer},
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="GSM8K jsonl file")
    parser.add_argument("--out", required=True, help="output parquet path")
    parser.add_argument("--split", default="train")
    parser.add_argument("--data_source", default="openai/gsm8k", help="selects the reward rule (docs/rewards.md)")
    args = parser.parse_args(argv)

    rows = convert(args.input, args.split, args.data_source)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), args.out)
    print(f"{args.split}: {len(rows)} GSM8K problems -> {args.out}")
    if rows:
        print(f"  example ground truth {rows[0]['reward_model']['ground_truth']!r}")


if __name__ == "__main__":
    main()
