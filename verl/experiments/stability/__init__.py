"""The stability experiment (issue 7): synchronous GRPO against async TIS, M2PO and VCPO at lag k.

Sits on top of the whole pipeline (dataset -> rollouter -> queue -> trainer/actor -> param sync ->
engines): every run of the grid is one ``python -m verl.trainer.main_ppo`` subprocess on the CPU
Countdown testbed, all from the same cached SFT warm start. ``plan`` lays out the grid and each
run's overrides, ``runner`` runs it one run at a time (a run already uses both cores),
``analysis`` reads each run's ``metrics.jsonl`` back into curves and per-run summaries, and
``report`` writes ``results.md`` (one row per method and k, over seeds) and PNG plots; ``cli``
is the command line behind ``scripts/experiments/stability.py``:

    PYTHONPATH=. python scripts/experiments/stability.py --out runs/stability            # full grid
    PYTHONPATH=. python scripts/experiments/stability.py --quick --out runs/stability_quick
    PYTHONPATH=. python scripts/experiments/stability.py --out runs/stability --resume   # after an interruption
    # a control at another lr, compared with the full grid's sync runs:
    PYTHONPATH=. python scripts/experiments/stability.py --methods sync,tis --ks 0,32 --lr 6.3e-5 \
        --sync-from runs/stability --out runs/stability_lr_control
"""
