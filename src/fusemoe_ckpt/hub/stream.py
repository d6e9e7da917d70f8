"""Convert a Hub repo with bounded local disk: source shards fetched one at a time, as the plan needs
them, into a scratch folder beside DST, and each deleted once every output shard it feeds is written.

Planning needs every source header before a byte of data: each shard's header is read by HTTP range
and laid into a sparse placeholder of the shard's full size (holding no data blocks), so the plan is
the one a local convert makes of the same files. Before an output shard is written, the sources it
reads replace their placeholders, downloaded from the header on (every byte fetched once) and checked
against the size and hash the Hub lists; the data of a placeholder is never read.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from huggingface_hub.utils import filter_repo_objects

from ..errors import CheckpointError, DestinationError
from ..plan.layout import ConversionPlan, ShardPlan
from ..reading.index_scan import summarize_index
from ..reading.json_document import read_document
from ..reading.safetensors_format import MAX_HEADER_BYTES
from ..reading.source import INDEX_NAME, SINGLE_NAME, both_layouts, resolve_inside
from ..write.no_follow import open_own_file, refuse_unless_directory, remove_tree
from ..write.output import ShardHooks
from .download import SIDE_FILE_PATTERNS, WEIGHT_PATTERNS
from .fetch import PinnedRepo, download, read_range

if TYPE_CHECKING:
    from .push import PushResult

SCRATCH_SUFFIX = ".fusemoe-sources"
# The repo@commit, then a line per shard downloaded and checked, and `DROPPED`name when it was dropped.
FETCHED_NAME = ".fusemoe-fetched"
DROPPED = "dropped "


def scratch_path(dst: Path) -> Path:
    """The hidden sibling of `dst` that source shards are downloaded into while `--stream` runs."""
    return dst.parent / f".{dst.name}{SCRATCH_SUFFIX}"


@dataclass
class StreamReport:
    """What a `stream` conversion (`commands/convert.py`) fetched and kept at most, and its push."""

    downloaded_bytes: int
    peak_source_bytes: int
    pushed: PushResult | None = None
    already_complete: bool = False  # DST held (or recorded the finished push of) this conversion already


@dataclass
class StreamedSource:
    """A repo laid out in the scratch folder: side files downloaded, shards as placeholders."""

    repo: PinnedRepo
    scratch: Path
    shards: list[str]
    headers: dict[str, bytes]  # the first 8 + header-length bytes of each shard not yet downloaded


def lay_out_scratch(repo: PinnedRepo, scratch: Path, *, progress: bool) -> StreamedSource:
    """Create `scratch` (or reuse one an interrupted run left), download the index and side files
    into it and lay every shard not already downloaded there as a placeholder.

    Raises:
        CheckpointError: the repo holds no safetensors weights, an index naming a shard it lacks, both
            an index and a model.safetensors it does not name, or a header that is not safetensors.
    """
    where = f"{repo.repo_id}@{repo.commit[:12]}"
    fetched = _fetched(scratch, repo)
    side = list(filter_repo_objects(repo.files, allow_patterns=SIDE_FILE_PATTERNS, ignore_patterns=WEIGHT_PATTERNS))
    if INDEX_NAME in repo.files:
        side.append(INDEX_NAME)
    for name in side:
        target = _inside(scratch, name, where)
        if not _complete(target, repo.files[name].size):
            download(repo, name, target, progress=progress)
    if INDEX_NAME in repo.files:
        shards = sorted(summarize_index(scratch / INDEX_NAME).shards)
        for name in shards:
            resolve_inside(scratch, scratch / INDEX_NAME, name)
            if name not in repo.files:
                raise CheckpointError(f"{where}/{INDEX_NAME}: names the shard {name}, which the repo does not hold")
        if SINGLE_NAME in repo.files and SINGLE_NAME not in shards:
            raise CheckpointError(both_layouts(where))
    elif SINGLE_NAME in repo.files:
        shards = [SINGLE_NAME]
    else:
        raise CheckpointError(f"{where}: holds no {INDEX_NAME} or {SINGLE_NAME}: no safetensors weights to convert")
    headers = {}
    for name in shards:
        target = _inside(scratch, name, where)
        size = repo.files[name].size
        if name in fetched and _complete(target, size):
            continue  # downloaded whole (and checked) by an interrupted run
        local = _placeholder_header(target, size)
        if local is not None:
            headers[name] = local  # laid out by an interrupted run: its header is not fetched again
        else:
            headers[name] = _header_bytes(repo, name, size, where)
            _write_placeholder(target, headers[name], size)
    return StreamedSource(repo, scratch, shards, headers)


class StreamHooks(ShardHooks):
    """Downloads the sources of each output shard just before it is written, and deletes each source
    once the last output shard that reads it is written."""

    def __init__(self, source: StreamedSource, plan: ConversionPlan, *, progress: bool) -> None:
        self.source = source
        self.progress = progress
        self.name_of = {source.scratch / name: name for name in source.shards}
        self.readers: dict[str, set[str]] = {name: set() for name in source.shards}
        for shard in plan.shards:
            for name in self.sources_of(shard):
                self.readers[name].add(shard.filename)
        self.sizes = {name: source.repo.files[name].size for name in source.shards}
        repo = source.repo
        self.source_identity = [
            repo.repo_id,
            repo.commit,
            [[n, repo.files[n].size, repo.files[n].sha256 or repo.files[n].git_oid] for n in source.shards],
        ]
        self.downloaded_bytes = 0
        self.peak_sources = 0

    def sources_of(self, shard: ShardPlan) -> list[str]:
        """The source shards `shard` reads, in the order it first reads them."""
        names = (self.name_of[p.file] for t in shard.tensors for p in t.pieces if p.file is not None)
        return list(dict.fromkeys(names))

    def start(self, partial: Path, kept: set[str]) -> set[str]:
        for shard in kept:
            self._done(shard)
        return set()

    def space_needed(self, todo: list[ShardPlan], side_bytes: int) -> int:
        return side_bytes + peak_bytes(todo, self, keep_outputs=True)

    def before_shard(self, shard: ShardPlan) -> None:
        for name in self.sources_of(shard):
            if name in self.source.headers:
                self._fetch(name)
        present = sum(self.sizes[n] for n, readers in self.readers.items() if readers and n not in self.source.headers)
        self.peak_sources = max(self.peak_sources, present)

    def after_shard(self, shard: ShardPlan, path: Path) -> None:
        self._done(shard.filename)

    def _fetch(self, name: str) -> None:
        target = self.source.scratch / name
        part = target.with_name(f".{target.name}.part")
        if not part.exists():  # the header is here already: the download goes on from its end
            fd = open_own_file(part, "a download", exclusive=True)
            with os.fdopen(fd, "wb") as f:
                f.write(self.source.headers[name])
        download(self.source.repo, name, target, progress=self.progress)
        self.downloaded_bytes += self.sizes[name]
        _record_fetched(self.source.scratch, name)
        del self.source.headers[name]

    def _done(self, filename: str) -> None:
        """`filename` is written: sources no other unwritten shard reads are dropped."""
        for name, readers in self.readers.items():
            if filename in readers:
                readers.discard(filename)
                if not readers:
                    _drop(self.source.scratch, name)


def peak_bytes(todo: list[ShardPlan], hooks: StreamHooks, *, keep_outputs: bool) -> int:
    """The most bytes the run holds at once beside DST writing `todo` in order: the output shards
    written so far (`keep_outputs`; else only the one being written) and the sources still to be read."""
    readers = {name: set(r) for name, r in hooks.readers.items()}
    present = {name for name, r in readers.items() if r and name not in hooks.source.headers}
    peak = written = 0
    for shard in todo:
        present.update(hooks.sources_of(shard))
        peak = max(peak, sum(hooks.sizes[n] for n in present) + written + shard.file_size)
        if keep_outputs:
            written += shard.file_size
        for name in list(present):
            readers[name].discard(shard.filename)
            if not readers[name]:
                present.discard(name)
    return peak


def remove_scratch(scratch: Path) -> None:
    """Remove the scratch folder: the run is done, or failed (an interrupted run keeps it for `--resume`)."""
    if os.path.lexists(scratch):
        remove_tree(scratch, "the download folder")


def _inside(scratch: Path, name: str, where: str) -> Path:
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise CheckpointError(f"{where}: file name {name!r} points outside the repo")
    target = scratch / pure
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _complete(path: Path, size: int) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return os.path.isfile(path) and not os.path.islink(path) and st.st_size == size


def _fetched(scratch: Path, repo: PinnedRepo) -> set[str]:
    """The shards an interrupted run into `scratch` downloaded and checked, from its record; a scratch
    folder of another repo or commit is emptied first."""
    record = scratch / FETCHED_NAME
    if refuse_unless_directory(scratch, "the download folder"):
        lines = []
        if os.path.lexists(record):
            text = read_document(record, error=DestinationError, what="download record", follow_links=False)
            lines = text.decode("utf-8", "replace").splitlines()
        if lines[:1] == [f"{repo.repo_id}@{repo.commit}"]:
            fetched: set[str] = set()
            for line in lines[1:]:
                if line.startswith(DROPPED):
                    fetched.discard(line.removeprefix(DROPPED))
                else:
                    fetched.add(line)
            return fetched
        remove_tree(scratch, "the download folder")
    scratch.mkdir()
    fd = open_own_file(record, "the download record", exclusive=True)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"{repo.repo_id}@{repo.commit}\n")
    return set()


def _record_fetched(scratch: Path, name: str, *, dropped: bool = False) -> None:
    fd = open_own_file(scratch / FETCHED_NAME, "the download record", append=True)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(f"{DROPPED if dropped else ''}{name}\n")
        f.flush()
        os.fsync(f.fileno())


def _drop(scratch: Path, name: str) -> None:
    """Turn a downloaded source back into a placeholder, its data blocks freed and its header kept,
    so that a resumed run plans it without fetching the header again. Recorded as no longer
    downloaded first: a placeholder is never taken for the data."""
    path = scratch / name
    if os.path.islink(path) or not os.path.isfile(path):
        return
    _record_fetched(scratch, name, dropped=True)
    size = path.lstat().st_size
    header = _placeholder_header(path, size)
    if header is None:
        path.unlink()
        return
    _write_placeholder(path, header, size)


def _header_bytes(repo: PinnedRepo, name: str, size: int, where: str) -> bytes:
    if size < 8:
        raise CheckpointError(f"{where}/{name}: truncated: {size} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", read_range(repo, name, 0, 8))
    if length > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}/{name}: header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + length > size:
        raise CheckpointError(f"{where}/{name}: truncated: header length {length} runs past the {size}-byte file")
    return struct.pack("<Q", length) + read_range(repo, name, 8, length)


def _placeholder_header(path: Path, size: int) -> bytes | None:
    """The header bytes of the placeholder an interrupted run left at `path`, if one of `size` is
    there. Checked as every download is: against the Hub's hash once the rest is fetched."""
    if not _complete(path, size):
        return None
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            return None
        header = head + f.read(length)
    return header if len(header) == 8 + length else None


def _write_placeholder(path: Path, header: bytes, size: int) -> None:
    with os.fdopen(open_own_file(path, "a source placeholder"), "wb") as f:
        f.truncate(0)
        f.write(header)
        f.truncate(size)
