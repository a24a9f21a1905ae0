"""The stability experiment's command line: flags -> GridConfig, then plan, run and report."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from verl.experiments import stability
from verl.experiments.stability.plan import (
    METHODS,
    QUICK,
    SYNC,
    GridConfig,
    plan_grid,
    run_command,
    run_config,
)
from verl.experiments.stability.report import aggregate
from verl.experiments.stability.runner import execute, link_reference_runs
from verl.utils.config import ConfigError


def parse_args(argv: Sequence[str] | None = None) -> tuple[GridConfig, argparse.Namespace]:
    default = GridConfig()
    p = argparse.ArgumentParser(description=stability.__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(default.methods), help=f"subset of {','.join(METHODS)}")
    p.add_argument("--ks", default=",".join(map(str, [0, *default.ks])),
                   help="lags; sync always runs at k = 0 and the async methods at each k > 0 (add 64 for the stress point)")
    p.add_argument("--seeds", type=int, default=default.seeds)
    p.add_argument("--steps", type=int, default=default.steps)
    p.add_argument("--val-freq", type=int, default=default.val_freq)
    p.add_argument("--val-samples", type=int, default=default.val_samples)
    p.add_argument("--mean-at-n", type=int, default=default.mean_at_n)
    p.add_argument("--lr", type=float, default=default.lr)
    p.add_argument("--collapse-drop", type=float, default=default.collapse_drop,
                   help="accuracy drop below the warm start that counts as a collapse (negative: automatic)")
    p.add_argument("--collapse-auc-ratio", type=float, default=default.collapse_auc_ratio)
    p.add_argument("--out", default=default.out)
    p.add_argument("--quick", action="store_true",
                   help="defaults for a < 15 min check: one seed, sync + tis/m2po/vcpo at k = 16, 50 steps, "
                        "validation every 10 on 200 problems (flags given explicitly still win)")
    p.add_argument("--resume", action="store_true", help="keep finished runs in --out and run only the rest")
    p.add_argument("--sync-from", default=None, metavar="DIR",
                   help="take the synchronous reference runs from another grid's --out (linked, not rerun), "
                        "e.g. for a control at another --lr")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    p.add_argument("--aggregate-only", action="store_true", help="rebuild results.md and plots from --out")
    args = p.parse_args(argv)
    if args.quick:
        p.set_defaults(**{key: ",".join(map(str, v)) if isinstance(v, list) else v for key, v in QUICK.items()})
        args = p.parse_args(argv)
    grid = GridConfig(
        methods=[m for m in args.methods.split(",") if m], ks=[int(k) for k in args.ks.split(",") if k],
        seeds=args.seeds, steps=args.steps, val_freq=args.val_freq, val_samples=args.val_samples,
        mean_at_n=args.mean_at_n, lr=args.lr, collapse_drop=args.collapse_drop,
        collapse_auc_ratio=args.collapse_auc_ratio, out=args.out,
    )
    grid.validate("stability")
    if args.sync_from and SYNC not in grid.methods:
        p.error(f"--sync-from needs {SYNC!r} in --methods: the linked runs are the reference")
    return grid, args


def main(argv: Sequence[str] | None = None) -> None:
    try:
        grid, args = parse_args(argv)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    out = Path(grid.out)
    specs = plan_grid(grid)
    if not args.aggregate_only:
        # Every (method, k) cell resolves before the first run starts: a bad key fails now, not
        # after the synchronous reference has trained. Seeds differ only in trainer.seed.
        try:
            for spec in {(s.method, s.k): s for s in specs}.values():
                run_config(spec, grid, out / "runs" / spec.name)
        except ConfigError as e:
            sys.exit(f"error: {spec.name}: {e}")
    if args.dry_run:
        for spec in specs:
            cmd = run_command(spec, grid, (out / "runs" / spec.name).resolve())
            print(" ".join(cmd))
        return
    if not args.aggregate_only:
        out.mkdir(parents=True, exist_ok=True)
        (out / "grid.json").write_text(json.dumps(asdict(grid), indent=1))
        to_run = specs
        if args.sync_from:
            try:
                to_run = link_reference_runs(specs, out, Path(args.sync_from), grid.steps)
            except (FileNotFoundError, FileExistsError) as e:
                sys.exit(f"error: {e}")
        execute(grid, to_run, out, resume=args.resume)
    print(f"results: {aggregate(grid, specs, out)}", flush=True)
