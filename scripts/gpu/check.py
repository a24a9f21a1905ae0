"""The GPU check: five items, each in its own process with its own time budget, one summary.

    python scripts/gpu/check.py --out DIR              # on a machine with one CUDA GPU (≤ 8 min)
    python scripts/gpu/check.py --out DIR --cpu-dry-run  # every step at toy sizes on the CPU

Each item runs as ``check.py --run-item NAME`` in a fresh process (a CUDA fault or an NCCL hang in
one item cannot take the others down), prints its progress, and records its numbers and checks to
a JSON file after every step, so an item that fails or runs out of time still reports what it
measured. The summary is ``DIR/summary.json`` and ``DIR/summary.md`` (``summary.py``); the exit
status is 0 only when every item is ``ok``.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


class Item:
    def __init__(self, name: str, module: str, title: str, budget_s: float, dry_budget_s: float):
        self.name, self.module, self.title = name, module, title
        self.budget_s, self.dry_budget_s = budget_s, dry_budget_s


# GPU budgets add up to 445 s, leaving room for process start-up inside the 8-minute target.
ITEMS = [
    Item("actor", "item_actor", "torch actor: VCPO update on the device vs CPU fp32; bf16", 55, 120),
    Item("megatron", "item_megatron", "Megatron actor at TP=1: log-probs vs HF; bf16 VCPO step", 80, 150),
    Item("engine", "item_engine", "torch engine: greedy vs HF generate; tokens/s at Qwen2.5-0.5B shape", 80, 120),
    Item("vcpo_cost", "item_cost", "VCPO cost at size: OPOB step time and peak memory vs plain", 160, 150),
    Item("channel", "item_channel", "weight channel: CUDA-tensor packing; NCCL broadcast on one GPU", 70, 120),
]
TOTAL_BUDGET_S = 470.0
ABSENT_ON_GPU_MACHINE = ("ray", "vllm", "hydra", "omegaconf")
GRACE_S = 15.0  # at most, after an item's budget, before it is killed (it was asked to stop by then)


def _run_item(name: str, result: Path, budget_s: float, dry_run: bool) -> int:
    """Child side: run one item, record ok / fail / error in ``result``; exit 0 unless it crashed."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(REPO))
    import torch
    from common import Context, Recorder, environment

    rec = Recorder(result)
    item = next(i for i in ITEMS if i.name == name)
    device = torch.device("cpu" if dry_run else "cuda")
    ctx = Context(name, dry_run, device, time.monotonic() + budget_s)
    try:
        if not dry_run and not torch.cuda.is_available():
            raise RuntimeError("no CUDA device is visible; run with --cpu-dry-run on a machine without a GPU")
        if device.type == "cuda":
            torch.cuda.set_device(0)
        rec.data["environment"] = environment()
        importlib.import_module(item.module).run(ctx, rec)
        # The GPU machine has none of these: an item that imports one would fail there.
        absent = sorted({m.split(".")[0] for m in sys.modules} & set(ABSENT_ON_GPU_MACHINE))
        rec.check("imports nothing the GPU machine lacks", ",".join(absent) or "none", "none", not absent)
        failed = [c["name"] for c in rec.data["checks"] if not c["passed"]]
        rec.data["status"] = "fail" if failed else "ok"
        if failed:
            rec.data["error"] = "checks failed: " + "; ".join(failed)
    except BaseException as err:  # noqa: BLE001 - recorded with its traceback; the next item still runs
        rec.data["status"] = "error"
        rec.data["error"] = f"{type(err).__name__}: {err}"
        rec.data["traceback"] = traceback.format_exc()
        ctx.log(rec.data["traceback"])
    rec.data["elapsed_s"] = round(time.monotonic() - ctx.started, 2)
    rec.flush()
    ctx.log(f"status {rec.data['status']}")
    return 0


def _stream(proc: subprocess.Popen, tail: collections.deque, log) -> None:
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        tail.append(line)


def _launch(item: Item, budget_s: float, dry_run: bool, workdir: Path, log) -> dict:
    """Parent side: run ``item`` in a new process group, stream its output, kill it past its budget."""
    result = workdir / f"{item.name}.json"
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--run-item", item.name, "--result", str(result),
           "--budget-s", str(budget_s)] + (["--cpu-dry-run"] if dry_run else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    # Megatron and transformers warn at every import about what this machine lacks (Apex, TE).
    env.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning")
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path, also on a machine with a GPU
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True, cwd=REPO)
    tail: collections.deque = collections.deque(maxlen=40)
    reader = threading.Thread(target=_stream, args=(proc, tail, log), daemon=True)
    reader.start()
    timed_out = False
    grace = min(GRACE_S, budget_s)
    try:
        proc.wait(timeout=budget_s + grace)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(timeout=5)
    data = json.loads(result.read_text()) if result.exists() else {"numbers": {}, "checks": [], "notes": []}
    if timed_out:
        data["status"] = "timeout"
        data["error"] = f"killed after {budget_s + grace:.0f} s (budget {budget_s:.0f} s); numbers so far kept"
    elif "status" not in data:
        data["status"] = "error"
        data["error"] = f"process ended with exit code {proc.returncode} before recording a status"
    if data["status"] in ("error", "timeout") and "traceback" not in data:
        data["output_tail"] = "".join(tail)
    data.update(title=item.title, budget_s=budget_s, wall_s=round(time.monotonic() - started, 2))
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="summary folder ($OUT)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="toy sizes on the CPU, gloo for NCCL")
    parser.add_argument("--items", default=",".join(i.name for i in ITEMS), help="comma-separated item names")
    parser.add_argument("--item-budget-s", type=float, help="one budget for every item (default: each its own)")
    parser.add_argument("--run-item", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--budget-s", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_item:
        return _run_item(args.run_item, Path(args.result), args.budget_s, args.cpu_dry_run)

    sys.path.insert(0, str(HERE))
    from summary import write_summary

    wanted = args.items.split(",")
    unknown = sorted(set(wanted) - {i.name for i in ITEMS})
    if unknown:
        parser.error(f"--items: unknown {unknown}; choose from {[i.name for i in ITEMS]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp, open(out / "check.log", "w") as log:
        for item in (i for i in ITEMS if i.name in wanted):
            budget = item.dry_budget_s if args.cpu_dry_run else item.budget_s
            budget = args.item_budget_s or budget
            if not args.cpu_dry_run:
                budget = min(budget, TOTAL_BUDGET_S - (time.monotonic() - started))
            print(f"=== {item.name}: {item.title} (budget {budget:.0f} s)", flush=True)
            if budget < min(10, args.item_budget_s or 10):
                results[item.name] = {"status": "skipped", "error": "no time left in the total budget",
                                      "title": item.title, "numbers": {}, "checks": [], "notes": []}
                continue
            results[item.name] = _launch(item, budget, args.cpu_dry_run, Path(tmp), log)
            print(f"=== {item.name}: {results[item.name]['status']} in {results[item.name]['wall_s']:.1f} s",
                  flush=True)
    write_summary(out, results, args.cpu_dry_run, time.monotonic() - started)
    print(f"summary: {out / 'summary.md'}", flush=True)
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
