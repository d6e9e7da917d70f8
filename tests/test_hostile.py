"""Hostile sources test_bad_input.py does not cover: special files, unordered headers, Hub cache links."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from fusemoe_ckpt.cli import cli

from .conftest import load_checkpoint
from .test_bad_input import INDEX, SHARD_2, qwen_source, refuse


@pytest.fixture
def no_hang():
    """Fail instead of hanging: blocking on a FIFO is the bug these tests guard against."""

    def timeout(signum, frame):
        raise TimeoutError("convert blocked on a special file")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, 10)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


@pytest.mark.parametrize("name", [SHARD_2, INDEX, "config.json"], ids=["shard", "index", "config"])
def test_fifo_instead_of_a_source_file(tmp_path, no_hang, name):
    """A FIFO where a shard, the index or config.json should be is refused at once, not waited on."""
    src = qwen_source(tmp_path)
    replace_with_fifo(src / name)
    assert refuse(tmp_path, src, tmp_path / "dst") == f"{src / name}: not a regular file"


@pytest.mark.parametrize("kind", ["fifo", "device", "dangling-link"])
def test_special_file_among_the_files_copied_as_they_are(tmp_path, no_hang, kind):
    """Files beside the weights are copied to DST: a FIFO would block the copy, a device never end."""
    src = qwen_source(tmp_path)
    special = src / "tokenizer.json"
    if kind == "fifo":
        os.mkfifo(special)
    elif kind == "device":
        special.symlink_to("/dev/zero")
    else:
        special.symlink_to(src / "missing.json")
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message == f"{special}: not a regular file; remove it from the source or replace it"


def test_index_that_is_not_utf8(tmp_path):
    src = qwen_source(tmp_path)
    (src / INDEX).write_bytes(b'{"weight_map": {"\xff": "x"}}')
    assert refuse(tmp_path, src, tmp_path / "dst").startswith(f"{src / INDEX}: not valid UTF-8")


def reorder_header(path: Path) -> None:
    """Rewrite `path` with its header entries listed in reverse order; offsets and data unchanged."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    reordered = json.dumps(dict(reversed(header.items())), separators=(",", ":")).encode()
    reordered += b" " * (length - len(reordered))
    assert len(reordered) == length
    path.write_bytes(raw[:8] + reordered + raw[8 + length :])


def test_header_entries_out_of_offset_order_are_read_by_offset(tmp_path):
    """The JSON order of header entries says nothing about where the bytes are: a shard listing them
    in reverse converts exactly as the original does (safetensors reads it the same way too)."""
    src = qwen_source(tmp_path)
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", "-q", str(src), str(tmp_path / "ordered")]).exit_code == 0
    shuffled = tmp_path / "shuffled-src"
    shutil.copytree(src, shuffled)
    for shard in shuffled.glob("*.safetensors"):
        reorder_header(shard)
        with safe_open(shard, "pt") as a, safe_open(src / shard.name, "pt") as b:
            assert list(a.keys()) == list(b.keys())
    assert (shuffled / SHARD_2).read_bytes() != (src / SHARD_2).read_bytes()
    assert runner.invoke(cli, ["convert", "-q", str(shuffled), str(tmp_path / "out")]).exit_code == 0
    for shard in (tmp_path / "ordered").glob("*.safetensors"):
        assert (tmp_path / "out" / shard.name).read_bytes() == shard.read_bytes()


def hub_cache_snapshot(src: Path, cache: Path) -> Path:
    """Lay `src` out as the Hub cache does: snapshot entries are relative symlinks into blobs/."""
    repo = cache / "models--org--tiny-moe"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(src.iterdir())):
        blob = repo / "blobs" / f"{i:040x}"
        shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_hub_cache_snapshot_with_symlinks_converts(tmp_path):
    """Snapshot files are symlinks that leave the snapshot directory; they are followed, and DST gets
    real files with the same bytes as a conversion of the plain directory."""
    src = qwen_source(tmp_path)
    snapshot = hub_cache_snapshot(src, tmp_path / "hub")
    assert all(p.is_symlink() for p in snapshot.iterdir())
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", "-q", str(src), str(tmp_path / "plain")]).exit_code == 0
    result = runner.invoke(cli, ["convert", "-q", str(snapshot), str(tmp_path / "out")])
    assert (result.exit_code, result.output) == (0, "")
    plain, out = tmp_path / "plain", tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in plain.iterdir())
    for file in out.iterdir():
        assert not file.is_symlink() and file.is_file()
        if file.name != INDEX:
            assert file.read_bytes() == (plain / file.name).read_bytes()
    index, reference = json.loads((out / INDEX).read_text()), json.loads((plain / INDEX).read_text())
    assert index["weight_map"] == reference["weight_map"]
    assert index["metadata"] | {"fusemoe_ckpt_source": str(src)} == reference["metadata"]
    assert load_checkpoint(out).keys() == load_checkpoint(plain).keys()
