"""The fully-async pipeline: Rollouter -> MessageQueue -> trainer -> ParamSync, with lag bounded by k.

Synchronous training is the same pipeline at k = 0; ``verl.trainer.ppo.ray_trainer`` drives it.
"""
