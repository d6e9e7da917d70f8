"""Converting a model zoo: the manifest, the runner, the per-entry worker process, and the split of
a manifest over cluster tasks."""
