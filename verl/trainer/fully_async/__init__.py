"""The fully-async pipeline: Rollouter -> ReorderBuffer -> trainer -> ParamSync, lag bounded by k."""
