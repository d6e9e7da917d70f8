"""Download a source checkpoint by repo id into the HF cache: the index and side files, then
exactly the shards the index names, at the same commit. Never weights of other formats."""

from __future__ import annotations

import errno
import glob
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.hf_api import RepoFile

from ..errors import CheckpointError, DestinationError
from ..reading.index_scan import summarize_index
from ..reading.side_files import WEIGHT_EXTENSIONS
from ..reading.source import INDEX_NAME, SINGLE_NAME, both_layouts
from ..sizes import format_size
from ..write.writer import DISK_FULL
from .calls import hub_errors, progress_bars

# The files convert copies beside the shards: config, generation config, tokenizer files, chat
# templates, the card, license and notice, remote code. Images and other assets are not fetched.
SIDE_FILE_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.md", "*.model", "*.tiktoken", "*.py", "LICENSE*", "NOTICE*"]
# Weights in any format, and indexes of the formats convert does not read.
WEIGHT_PATTERNS = [f"*.{ext}" for ext in WEIGHT_EXTENSIONS] + [
    f"*.{ext}.index.json" for ext in WEIGHT_EXTENSIONS if ext != "safetensors"
]


@dataclass(frozen=True)
class HubCheckpoint:
    """A source checkpoint downloaded from the Hub: where it came from and where it lies in the cache."""

    repo_id: str
    revision: str
    commit: str
    path: Path


def download_checkpoint(repo_id: str, *, revision: str | None = None, progress: bool = True) -> HubCheckpoint:
    """Download what convert needs from a model repo into the HF cache, never other weight formats.

    The index comes first, with the side files; then exactly the shards it names, at the same
    commit. Files already in the cache are not fetched again, and with HF_HUB_OFFLINE=1 the cache
    alone answers.

    Raises:
        HubError: a missing, gated or private repo, a missing revision, or no network and no cache.
        CheckpointError: the repo holds an index and a model.safetensors the index does not name.
        DestinationError: the cache's disk has no room for the shards still to download (checked
            before, and reported if the disk fills during the download): naming the cache and the
            space needed.
    """
    what = f"{repo_id}@{revision}" if revision else repo_id
    with hub_errors(what), progress_bars(progress):
        folder = Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=SIDE_FILE_PATTERNS, ignore_patterns=WEIGHT_PATTERNS
            )
        )
        commit = folder.name  # the cache keeps each snapshot under its commit hash
        shards = _shard_names(folder)
        missing = [name for name in shards if not (folder / name).exists()]
        if missing and not constants.HF_HUB_OFFLINE:
            sizes = _file_sizes(repo_id, commit)
            if SINGLE_NAME in sizes and SINGLE_NAME not in shards and (folder / INDEX_NAME).exists():
                raise CheckpointError(both_layouts(f"{repo_id}@{commit}"))
            needed = sum(sizes.get(name, 0) for name in missing)
            free = shutil.disk_usage(folder).free
            if needed > free:
                raise _no_room(what, needed, free)
            try:
                snapshot_download(repo_id, revision=commit, allow_patterns=[glob.escape(name) for name in shards])
            except OSError as e:
                if e.errno in DISK_FULL:
                    raise _no_room(what, needed, shutil.disk_usage(folder).free, e) from e
                raise
        elif shards:
            snapshot_download(repo_id, revision=commit, allow_patterns=[glob.escape(name) for name in shards])
    return HubCheckpoint(repo_id=repo_id, revision=revision or constants.DEFAULT_REVISION, commit=commit, path=folder)


def _file_sizes(repo_id: str, commit: str) -> dict[str, int]:
    """Every file of the repo at `commit`, with its size in bytes."""
    tree = HfApi().list_repo_tree(repo_id, revision=commit, recursive=True)
    return {item.path: item.size for item in tree if isinstance(item, RepoFile)}


def _no_room(what: str, needed: int, free: int, error: OSError | None = None) -> DestinationError:
    """The one-line error for shards that do not fit the cache's disk."""
    cause = f"{error.strerror} ({errno.errorcode.get(error.errno, error.errno)}); " if error else ""
    return DestinationError(
        f"{constants.HF_HUB_CACHE}: cannot download the shards of {what}: {cause}they need "
        f"{format_size(needed)} ({needed} bytes) and {format_size(free)} ({free} bytes) is free; "
        "free space there, or set HF_HUB_CACHE to a disk with room"
    )


def _shard_names(folder: Path) -> list[str]:
    """The shards the index names, or the single-file name; open_checkpoint validates them later."""
    index = folder / INDEX_NAME
    if not index.exists():
        return [SINGLE_NAME]
    try:
        return sorted(summarize_index(index).shards)
    except CheckpointError:
        return []  # open_checkpoint reports the malformed index, naming the file
