"""Megatron-Core support for the actor: process groups, CPU compatibility, vocab-parallel log-probs, batch layout.

Importing this package does not import megatron.core; the submodules that need it import it lazily.
"""
