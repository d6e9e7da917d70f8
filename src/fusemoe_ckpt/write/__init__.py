"""Executing a plan: the shard writer, piece byte streams, the resume journal, the destination
lock and the partial-directory lifecycle."""
