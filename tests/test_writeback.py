"""Durable convert through the page cache (where direct I/O is not to be had) hands copied bytes to
the disk while it copies (sync_file_range), so the fsync that makes a shard durable has little left
to write."""

from __future__ import annotations

import os

import pytest

from fusemoe_ckpt import convert
from fusemoe_ckpt.write import writer as writer_module
from fusemoe_ckpt.write.writeback import start_writeback

from .conftest import QWEN3_CONFIG, expert_tensors, write_checkpoint


@pytest.mark.parametrize("durable", [True, False], ids=["fsync", "no-fsync"])
def test_write_behind_starts_every_copied_byte_once(tmp_path, monkeypatch, durable):
    """With fsync, the copied bytes of every shard are handed to the disk early, each once and in
    order; without fsync, none is (the page cache keeps them)."""
    src = write_checkpoint(tmp_path / "src", expert_tensors(), shards=3, config=QWEN3_CONFIG)
    monkeypatch.setattr(writer_module, "DIRECT_IO", False)  # as on a filesystem without direct I/O
    monkeypatch.setattr(writer_module, "WRITE_BEHIND", 64)
    started: dict[str, list[tuple[int, int]]] = {}
    monkeypatch.setattr(
        writer_module.ShardWriter,
        "start_writeback",
        lambda self, offset, length: started.setdefault(self.path.name, []).append((offset, length)),
    )
    result = convert(src, tmp_path / "dst", max_shard_size=300, durable=durable, workers=1)
    if not durable:
        assert started == {}
        return
    assert len(result.plan.shards) > 1
    assert sorted(started) == sorted(shard.filename for shard in result.plan.shards)
    for shard in result.plan.shards:
        ranges = started[shard.filename]
        assert ranges[0][0] == len(shard.header)
        assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:], strict=False))
        assert ranges[-1][0] + ranges[-1][1] == shard.file_size
    # In 64-byte stretches, the disk starts on a shard before the shard is all copied.
    assert max(len(ranges) for ranges in started.values()) > 1


def test_a_shard_no_larger_than_one_stretch_is_left_to_its_fsync(tmp_path, monkeypatch):
    """Write-behind starts nothing on a shard of at most WRITE_BEHIND bytes: its fsync comes next."""
    src = write_checkpoint(tmp_path / "src", expert_tensors(), shards=3, config=QWEN3_CONFIG)
    monkeypatch.setattr(writer_module, "DIRECT_IO", False)
    started = []
    monkeypatch.setattr(writer_module.ShardWriter, "start_writeback", lambda self, *a: started.append(a))
    result = convert(src, tmp_path / "dst", max_shard_size=300, durable=True, workers=1)
    assert len(result.plan.shards) > 1
    assert max(shard.file_size for shard in result.plan.shards) <= writer_module.WRITE_BEHIND
    assert started == []
    monkeypatch.setattr(writer_module, "WRITE_BEHIND", min(s.file_size for s in result.plan.shards) - 1)
    convert(src, tmp_path / "dst2", max_shard_size=300, durable=True, workers=1)
    assert started, "with every shard larger than one stretch, write-back is started early"


def test_start_writeback_leaves_the_bytes_as_written(tmp_path):
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"expert 7" * 1000)
        start_writeback(fd, 0, 8000)
        start_writeback(fd, 4096, 1 << 40)  # past the end: nothing to start, no error
    finally:
        os.close(fd)
    assert path.read_bytes() == b"expert 7" * 1000
