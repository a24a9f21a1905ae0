"""The GPU check's summary: ``summary.json`` (everything the items recorded) and ``summary.md``
(a table of the items, then each item's checks, numbers, notes and any traceback)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _git_state() -> dict[str, Any]:
    """The commit the tree was at and whether it had changes (None where git is absent)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _headline(numbers: dict[str, Any], limit: int = 4) -> str:
    keys = [k for k in numbers if isinstance(numbers[k], (int, float)) and not isinstance(numbers[k], bool)]
    return ", ".join(f"{k}={_fmt(numbers[k])}" for k in keys[:limit])


def write_summary(out: Path, results: dict[str, dict], dry_run: bool, wall_s: float) -> dict:
    environment = next((r["environment"] for r in results.values() if "environment" in r), {})
    summary = {
        "mode": "cpu-dry-run" if dry_run else "gpu",
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(wall_s, 1),
        "git": _git_state(),
        "environment": environment,
        "items": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))

    lines = [f"# GPU check ({summary['mode']}), {summary['finished_at']}", "",
             f"Wall time {summary['wall_s']} s; commit {summary['git']['commit']} "
             f"(uncommitted changes: {summary['git']['dirty']}).", "",
             "Environment: " + ", ".join(f"{k} {v}" for k, v in environment.items()), "",
             "| item | status | wall s | headline numbers |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['status']} | {r.get('wall_s', '')} | {_headline(r.get('numbers', {}))} |")
    for name, r in results.items():
        lines += ["", f"## {name}: {r.get('title', '')}", "", f"Status **{r['status']}**"
                  + (f": {r['error']}" if r.get("error") else "") + "."]
        if r.get("checks"):
            lines += ["", "| check | value | bound | passed |", "|---|---|---|---|"]
            lines += [f"| {c['name']} | {_fmt(c['value'])} | {c['bound']} | {c['passed']} |" for c in r["checks"]]
        if r.get("numbers"):
            lines += ["", "| number | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in r["numbers"].items()]
        if r.get("notes"):
            lines += [""] + [f"- {note}" for note in r["notes"]]
        for key in ("traceback", "output_tail"):
            if r.get(key):
                lines += ["", "```", r[key].rstrip()[-4000:], "```"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary
