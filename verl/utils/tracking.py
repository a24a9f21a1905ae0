"""Metric sinks for the trainer: console progress, JSONL, TensorBoard and wandb (offline by default).

Sits at the end of every trainer step: ``tracker.log(metrics, step)`` fans one flat dict of
numbers out to every configured backend; the run directory keeps ``metrics.jsonl`` as the
source of truth that reports and plots read back.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from verl.utils.config import ConfigError

SUPPORTED_LOGGERS = ("console", "jsonl", "tensorboard", "wandb")

# Shown in the progress bar's postfix when present, in this order.
CONSOLE_KEYS = (
    ("val/greedy_acc", "val"),
    ("batch/score/mean", "reward"),
    ("actor/ess_ratio", "ess"),
    ("actor/grad_norm", "gnorm"),
    ("actor/lr", "lr"),
    ("timing/step_s", "s/step"),
)


def check_loggers(key: str, loggers: Iterable[str]) -> None:
    """Fail at start-up on an unknown logger or one whose package is missing."""
    for name in loggers:
        if name not in SUPPORTED_LOGGERS:
            raise ConfigError(key, name, f"each logger must be one of {', '.join(SUPPORTED_LOGGERS)}")
        if name == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError as e:
                raise ConfigError(key, name, "wandb is not installed: pip install 'vcpo-rl[wandb]'") from e


def _finite_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            v = int(v)
        if isinstance(v, (int, float)):
            out[k] = float(v)
        elif hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
            out[k] = float(v.item())
    return out


class Tracking:
    """Fan-out logger. ``total_steps`` sizes the console progress bar."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        loggers: Iterable[str],
        config: dict[str, Any] | None = None,
        total_steps: int | None = None,
        initial_step: int = 0,
        project_name: str = "vcpo-rl",
        experiment_name: str = "run",
        wandb_entity: str | None = None,
        wandb_group: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.loggers = tuple(loggers)
        check_loggers("trainer.logger", self.loggers)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a") if "jsonl" in self.loggers else None
        self._tb = None
        if "tensorboard" in self.loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._wandb = None
        if "wandb" in self.loggers:
            import wandb

            # Offline unless the user has logged in or chose a mode explicitly.
            os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
            self._wandb = wandb.init(
                project=project_name, name=experiment_name, dir=str(self.run_dir), config=config or {},
                entity=wandb_entity or None, group=wandb_group or None,
            )
        self._bar = None
        if "console" in self.loggers:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial_step, desc=experiment_name, unit="step",
                dynamic_ncols=True, file=sys.stderr,
            )
        self._last_postfix: dict[str, str] = {}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        numbers = _finite_numbers(metrics)
        if self._jsonl is not None:
            record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in numbers.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._bar is not None:
            for key, short in CONSOLE_KEYS:
                if key in numbers:
                    self._last_postfix[short] = f"{numbers[key]:.3g}"
            self._bar.set_postfix(self._last_postfix, refresh=False)
            if self._bar.n < step:
                self._bar.update(step - self._bar.n)
            else:
                self._bar.refresh()

    def log_generations(self, samples: list[dict[str, Any]], step: int) -> None:
        """Validation samples (``input``, ``output``, ``score``): the first on the console, all as
        a table in wandb and as text in TensorBoard (the run dir keeps them as JSONL)."""
        if not samples:
            return
        if self._bar is not None:
            first = samples[0]
            self.message(f"val generation @ step {step} (1 of {len(samples)}): {first['input']!r} -> "
                         f"{first['output']!r}, score {first['score']:g}")
        if self._tb is not None:
            rows = [f"| {s['input']} | {s['output']} | {s['score']:g} |" for s in samples]
            self._tb.add_text("val/generations", "\n".join(["| input | output | score |", "|---|---|---|", *rows]),
                              step)
        if self._wandb is not None:
            import wandb

            rows = [[step, s["input"], s["output"], s["score"]] for s in samples]
            self._wandb.log({"val/generations": wandb.Table(columns=["step", "input", "output", "score"], data=rows)},
                            step=step)

    def message(self, text: str) -> None:
        """A line of progress text that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` back; a resumed run's repeated steps keep the last record."""
    by_step: dict[int, dict[str, Any]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            by_step.setdefault(rec["step"], {}).update(rec)
    return [by_step[s] for s in sorted(by_step)]
