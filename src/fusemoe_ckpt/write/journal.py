"""The resume journal: which output shards of a partial conversion are complete and on disk.

A JSON-lines file in the partial directory. The first line names the plan it belongs to (a
fingerprint of the source files and of every planned header and byte range); each further line
records one shard, written only after the shard's data, its directory entry and the previous
lines are flushed. A shard counts as complete on resume only if its line is there and the file
still has the recorded size, inode and mtime and starts with the planned header.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import DestinationError
from ..plan.layout import ConversionPlan, ShardPlan
from ..reading.files import open_regular
from ..reading.json_document import parse_json, read_document
from ..reading.source import SourceCheckpoint
from ..version import package_version
from .no_follow import open_own_file, refuse_link

JOURNAL_NAME = ".fusemoe-journal"
JOURNAL_FORMAT = 1


def plan_fingerprint(source: SourceCheckpoint, plan: ConversionPlan, files: list | None = None) -> str:
    """A hash of everything that decides the output bytes: the tool version, the source files
    (real path, size, mtime; or `files`, an identity of them that outlives the files, such as a
    repo's commit and hashes), the family, and every shard's name, header and source byte ranges."""
    if files is None:
        files = []
        for path in source.shard_files:
            st = os.stat(path)
            files.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    # The SHA-256 of json.dumps({"version", "family", "files", "shards": [[name, header hash,
    # [[file, offset, length, transpose], ...]], ...]}, sort_keys=True), fed piece by piece: a plan of
    # 300k pieces needs no list per piece, nor a resolved path string per piece, to be hashed.
    digest = hashlib.sha256()
    feed = digest.update
    dumps = json.dumps
    feed(f'{{"family": {dumps(plan.family.name)}, "files": {dumps(files, sort_keys=True)}, "shards": ['.encode())
    resolved: dict[object, str] = {}
    for i, shard in enumerate(plan.shards):
        header_digest = hashlib.sha256()
        for chunk in shard.header_chunks():
            header_digest.update(chunk)
        header_hash = header_digest.hexdigest()
        feed(f'{", " if i else ""}[{dumps(shard.filename)}, "{header_hash}", ['.encode())
        first = True
        for tensor in shard.tensors:
            for piece in tensor.pieces:
                path = None
                if piece.file:
                    path = resolved.get(piece.file)
                    if path is None:
                        path = resolved[piece.file] = dumps(str(piece.file.resolve()))
                transpose = dumps(piece.transpose)
                feed(f"{'' if first else ', '}[{path or 'null'}, {piece.offset}, {piece.length}, {transpose}]".encode())
                first = False
        feed(b"]]")
    feed(f'], "version": {dumps(package_version())}}}'.encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ShardRecord:
    """One completed shard as the journal recorded it."""

    filename: str
    size: int
    inode: int
    mtime_ns: int

    def to_json(self) -> dict:
        return {"shard": self.filename, "size": self.size, "inode": self.inode, "mtime_ns": self.mtime_ns}


class Journal:
    """Appends one line per completed shard; thread-safe, so workers record their own shards."""

    def __init__(self, directory: Path, *, durable: bool) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self.durable = durable
        self._lock = threading.Lock()
        self._file = None

    @classmethod
    def start(cls, directory: Path, fingerprint: str, kept: list[ShardRecord], *, durable: bool) -> Journal:
        """Write a fresh journal (header and `kept` shards) atomically, then open it for appending."""
        journal = cls(directory, durable=durable)
        header = {"fusemoe_journal": JOURNAL_FORMAT, "fingerprint": fingerprint, "durable": durable}
        if not durable:
            header["boot_id"] = boot_id()
        lines = [header, *(record.to_json() for record in kept)]
        fresh = directory / f"{JOURNAL_NAME}.new"
        with os.fdopen(open_own_file(fresh, "the resume journal", exclusive=True), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
            journal._flush(f)
        os.replace(fresh, journal.path)
        journal._sync_directory()
        descriptor = open_own_file(journal.path, "the resume journal", append=True)
        journal._file = os.fdopen(descriptor, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
        return journal

    def record(self, path: Path) -> None:
        """Record the shard at `path` as complete; call only once its data is written (and fsynced)."""
        st = os.stat(path)
        line = json.dumps(ShardRecord(path.name, st.st_size, st.st_ino, st.st_mtime_ns).to_json()) + "\n"
        with self._lock:
            # The shard's directory entry must be on disk before a line that vouches for it.
            self._sync_directory()
            self._file.write(line)
            self._flush(self._file)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _flush(self, f) -> None:
        f.flush()
        if self.durable:
            os.fsync(f.fileno())

    def _sync_directory(self) -> None:
        if self.durable:
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def completed_shards(directory: Path, plan: ConversionPlan, fingerprint: str) -> list[ShardRecord]:
    """The shards of an interrupted conversion in `directory` that can be kept as they are.

    Raises:
        DestinationError: the directory has no readable journal, or it belongs to another plan.
    """
    path = directory / JOURNAL_NAME
    if not os.path.lexists(path):
        raise DestinationError(
            f"{directory}: has no journal ({JOURNAL_NAME}), so its shards cannot be trusted; "
            "remove it or pass --overwrite to start over"
        )
    # Not through a link: the partial directory is the tool's own, and a link in it was planted.
    refuse_link(path, "the resume journal")
    try:
        document = read_document(path, error=DestinationError, what="journal", follow_links=False)
    except DestinationError as e:
        raise DestinationError(f"{e}; remove {directory} or pass --overwrite") from e
    lines = document.decode("utf-8").split("\n")
    header = _parse(path, 1, lines[0])
    if not isinstance(header, dict) or header.get("fusemoe_journal") != JOURNAL_FORMAT:
        raise DestinationError(f"{path}: not a journal fusemoe-ckpt can read; remove {directory} or pass --overwrite")
    if header.get("fingerprint") != fingerprint:
        raise DestinationError(
            f"{directory}: was written from a different source, family, --max-shard-size or fusemoe-ckpt "
            "version; remove it or pass --overwrite to start over"
        )
    if not header.get("durable") and header.get("boot_id") != boot_id():
        # Written without fsync and the machine restarted since: the page cache it relied on is gone.
        return []
    planned = {shard.filename: shard for shard in plan.shards}
    kept: dict[str, ShardRecord] = {}
    # A line cut short by a crash is only ever the last one; everything from a bad line on is dropped.
    for number, text in enumerate(lines[1:], start=2):
        entry = _parse(path, number, text)
        record = _record(entry)
        if record is None:
            break
        shard = planned.get(record.filename)
        if shard is not None and _still_complete(directory / record.filename, shard, record):
            kept[record.filename] = record
    return [kept[name] for name in planned if name in kept]


def boot_id() -> str | None:
    """This boot's id (Linux), to tell whether unflushed files may have been lost to a restart."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _parse(path: Path, number: int, text: str) -> object:
    """The JSON value of one journal line, None when it is not one (cut short by a crash)."""
    try:
        return parse_json(text.encode("utf-8"), f"{path}:{number}", error=DestinationError)
    except DestinationError:
        return None


def _record(entry: object) -> ShardRecord | None:
    if not isinstance(entry, dict):
        return None
    values = [entry.get(k) for k in ("shard", "size", "inode", "mtime_ns")]
    if not isinstance(values[0], str) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values[1:]):
        return None
    return ShardRecord(*values)


def _still_complete(path: Path, shard: ShardPlan, record: ShardRecord) -> bool:
    """The file is the one recorded, untouched since, with the planned size and header."""
    try:
        fd, st = open_regular(path, error=DestinationError, follow_links=False)
    except DestinationError:
        return False
    with os.fdopen(fd, "rb") as f:
        if (st.st_size, st.st_ino, st.st_mtime_ns) != (record.size, record.inode, record.mtime_ns):
            return False
        if st.st_size != shard.file_size:
            return False
        try:
            return starts_with_header(f, shard)
        except OSError:
            return False


def starts_with_header(f: BinaryIO, shard: ShardPlan) -> bool:
    """Whether the file `f` (read from its start) begins with the planned header of `shard`, compared
    part by part: the header of a shard of 300k tensors is tens of megabytes."""
    return all(f.read(len(chunk)) == chunk for chunk in shard.header_chunks())
