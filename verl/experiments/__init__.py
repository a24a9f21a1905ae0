"""Experiments that drive the whole pipeline through many runs and read the results back."""
