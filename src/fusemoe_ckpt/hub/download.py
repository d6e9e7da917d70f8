"""The Hugging Face Hub in and out: download a source checkpoint by repo id, push a converted one.

Imported only when a command needs the Hub, so a local convert never pays for huggingface_hub.
Every setting is huggingface_hub's own (HF_TOKEN, HF_HOME, HF_HUB_CACHE, HF_ENDPOINT,
HF_HUB_OFFLINE, HF_HUB_DISABLE_PROGRESS_BARS): nothing here overrides them.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from ..commands.convert import WEIGHT_EXTENSIONS
from ..errors import HubError, UsageError
from ..reading.source import INDEX_NAME, SINGLE_NAME
from .model_card import write_model_card

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


@dataclass
class PushResult:
    """What a push did, for the summary line."""

    repo_id: str
    url: str
    commit: str
    revision: str
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"Pushed to {self.url} ({self.revision} at {self.commit[:8]})"


def download_checkpoint(repo_id: str, *, revision: str | None = None, progress: bool = True) -> HubCheckpoint:
    """Download what convert needs from a model repo into the HF cache, never other weight formats.

    The index comes first, with the side files; then exactly the shards it names, at the same
    commit. Files already in the cache are not fetched again, and with HF_HUB_OFFLINE=1 the cache
    alone answers.

    Raises:
        HubError: a missing, gated or private repo, a missing revision, or no network and no cache.
    """
    what = f"{repo_id}@{revision}" if revision else repo_id
    with _hub_errors(what), _progress_bars(progress):
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


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    progress: bool = True,
) -> PushResult:
    """Write the model card into `folder`, create the repo if needed and upload the folder.

    huggingface_hub's `upload_folder` uploads through Xet in several commits when the folder is
    large; an interrupted push resumes when run again (committed files are skipped, uploaded chunks
    deduplicated).

    Args:
        folder: a directory written by `convert`.
        private: visibility of a repo created here; an existing repo keeps its own.
        revision: the branch to push to, created from the default branch if missing.
        commit_message: the message of the (first) commit.

    Raises:
        UsageError: `folder` is not a fusemoe-ckpt output.
        HubError: the Hub could not be reached or refused the repo or the upload.
    """
    root = Path(folder)
    metadata = _output_metadata(root)
    api = HfApi()
    write_model_card(root, metadata, repo_id=repo_id, endpoint=api.endpoint)
    source = metadata.get("fusemoe_ckpt_source", str(root))
    message = commit_message or f"Upload fused-expert checkpoint of {source} (fusemoe-ckpt {version('fusemoe-ckpt')})"
    with _hub_errors(repo_id), _progress_bars(progress):
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != constants.DEFAULT_REVISION:
            api.create_branch(url.repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=url.repo_id, folder_path=root, revision=revision, commit_message=message)
    return PushResult(
        repo_id=url.repo_id,
        url=str(url),
        commit=info.oid,
        revision=revision or constants.DEFAULT_REVISION,
    )


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


def _output_metadata(root: Path) -> dict:
    index = root / INDEX_NAME
    try:
        metadata = json.loads(index.read_text(encoding="utf-8")).get("metadata") or {}
    except (OSError, ValueError, AttributeError) as e:
        raise UsageError(f"{root}: no readable {INDEX_NAME}; push uploads a directory written by convert") from e
    if "fusemoe_ckpt_family" not in metadata:
        raise UsageError(f"{index}: not written by fusemoe-ckpt convert (no fusemoe_ckpt_family); convert it first")
    return metadata


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """huggingface_hub's own bars, switched off for --quiet and restored afterwards."""
    was_disabled = are_progress_bars_disabled()
    if enabled or was_disabled:
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()


@contextmanager
def _hub_errors(what: str) -> Iterator[None]:
    """Turn huggingface_hub's and the transport's errors into one-line HubErrors, cause chained."""
    endpoint = constants.ENDPOINT
    try:
        yield
    except GatedRepoError as e:
        repo = what.split("@")[0]
        raise HubError(
            f"{what}: gated repo; request access at {endpoint}/{repo}, then set HF_TOKEN to a token of that account"
        ) from e
    except RepositoryNotFoundError as e:
        raise HubError(
            f"{what}: no model repo of that name on {endpoint}, and no local directory either "
            "(a private repo needs HF_TOKEN with access)"
        ) from e
    except RevisionNotFoundError as e:
        raise HubError(f"{what}: the repo has no such branch, tag or commit") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if constants.HF_HUB_OFFLINE:
            raise HubError(
                f"{what}: HF_HUB_OFFLINE is set and the cache {constants.HF_HUB_CACHE} lacks it; "
                "download it once online, or unset HF_HUB_OFFLINE"
            ) from e
        raise HubError(
            f"{what}: cannot reach the Hub at {endpoint} ({_root_cause(e)}) and the cache "
            f"{constants.HF_HUB_CACHE} lacks it; check the network or HF_ENDPOINT"
        ) from e
    except httpx2.TransportError as e:
        raise HubError(f"{what}: cannot reach the Hub at {endpoint} ({_root_cause(e)}); check the network") from e
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        detail = e.server_message.strip().splitlines()[0] if e.server_message else "no message"
        raise HubError(f"{what}: the Hub at {endpoint} answered {status}: {detail}") from e


def _root_cause(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
