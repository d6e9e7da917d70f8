"""Push a converted checkpoint to a Hub repo, with a model card; the repo and branch created if missing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, constants

from ..errors import CheckpointError, UsageError
from ..reading.converted import read_converted_metadata
from ..reading.source import INDEX_NAME
from ..version import package_version
from .calls import hub_errors, progress_bars
from .model_card import write_model_card


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
    message = commit_message or f"Upload fused-expert checkpoint of {source} (fusemoe-ckpt {package_version()})"
    with hub_errors(repo_id), progress_bars(progress):
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


def _output_metadata(root: Path) -> dict:
    index = root / INDEX_NAME
    if not os.path.lexists(index):
        raise UsageError(f"{root}: no readable {INDEX_NAME}; push uploads a directory written by convert")
    try:
        metadata = read_converted_metadata(index)
    except CheckpointError as e:
        raise UsageError(f"{e}; push uploads a directory written by convert") from e
    if "fusemoe_ckpt_family" not in metadata:
        raise UsageError(f"{index}: not written by fusemoe-ckpt convert (no fusemoe_ckpt_family); convert it first")
    return metadata
