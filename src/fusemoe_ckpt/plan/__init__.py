"""The plan: every output tensor as ordered byte pieces of source files, the shard layout, casts.
Pure data, computed from headers alone."""
