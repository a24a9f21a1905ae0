"""Entry point of the fully-async recipe, as in the VCPO release:
``python -m recipe.fully_async_policy.fully_async_main --config-name=fully_async_ppo_megatron_trainer [overrides]``.

The same trainer as ``python -m verl.trainer.main_ppo``: one pipeline for every lag, with
``async_training.staleness_threshold`` as the bound. The config names resolve in this recipe's
``config/`` directory on top of the project's ``configs/`` tree.
"""

from __future__ import annotations

from verl.trainer.main_ppo import main

if __name__ == "__main__":
    main(default_config="fully_async_ppo_trainer")
