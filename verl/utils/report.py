"""End-of-run report: a markdown table and a PNG of the run's curves, from ``metrics.jsonl``.

Last stage of a run (trainer -> metrics.jsonl -> report); also usable on any finished run dir:
``python -m verl.utils.report runs/<name>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from verl.utils.tracking import read_metrics

# (metric key, column title) shown in the table when the run logged them.
TABLE_COLUMNS = (
    ("val/greedy_acc", "greedy acc"),
    ("val/mean_at_4_acc", "mean@4 acc"),
    ("batch/score/mean", "train reward"),
    ("actor/ess_ratio", "ESS ratio"),
    ("staleness/start_lag_max", "max lag"),
    ("time/wall_s", "wall s"),
)

PLOTS = (
    ("val/greedy_acc", "held-out greedy accuracy"),
    ("batch/score/mean", "train reward (mean)"),
    ("actor/ess_ratio", "ESS ratio"),
    ("staleness/start_lag_max", "max lag (versions)"),
)


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3f}"


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    val_rows = [r for r in records if "val/greedy_acc" in r]
    cols = [(k, t) for k, t in TABLE_COLUMNS if any(k in r for r in records)]
    lines = [f"# Run report: {run_dir.name}", "", "| step | " + " | ".join(t for _, t in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for r in val_rows:
        lines.append(f"| {r['step']} | " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
    if val_rows:
        first, last = val_rows[0], val_rows[-1]
        lines += ["", f"Held-out greedy accuracy: {first['val/greedy_acc']:.3f} (step {first['step']}) -> "
                      f"{last['val/greedy_acc']:.3f} (step {last['step']})."]
        for key in sorted(k for k in last if k.startswith("val/mean_at_")):
            if key in first:
                lines.append(f"Held-out {key[4:]}: {first[key]:.3f} -> {last[key]:.3f}.")
    png = _plot(run_dir, records)
    if png is not None:
        lines += ["", f"![curves]({png.name})"]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(line for line in lines if not line.startswith("![")), file=sys.stderr)
    return out


def _plot(run_dir: Path, records: list[dict]) -> Path | None:
    panels = [(k, t) for k, t in PLOTS if any(k in r for r in records)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for row, (key, title) in enumerate(panels):
        pts = [(r["step"], r.get("time/wall_s"), r[key]) for r in records if key in r and isinstance(r[key], float)]
        for col, (xi, xlabel) in enumerate(((0, "step"), (1, "wall time (s)"))):
            ax = axes[row][col]
            xs = [p[xi] for p in pts if p[xi] is not None]
            ys = [p[2] for p in pts if p[xi] is not None]
            ax.plot(xs, ys, marker="o" if key.startswith("val/") else None, markersize=3)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(write_report(sys.argv[1]))
