"""`--stream --push-to-hub`: each output shard pre-uploaded as it completes and then deleted locally;
one commit at the end adds the shards with the index, config, tokenizer files and model card.

Pre-uploaded files (LFS, or Xet where the Hub and hf_xet offer it) belong to no commit until the
final one, so the repo shows nothing of the conversion before it is complete. What was pre-uploaded
is recorded in the partial directory (`.fusemoe-pushed`, push_record.py: the repo, then one line
per shard with its size and sha256, then the final commit once it is made), so an interrupted run
resumes without uploading those shards again, nor committing again; the record stays in DST beside
the small files and proves the push finished.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.lfs import UploadInfo

from ..errors import DestinationError, HubError
from ..plan.layout import ConversionPlan, ShardPlan
from ..reading.converted import read_converted_metadata
from ..reading.source import INDEX_NAME
from ..version import package_version
from .calls import hub_errors, root_cause
from .model_card import write_model_card
from .push import PushResult
from .push_record import PUSHED_NAME, PushRecord, append_to_record, finished_push, read_push_record, start_record
from .stream import StreamedSource, StreamHooks, peak_bytes


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
        self.committed: PushRecord | None = None  # an earlier run's final commit, stopped before its rename
        self.planned_sizes = {shard.filename: shard.file_size for shard in plan.shards}

    def start(self, partial: Path, kept: set[str]) -> set[str]:
        with hub_errors(self.repo_id):
            url = self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        self.repo_id = url.repo_id
        self.url = str(url)
        self.record = partial / PUSHED_NAME
        earlier = read_push_record(self.record)
        if earlier.names(self.repo_id):
            self.pushed = self._kept(earlier)
            self.committed = earlier if earlier.commit is not None else None
        if not self.pushed:
            # Another repo's record (those uploads are not there), or none: every shard is pushed anew.
            self.committed = None
            start_record(self.record, self.repo_id)
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
        """Write the model card, then one commit: the pre-uploaded shards and every other file; the
        commit recorded once it is made. Not again when an earlier run made it and stopped before
        the partial directory was renamed into place."""
        metadata = read_converted_metadata(partial / INDEX_NAME)
        write_model_card(partial, metadata, repo_id=self.repo_id, endpoint=self.api.endpoint)
        if self.committed is not None and set(self.pushed) == set(self.planned_sizes):
            self.result = _push_result(self.committed)  # DST gets the card that commit holds
            return
        operations = [self._uploaded(name, *self.pushed[name]) for name in sorted(self.pushed)]
        for path in sorted(partial.rglob("*")):
            relative = path.relative_to(partial).as_posix()
            if path.is_file() and not relative.startswith(".") and relative not in self.pushed:
                operations.append(CommitOperationAdd(path_in_repo=relative, path_or_fileobj=path))
        source = metadata.get("fusemoe_ckpt_source")
        message = f"Upload fused-expert checkpoint of {source} (fusemoe-ckpt {package_version()})"
        with hub_errors(self.repo_id):
            info = self.api.create_commit(self.repo_id, operations=operations, commit_message=message)
        append_to_record(self.record, {"commit": info.oid, "url": self.url})
        self.result = _push_result(PushRecord(self.repo_id, self.pushed, info.oid, self.url))

    def _upload(self, path: Path) -> None:
        """Pre-upload one shard, record it, and delete it locally."""
        operation = CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path))
        try:
            with hub_errors(self.repo_id):
                self.api.preupload_lfs_files(self.repo_id, additions=[operation])
        except (RuntimeError, ValueError) as e:  # how huggingface_hub reports a failed LFS transfer
            raise HubError(f"{self.repo_id}: cannot upload {path.name}: {root_cause(e)}") from e
        size, sha256 = operation.upload_info.size, operation.upload_info.sha256.hex()
        append_to_record(self.record, {"shard": path.name, "size": size, "sha256": sha256})
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

    def _kept(self, record: PushRecord) -> dict[str, tuple[int, str]]:
        """The shards of this plan an earlier run into this partial directory pre-uploaded."""
        return {name: entry for name, entry in record.shards.items() if self.planned_sizes.get(name) == entry[0]}


def recorded_push_result(dst: Path, repo_id: str) -> PushResult:
    """The finished push to `repo_id` that `dst` records (see `push_record.finished_push`), as a push
    reports it."""
    record = finished_push(dst, repo_id)
    if isinstance(record, str):
        raise DestinationError(f"{dst / PUSHED_NAME}: {record}")
    return _push_result(record)


def _push_result(record: PushRecord) -> PushResult:
    url = record.url or record.repo_id
    return PushResult(record.repo_id, url, record.commit, revision=constants.DEFAULT_REVISION)
