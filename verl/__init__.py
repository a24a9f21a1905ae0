"""vcpo-rl: an asynchronous RL trainer for LLMs with variance-controlled off-policy updates (VCPO).

Laid out like a veRL fork (``verl.workers.actor``, ``verl.workers.rollout``,
``verl.trainer.ppo.core_algos``; the pipeline in ``verl.trainer.fully_async``, its launch scripts
in ``recipe/fully_async_policy``); every line is our own.
"""

__version__ = "0.1.0"
