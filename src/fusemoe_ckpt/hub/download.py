"""Download a source checkpoint by repo id into the HF cache: the index and side files, then
exactly the shards the index names, at the same commit. Never weights of other formats."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, snapshot_download

from ..reading.side_files import WEIGHT_EXTENSIONS
from ..reading.source import INDEX_NAME, SINGLE_NAME
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
        if shards:
            snapshot_download(repo_id, revision=commit, allow_patterns=[glob.escape(name) for name in shards])
    return HubCheckpoint(repo_id=repo_id, revision=revision or constants.DEFAULT_REVISION, commit=commit, path=folder)


def _shard_names(folder: Path) -> list[str]:
    """The shards the index names, or the single-file name; open_checkpoint validates them later."""
    index = folder / INDEX_NAME
    if not index.exists():
        return [SINGLE_NAME]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError):
        return []  # open_checkpoint reports the malformed index, naming the file
