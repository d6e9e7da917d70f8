"""`.fusemoe-pushed`, the record a `--stream --push-to-hub` run keeps of what it uploaded, and whether
it proves the push finished. Reads and writes no Hub, and never imports huggingface_hub: batch asks
before every entry.

The record is JSON Lines: `{"repo": ...}` first, then `{"shard": name, "size": n, "sha256": hex}`
for each output shard once its pre-upload succeeded, and `{"commit": oid, "url": ...}` only once the
final commit that adds every shard returned. A push is finished when the record ends with that
commit and names every shard of DST's index with its size and hash: the Hub then holds exactly the
bytes DST's index describes, and the shards are not on local disk to be checked instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DestinationError
from ..plan.layout import ConversionPlan
from ..reading.json_document import parse_json, read_document
from ..write.finished import planned_reason, read_finished, recorded_reason
from ..write.no_follow import open_own_file

PUSHED_NAME = ".fusemoe-pushed"
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class PushRecord:
    """What a record says: the repo, the shards pre-uploaded (name -> size, sha256 hex), the commit."""

    repo_id: str | None = None
    shards: dict[str, tuple[int, str]] = field(default_factory=dict)
    commit: str | None = None
    url: str | None = None

    def names(self, repo_id: str) -> bool:
        """Whether the record is of `repo_id` (a bare name is the one the Hub put under the user's namespace)."""
        if self.repo_id is None:
            return False
        return self.repo_id == repo_id or ("/" not in repo_id and self.repo_id.split("/")[-1] == repo_id)


def read_push_record(path: Path) -> PushRecord:
    """The record at `path`, or an empty one when there is none. A line cut short by a kill ends it:
    what follows was never acknowledged."""
    if not os.path.lexists(path):
        return PushRecord()
    text = read_document(path, error=DestinationError, what="push record", follow_links=False)
    lines = text.decode("utf-8", "replace").splitlines()
    head = _line(lines[0]) if lines else None
    if not isinstance(head, dict) or not isinstance(head.get("repo"), str):
        return PushRecord()
    record = PushRecord(repo_id=head["repo"])
    for text_line in lines[1:]:
        entry = _line(text_line)
        if not isinstance(entry, dict):
            break
        name, size, sha256 = entry.get("shard"), entry.get("size"), entry.get("sha256")
        if isinstance(name, str) and type(size) is int and isinstance(sha256, str) and _SHA256.fullmatch(sha256):
            record.shards[name] = (size, sha256)
        elif isinstance(entry.get("commit"), str):
            record.commit, record.url = entry["commit"], entry.get("url")
    return record


def start_record(path: Path, repo_id: str) -> None:
    """Begin an empty record of pushes to `repo_id` at `path`, replacing any other."""
    fd = open_own_file(path, "the push record")
    os.ftruncate(fd, 0)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps({"repo": repo_id}) + "\n")


def append_to_record(path: Path, entry: dict) -> None:
    """Add one line, on disk before this returns: a shard uploaded, or the final commit."""
    fd = open_own_file(path, "the push record", append=True)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finished_push(dst: Path, repo_id: str) -> PushRecord | str:
    """The record of `dst` when it is of `repo_id` and its final commit was made, else why not."""
    record = read_push_record(dst / PUSHED_NAME)
    if record.repo_id is None:
        return f"no readable {PUSHED_NAME}"
    if not record.names(repo_id):
        return f"pushed to {record.repo_id}"
    if record.commit is None:
        return "its push was never committed"
    return record


def recorded_push_reason(dst: Path, *, repo_id: str, **options) -> str | None:
    """None when `dst` holds the small files of a finished streamed push to `repo_id` of the
    conversion `options` describe (as `write.finished.recorded_reason` takes them), else why not;
    the record must name every shard of the index."""
    sizes = _pushed_sizes(dst, repo_id)
    return sizes if isinstance(sizes, str) else recorded_reason(dst, pushed=sizes, **options)


def planned_push_reason(dst: Path, plan: ConversionPlan, *, repo_id: str) -> str | None:
    """None when `dst` holds the small files of a finished streamed push of `plan` to `repo_id`, each
    planned shard recorded with its planned size; else why not."""
    sizes = _pushed_sizes(dst, repo_id)
    return sizes if isinstance(sizes, str) else planned_reason(dst, plan, pushed=sizes)


def _pushed_sizes(dst: Path, repo_id: str) -> dict[str, int] | str:
    """The size of each shard a finished push of `dst` to `repo_id` recorded, or why there is none."""
    found = read_finished(dst)
    if isinstance(found, str):
        return found
    record = finished_push(dst, repo_id)
    if isinstance(record, str):
        return record
    return {name: size for name, (size, _) in record.shards.items()}


def _line(text: str) -> object:
    try:
        return parse_json(text.encode("utf-8"), PUSHED_NAME, error=DestinationError)
    except DestinationError:
        return None
