"""`--stream --push-to-hub`: each output shard pre-uploaded as it completes and then deleted locally;
one commit at the end adds the shards with the index, config, tokenizer files and model card.

Pre-uploaded files (LFS, or Xet where the Hub and hf_xet offer it) belong to no commit until the
final one, so the repo shows nothing of the conversion before it is complete. What was pre-uploaded
is recorded in the partial directory (`.fusemoe-pushed`: the repo, then one line per shard with its
size and sha256), so an interrupted run resumes without uploading those shards again; the record
stays in DST beside the small files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.lfs import UploadInfo

from ..errors import DestinationError, HubError
from ..plan.layout import ConversionPlan, ShardPlan
from ..reading.converted import read_converted_index
from ..reading.json_document import parse_json, read_document
from ..reading.source import INDEX_NAME
from ..version import package_version
from ..write.no_follow import open_own_file
from .calls import hub_errors, root_cause
from .model_card import write_model_card
from .push import PushResult
from .stream import StreamedSource, StreamHooks, peak_bytes

PUSHED_NAME = ".fusemoe-pushed"


class PushingHooks(StreamHooks):
    """StreamHooks that also pre-upload each finished output shard, delete it, and commit at the end."""

    keep_files = frozenset({PUSHED_NAME})

    def __init__(
        self,
        source: StreamedSource,
        plan: ConversionPlan,
        *,
        repo_id: str,
        private: bool | None,
        progress: bool,
    ) -> None:
        super().__init__(source, plan, progress=progress)
        self.api = HfApi()
        self.repo_id = repo_id
        self.private = private
        self.record: Path | None = None
        self.pushed: dict[str, tuple[int, str]] = {}  # shard -> (size, sha256 hex)
        self.uploaded_bytes = 0
        self.result: PushResult | None = None
        self.planned_sizes = {shard.filename: shard.file_size for shard in plan.shards}

    def start(self, partial: Path, kept: set[str]) -> set[str]:
        with hub_errors(self.repo_id):
            url = self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        self.repo_id = url.repo_id
        self.url = str(url)
        self.record = partial / PUSHED_NAME
        self.pushed = self._read_record()
        if not self.pushed:
            fd = open_own_file(self.record, "the push record")
            os.ftruncate(fd, 0)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps({"repo": self.repo_id}) + "\n")
        for name in sorted(kept - set(self.pushed)):  # written, but the run stopped before its upload
            self._upload(partial / name)
        done = set(self.pushed)
        super().start(partial, kept | done)
        return done

    def space_needed(self, todo: list[ShardPlan], side_bytes: int) -> int:
        return side_bytes + peak_bytes(todo, self, keep_outputs=False)

    def after_shard(self, shard: ShardPlan, path: Path) -> None:
        super().after_shard(shard, path)
        self._upload(path)

    def before_install(self, partial: Path) -> None:
        """Write the model card, then one commit: the pre-uploaded shards and every other file."""
        _, metadata = read_converted_index(partial / INDEX_NAME)
        write_model_card(partial, metadata, repo_id=self.repo_id, endpoint=self.api.endpoint)
        operations = [self._uploaded(name, *self.pushed[name]) for name in sorted(self.pushed)]
        for path in sorted(partial.rglob("*")):
            relative = path.relative_to(partial).as_posix()
            if path.is_file() and not relative.startswith(".") and relative not in self.pushed:
                operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=path))
        source = metadata.get("fusemoe_ckpt_source")
        message = f"Upload fused-expert checkpoint of {source} (fusemoe-ckpt {package_version()})"
        with hub_errors(self.repo_id):
            info = self.api.create_commit(self.repo_id, operations=operations, commit_message=message)
        self.result = PushResult(
            repo_id=self.repo_id, url=self.url, commit=info.oid, revision=constants.DEFAULT_REVISION
        )

    def _upload(self, path: Path) -> None:
        """Pre-upload one shard, record it, and delete it locally."""
        operation = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        try:
            with hub_errors(self.repo_id):
                self.api.preupload_lfs_files(self.repo_id, additions=[operation])
        except (RuntimeError, ValueError) as e:  # how huggingface_hub reports a failed LFS transfer
            raise HubError(f"{self.repo_id}: cannot upload {path.name}: {root_cause(e)}") from e
        size, sha256 = operation.upload_info.size, operation.upload_info.sha256.hex()
        fd = open_own_file(self.record, "the push record", append=True)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            f.write(json.dumps({"shard": path.name, "size": size, "sha256": sha256}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.pushed[path.name] = (size, sha256)
        self.uploaded_bytes += size
        path.unlink()

    @staticmethod
    def _uploaded(name: str, size: int, sha256: str) -> CommitOperationAdd:
        """The commit entry of a shard pre-uploaded by this run or an earlier one, whose bytes are gone."""
        operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=b"")
        operation.upload_info = UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(sha256))
        operation._upload_mode = "lfs"
        operation._should_ignore = False
        operation._is_uploaded = True
        return operation

    def _read_record(self) -> dict[str, tuple[int, str]]:
        """The shards an earlier run into this partial directory pre-uploaded to this repo."""
        if self.record is None or not os.path.lexists(self.record):
            return {}
        text = read_document(self.record, error=DestinationError, what="push record", follow_links=False)
        lines = text.decode("utf-8").splitlines()
        head = _line(lines[0]) if lines else None
        if not isinstance(head, dict) or head.get("repo") != self.repo_id:
            return {}  # another repo: those uploads are not there, the shards are written and pushed again
        pushed = {}
        for text_line in lines[1:]:
            entry = _line(text_line)
            if not isinstance(entry, dict):
                break  # cut short by a kill: that shard is uploaded again
            name, size, sha256 = entry.get("shard"), entry.get("size"), entry.get("sha256")
            if self.planned_sizes.get(name) == size and isinstance(sha256, str):
                pushed[name] = (size, sha256)
        return pushed


def _line(text: str) -> object:
    try:
        return parse_json(text.encode("utf-8"), PUSHED_NAME, error=DestinationError)
    except DestinationError:
        return None
