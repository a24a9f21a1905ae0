"""Recipes built on the ``verl`` package; ``fully_async_policy`` is the asynchronous RL pipeline."""
