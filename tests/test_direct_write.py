"""A conversion larger than the page cache takes in is written with direct I/O where the filesystem
takes it: the same bytes as the page cache route, assembled in order into aligned blocks, the last one
cut back to the shard's size; a smaller one stays in the page cache."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from fusemoe_ckpt import convert
from fusemoe_ckpt.errors import CheckpointError, DestinationError
from fusemoe_ckpt.write import direct as direct_module
from fusemoe_ckpt.write import writer as writer_module
from fusemoe_ckpt.write.direct import ALIGN, DirectStream, enable_direct

from .conftest import QWEN3_CONFIG, expert_tensors, write_checkpoint


def _direct_fd(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    if not enable_direct(fd):
        os.close(fd)
        pytest.skip(f"{path.parent}: the filesystem refuses direct I/O")
    return fd


def test_stream_writes_appended_bytes_in_order_across_blocks(tmp_path):
    source = tmp_path / "source"
    source.write_bytes(bytes(range(256)) * 64)  # 16 KiB, every byte telling its place mod 256
    expected = bytearray()
    fd = _direct_fd(tmp_path / "out")
    src_fd = os.open(source, os.O_RDONLY)
    stream = DirectStream(fd, chunk=ALIGN, in_flight=2)
    try:
        for size in (1, 4095, 4096, 4097, 13, 9000):
            data = bytes([size % 251]) * size
            stream.append(data)
            expected += data
            assert stream.append_from(src_fd, size, 5000) == 5000
            expected += source.read_bytes()[size : size + 5000]
        assert stream.append_from(src_fd, 16384 - 10, 100) == 10  # the file ends: fewer bytes
        expected += source.read_bytes()[-10:]
        assert stream.position == len(expected)
        stream.finish()
        os.ftruncate(fd, stream.position)
    finally:
        stream.close()
        os.close(src_fd)
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == bytes(expected)


@pytest.mark.parametrize("dtype", [None, "float16"], ids=["copy", "cast"])
def test_durable_convert_writes_directly_the_bytes_of_the_page_cache_route(tmp_path, monkeypatch, dtype):
    src = write_checkpoint(tmp_path / "src", expert_tensors(layers=3, experts=8), shards=3, config=QWEN3_CONFIG)
    monkeypatch.setattr(direct_module, "CHUNK", ALIGN)  # many blocks in flight per shard
    monkeypatch.setattr(writer_module, "page_cache_absorbs", lambda nbytes: False)  # as for a frontier model
    opened = []

    def spying_enable(fd):
        opened.append(enable_direct(fd))
        return opened[-1]

    monkeypatch.setattr(writer_module, "enable_direct", spying_enable)
    result = convert(src, tmp_path / "direct", max_shard_size=500, dtype=dtype, workers=4)
    if not all(opened):
        pytest.skip(f"{tmp_path}: the filesystem refuses direct I/O")
    assert len(opened) == len(result.plan.shards) > 1
    convert(src, tmp_path / "buffered", max_shard_size=500, dtype=dtype, durable=False)
    names = sorted(p.name for p in (tmp_path / "buffered").iterdir())
    assert sorted(p.name for p in (tmp_path / "direct").iterdir()) == names
    for name in names:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes(), name


def test_a_filesystem_without_direct_io_is_written_through_the_page_cache(tmp_path, monkeypatch):
    tensors = expert_tensors(experts=4, dtype=torch.bfloat16)
    src = write_checkpoint(tmp_path / "src", tensors, shards=2, config=QWEN3_CONFIG)
    monkeypatch.setattr(writer_module, "page_cache_absorbs", lambda nbytes: False)
    monkeypatch.setattr(writer_module, "enable_direct", lambda fd: False)
    streams = []
    monkeypatch.setattr(writer_module, "DirectStream", lambda *a, **k: streams.append(a))
    convert(src, tmp_path / "dst")
    convert(src, tmp_path / "again", durable=False)
    assert streams == []
    for path in (tmp_path / "again").iterdir():
        assert (tmp_path / "dst" / path.name).read_bytes() == path.read_bytes()


def test_a_source_cut_short_while_written_directly_is_named(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src", expert_tensors(), shards=1, config=QWEN3_CONFIG)
    real_append_from = DirectStream.append_from

    def cut_short(self, fd, offset, length):  # the source shrank after it was planned
        return real_append_from(self, fd, offset, length) if offset < 1000 else 0

    monkeypatch.setattr(DirectStream, "append_from", cut_short)
    monkeypatch.setattr(writer_module, "page_cache_absorbs", lambda nbytes: False)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors: ended at byte \d+, before the"):
        convert(src, tmp_path / "dst", workers=1)
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("durable", [True, False], ids=["fsync", "no-fsync"])
@pytest.mark.parametrize("absorbs", [True, False], ids=["fits-the-page-cache", "too-large-for-it"])
def test_only_what_the_page_cache_cannot_take_is_written_directly(tmp_path, monkeypatch, absorbs, durable):
    src = write_checkpoint(tmp_path / "src", expert_tensors(experts=4), shards=2, config=QWEN3_CONFIG)
    convert(src, tmp_path / "reference", durable=False)
    asked = []
    monkeypatch.setattr(writer_module, "page_cache_absorbs", lambda nbytes: asked.append(nbytes) or absorbs)
    opened = []
    monkeypatch.setattr(writer_module, "enable_direct", lambda fd: opened.append(fd) or enable_direct(fd))
    fsynced = []
    monkeypatch.setattr(writer_module.os, "fsync", lambda fd: fsynced.append(fd))
    result = convert(src, tmp_path / "dst", durable=durable)
    assert asked == [sum(shard.file_size for shard in result.plan.shards)]
    assert len(opened) == (0 if absorbs else len(result.plan.shards))
    assert bool(fsynced) == durable
    for path in (tmp_path / "reference").iterdir():
        assert (tmp_path / "dst" / path.name).read_bytes() == path.read_bytes()


def test_a_shard_written_directly_has_its_space_reserved_first(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src", expert_tensors(experts=4), shards=2, config=QWEN3_CONFIG)
    monkeypatch.setattr(writer_module, "page_cache_absorbs", lambda nbytes: False)
    reserved = []

    def spying_preallocate(fd, size, path):
        direct_module.preallocate(fd, size, path)
        reserved.append((path.name, size, os.fstat(fd).st_size, os.fstat(fd).st_blocks * 512))

    monkeypatch.setattr(writer_module, "preallocate", spying_preallocate)
    result = convert(src, tmp_path / "dst")
    if not reserved:
        pytest.skip(f"{tmp_path}: the filesystem refuses direct I/O")
    assert [name for name, *_ in reserved] == [shard.filename for shard in result.plan.shards]
    for name, size, length, allocated in reserved:
        assert length == size == (tmp_path / "dst" / name).stat().st_size
        assert allocated >= size  # fallocate took the blocks before a byte was written


def test_a_disk_too_small_for_a_shard_is_refused_before_it_is_written(tmp_path, monkeypatch):
    """fallocate's ENOSPC is the disk-full error a write would have met, before any byte is written."""
    src = write_checkpoint(tmp_path / "src", expert_tensors(experts=4), shards=2, config=QWEN3_CONFIG)
    monkeypatch.setattr(writer_module, "page_cache_absorbs", lambda nbytes: False)
    monkeypatch.setattr(direct_module, "libc_function", lambda name, *types: lambda *args: -1)
    monkeypatch.setattr(direct_module, "errno_of_last_call", lambda: errno.ENOSPC)
    appended = []
    monkeypatch.setattr(DirectStream, "append", lambda self, data: appended.append(data))
    with pytest.raises(DestinationError, match=r"model-00001-of-00001\.safetensors: cannot write: No space left"):
        convert(src, tmp_path / "dst", workers=1)
    assert appended == [] and not (tmp_path / "dst").exists()


def test_a_filesystem_without_fallocate_is_written_all_the_same(tmp_path, monkeypatch):
    src = write_checkpoint(tmp_path / "src", expert_tensors(experts=4), shards=2, config=QWEN3_CONFIG)
    convert(src, tmp_path / "reference", durable=False)
    monkeypatch.setattr(writer_module, "page_cache_absorbs", lambda nbytes: False)
    monkeypatch.setattr(direct_module, "libc_function", lambda name, *types: lambda *args: -1)
    monkeypatch.setattr(direct_module, "errno_of_last_call", lambda: errno.EOPNOTSUPP)
    convert(src, tmp_path / "dst")
    for path in (tmp_path / "reference").iterdir():
        assert (tmp_path / "dst" / path.name).read_bytes() == path.read_bytes()
