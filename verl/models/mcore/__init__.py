"""Megatron-Core GPT models built from HF configs, and HF <-> Megatron weight conversion (Megatron actor).

Submodules import megatron.core lazily; importing this package does not.
"""
