"""Recipes built on the ``verl`` package; ``fully_async_policy`` holds the fully-async launch scripts."""
