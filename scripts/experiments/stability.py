"""The stability experiment's command: a thin CLI over verl/experiments/stability/ (docs/results.md)."""

import sys
from pathlib import Path

# Runnable without PYTHONPATH=. as well: the package lives in this checkout.
REPO = str(Path(__file__).resolve().parents[2])
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from verl.experiments.stability.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
