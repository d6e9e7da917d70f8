"""Converting a model zoo: the manifest, the runner, the per-entry worker process, and the split of
a manifest over cluster tasks."""

# How a manifest is split over cluster tasks (cluster.py); here, so that the CLI's `--shard-by` choices
# need no import of the split itself.
SHARD_BY = ("dst", "index")
