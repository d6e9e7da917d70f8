"""Files of a Hub repo at one pinned commit: listed with their sizes and hashes, read by byte range,
downloaded into a given path with the size and hash checked, continuing a download cut short."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_url
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff
from huggingface_hub.utils import tqdm as hub_tqdm

from ..errors import CheckpointError, DestinationError, HubError
from ..sizes import format_size
from ..write.no_follow import open_own_file
from ..write.writer import DISK_FULL

CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repo at the pinned commit: its size and the hash the Hub gives for it (the
    LFS sha256 of a large file, else the git blob id, a sha1 of `blob SIZE\\0` and the bytes)."""

    name: str
    size: int
    sha256: str | None
    git_oid: str | None

    def hasher(self) -> tuple[hashlib._Hash | None, str | None]:
        """A fresh hash object for the check, and the digest it must end with (None, None: none given)."""
        if self.sha256:
            return hashlib.sha256(), self.sha256
        if self.git_oid:
            return hashlib.sha1(b"blob %d\0" % self.size), self.git_oid
        return None, None


@dataclass(frozen=True)
class PinnedRepo:
    """A repo at one commit, so that every file read comes from the same snapshot however the branch moves."""

    repo_id: str
    revision: str
    commit: str
    files: dict[str, RemoteFile]

    def url(self, name: str) -> str:
        return hf_hub_url(self.repo_id, name, revision=self.commit)


def pin_repo(repo_id: str, revision: str | None) -> PinnedRepo:
    """Resolve `revision` to its commit and list every file there, with sizes and hashes.

    Raises:
        HubError: from huggingface_hub, as `hub_errors` turns them (call inside it).
    """
    api = HfApi()
    commit = api.model_info(repo_id, revision=revision).sha
    if not commit:
        raise HubError(f"{repo_id}: the Hub did not say which commit {revision or 'main'} is")
    files = {}
    for item in api.list_repo_tree(repo_id, revision=commit, recursive=True):
        if isinstance(item, RepoFile):
            sha256 = item.lfs.sha256 if item.lfs is not None else None
            files[item.path] = RemoteFile(item.path, item.size, sha256, item.blob_id)
    return PinnedRepo(repo_id, revision or constants.DEFAULT_REVISION, commit, files)


def read_range(repo: PinnedRepo, name: str, start: int, length: int) -> bytes:
    """`length` bytes of `name` from `start` (an HTTP Range request).

    Raises:
        CheckpointError: the server answered with other bytes than asked for (a shorter file, or no
            Range support), naming the file.
    """
    if length == 0:
        return b""
    headers = {**build_hf_headers(), "Range": f"bytes={start}-{start + length - 1}"}
    with http_stream_backoff("GET", repo.url(name), headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
        hf_raise_for_status(r)
        if r.status_code != 206:
            raise CheckpointError(
                f"{repo.repo_id}@{repo.commit[:12]}/{name}: the Hub answered {r.status_code} to a byte-range "
                "request; --stream reads shard headers by range"
            )
        data = b"".join(r.iter_bytes())
    if len(data) != length:
        raise CheckpointError(
            f"{repo.repo_id}@{repo.commit[:12]}/{name}: asked for {length} bytes at {start}, got {len(data)}"
        )
    return data


def download(repo: PinnedRepo, name: str, target: Path, *, progress: bool) -> None:
    """Download `name` into `target` (created without following links), through `target`'s `.part`
    sibling, which a download cut short leaves to be continued; renamed onto `target` once its size
    and hash are right.

    Raises:
        CheckpointError: the file came short or too long, or its hash is not the one the Hub lists
            (the `.part` file is removed).
        DestinationError: the disk filled while writing, naming the file and the space needed.
    """
    remote = repo.files[name]
    part = target.with_name(f".{target.name}.part")
    where = f"{repo.repo_id}@{repo.commit[:12]}/{name}"
    fd = open_own_file(part, "a download", append=True)
    with os.fdopen(fd, "ab") as out:
        have = out.seek(0, os.SEEK_END)
        if have > remote.size:
            out.truncate(0)
            have = 0
        if remote.size - have > shutil.disk_usage(part.parent).free:
            raise no_room(part, remote.size - have)
        hasher, expected = remote.hasher()
        if hasher is not None and have:
            _hash_existing(part, have, hasher)
        bar = hub_tqdm(
            total=remote.size, initial=have, unit="B", unit_scale=True, desc=name[-40:], disable=not progress or None
        )
        try:
            if have < remote.size:
                _append(repo, name, out, have, remote.size, hasher, bar, part)
        finally:
            bar.close()
        got = out.tell()
        if got != remote.size:
            raise _bad_download(part, f"{where}: download truncated: {got} of {remote.size} bytes")
        if hasher is not None and hasher.hexdigest() != expected:
            raise _bad_download(
                part, f"{where}: downloaded bytes hash to {hasher.hexdigest()}, the Hub lists {expected}"
            )
        out.flush()
        os.fsync(out.fileno())
    os.replace(part, target)


def _append(repo, name, out, have, size, hasher, bar, part: Path) -> None:
    headers = {**build_hf_headers(), "Range": f"bytes={have}-{size - 1}"}
    with http_stream_backoff("GET", repo.url(name), headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
        hf_raise_for_status(r)
        if r.status_code != 206 and have:
            out.truncate(0)
            out.seek(0)
            if hasher is not None:
                hasher.__init__()
            bar.reset()
        for chunk in r.iter_bytes(CHUNK):
            if out.tell() + len(chunk) > size:
                break  # longer than listed: reported as the wrong size by the caller
            try:
                out.write(chunk)
            except OSError as e:
                if e.errno in DISK_FULL:
                    raise no_room(part, size - out.tell(), e) from e
                raise
            if hasher is not None:
                hasher.update(chunk)
            bar.update(len(chunk))


def _hash_existing(path: Path, length: int, hasher) -> None:
    with open(path, "rb") as f:
        remaining = length
        while remaining:
            block = f.read(min(CHUNK, remaining))
            if not block:
                break
            hasher.update(block)
            remaining -= len(block)


def _bad_download(part: Path, message: str) -> CheckpointError:
    part.unlink(missing_ok=True)
    return CheckpointError(message)


def no_room(path: Path, needed: int, error: OSError | None = None) -> DestinationError:
    """The one-line error for a download that does not fit: the path, and the space needed and free."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    cause = f"{error.strerror} ({errno.errorcode.get(error.errno, error.errno)}); " if error else ""
    return DestinationError(
        f"{path}: cannot download: {cause}{format_size(needed)} ({needed} bytes) more are needed and "
        f"{format_size(free)} ({free} bytes) is free; free space there or convert to a disk with room"
    )
