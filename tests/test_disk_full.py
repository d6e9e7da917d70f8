"""A destination that fills up or may not grow: one line naming the file, exit 1, nothing left behind."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import fusemoe_ckpt.write.destination as destination_module
import fusemoe_ckpt.write.direct as direct_module
import fusemoe_ckpt.write.output as output_module
import fusemoe_ckpt.write.writer as writer_module
from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.sizes import format_size

from .conftest import QWEN3_CONFIG, expert_tensors, write_checkpoint
from .test_bad_input import one_line_error, refuse

SHARD = "model-00001-of-00001.safetensors"


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "src", expert_tensors(), shards=3, config=QWEN3_CONFIG)


def cli_command(src: Path, dst: Path, *options: str) -> list[str]:
    return [sys.executable, "-m", "fusemoe_ckpt", "convert", "-q", str(src), str(dst), *options]


def quiet_env() -> dict[str, str]:
    # No .pyc writes: under a file size limit they would trip the limit before convert ignores SIGXFSZ.
    return os.environ | {"PYTHONDONTWRITEBYTECODE": "1"}


def test_file_size_limit_fails_the_write_instead_of_killing(src, tmp_path):
    """Under `ulimit -f` the kernel sends SIGXFSZ (fatal by default, ignored by CPython and by convert),
    so the write fails with EFBIG: one line naming the shard, exit 1, and the partial output removed."""
    dst = tmp_path / "dst"
    limit = 1024
    result = subprocess.run(
        cli_command(src, dst),
        env=quiet_env(),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    partial = tmp_path / ".dst.fusemoe-partial"
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"Error: {partial / SHARD}: cannot write: File too large (EFBIG)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces to mount tmpfs")
def test_full_filesystem(src, tmp_path):
    """A real ENOSPC on a 16 KiB tmpfs mounted in a private namespace. The plan's few KiB pass the
    free-space check, but every small shard takes a whole 4 KiB page, so the disk fills mid-run."""
    mount = tmp_path / "small"
    mount.mkdir()
    script = 'mount -t tmpfs -o size=16k tmpfs "$1" || exit 99; shift; "$@"; code=$?; ls -A "$MOUNT" >&2; exit $code'
    command = cli_command(src, mount / "dst", "--max-shard-size", "100")
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(mount), *command],
        env=quiet_env() | {"MOUNT": str(mount)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result.stderr
    # The error line, then the mount's listing: empty, the partial output removed.
    assert len(lines) == 1, result.stderr
    partial = mount / ".dst.fusemoe-partial"
    assert lines[0].startswith(f"Error: {partial}/")
    assert lines[0].endswith(": cannot write: No space left on device (ENOSPC)")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_disk_full_mid_shard_names_the_file(src, tmp_path, monkeypatch, code):
    """The kernel copy failing on the third range of a shard: the shard is named, nothing is left."""
    calls = []
    real_copy = os.copy_file_range

    def filling_copy(*args):
        calls.append(args)
        if len(calls) == 3:
            raise OSError(code, os.strerror(code))
        return real_copy(*args)

    monkeypatch.setattr(writer_module, "DIRECT_IO", False)  # the route of a filesystem without direct I/O
    monkeypatch.setattr(writer_module.os, "copy_file_range", filling_copy)
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "dst"), "--workers", "1"])
    partial = tmp_path / ".dst.fusemoe-partial"
    assert one_line_error(result) == (f"{partial / SHARD}: cannot write: {os.strerror(code)} ({errno.errorcode[code]})")
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_disk_full_mid_shard_written_directly_names_the_file(src, tmp_path, monkeypatch, code):
    """A direct write failing on the first block of a shard, in a writing thread while the next is
    assembled: the shard is named, nothing is left."""
    calls = []
    real_pwrite = os.pwrite

    def filling_pwrite(fd, data, at):
        if threading.current_thread().name.startswith("direct-write"):
            calls.append(at)
            if len(calls) == 1:
                raise OSError(code, os.strerror(code))
        return real_pwrite(fd, data, at)

    monkeypatch.setattr(direct_module, "CHUNK", 4096)
    monkeypatch.setattr(writer_module, "page_cache_absorbs", lambda nbytes: False)  # as for a frontier model
    monkeypatch.setattr(direct_module.os, "pwrite", filling_pwrite)
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "dst"), "--workers", "1"])
    partial = tmp_path / ".dst.fusemoe-partial"
    assert one_line_error(result) == (f"{partial / SHARD}: cannot write: {os.strerror(code)} ({errno.errorcode[code]})")
    assert calls[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_disk_full_writing_the_index(src, tmp_path, monkeypatch):
    """ENOSPC after the shards, writing the index, is reported the same way."""

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(output_module, "write_index", full)
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "dst")])
    index = tmp_path / ".dst.fusemoe-partial" / "model.safetensors.index.json"
    assert one_line_error(result) == f"{index}: cannot write: No space left on device (ENOSPC)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_free_space_is_checked_before_writing(src, tmp_path, monkeypatch):
    """Too little free space is refused before anything is written, with both numbers; the needed
    bytes are those of the finished output (shards plus copied files), measured on a real run."""
    reference = tmp_path / "ref"
    CliRunner().invoke(cli, ["convert", "-q", str(src), str(reference)])
    needed = sum(p.stat().st_size for p in reference.iterdir() if p.name != "model.safetensors.index.json")
    shutil.rmtree(reference)
    free = needed - 1
    # What the destination's filesystem reports: `free` blocks of one byte for an unprivileged user.
    monkeypatch.setattr(destination_module.os, "statvfs", lambda path: SimpleNamespace(f_bavail=free, f_frsize=1))
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message == (
        f"{tmp_path}: the conversion needs {format_size(needed)} ({needed} bytes) but only "
        f"{format_size(free)} ({free} bytes) is free"
    )
