"""Datasets at the head of the data flow: ``countdown`` (task generator, solver, parquet writer)
and ``rl_dataset`` (prompt dataset, resumable sampler and collation feeding the rollouter).

Import from the submodules; this package stays import-light so that data scripts do not load torch.
"""
