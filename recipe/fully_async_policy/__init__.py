"""Launch scripts (``shell/vcpo/<task>/``) of the fully-async pipeline in ``verl.trainer.fully_async``.

Synchronous training is the same pipeline at k = 0; ``verl.trainer.ppo.ray_trainer`` drives it.
"""
