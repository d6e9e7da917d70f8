"""The family rules: transformers' key-pattern semantics, the family table, choosing a family."""
