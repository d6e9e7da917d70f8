"""Hostile file-system states around SRC and DST: links planted where the tool keeps its own files, a DST
that is a link or a mount point, symlinked subfolders of SRC, special files where verify and unfuse
read, and a folder holding both weight layouts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from fusemoe_ckpt.cli import cli

from .conftest import load_checkpoint
from .test_bad_input import INDEX, SHARD_2, one_line_error, qwen_source, refuse, snapshot
from .test_disk_full import _can_mount_tmpfs
from .test_hostile import no_hang  # noqa: F401 - a fixture

# --- 1. paths beside DST are never followed ---------------------------------------------------------


def beside(dst: Path, suffix: str) -> Path:
    return dst.parent / f".{dst.name}.fusemoe-{suffix}"


@pytest.mark.parametrize("target", ["src-file", "dangling"])
def test_a_lock_file_link_is_refused_and_nothing_is_written_through_it(tmp_path, target):
    """A planted `.DST.fusemoe-lock` linking to a SRC file used to get that file overwritten with a
    process id; a dangling one would have created its target."""
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    aim = src / "config.json" if target == "src-file" else tmp_path / "created-through-the-link"
    beside(dst, "lock").symlink_to(aim)
    message = refuse(tmp_path, src, dst)
    assert message == (
        f"{beside(dst, 'lock')}: is a symbolic link where fusemoe-ckpt keeps the lock file; links there are "
        "not followed and nothing was written through it; remove it"
    )
    assert not (tmp_path / "created-through-the-link").exists()


def test_a_lock_file_with_another_hard_link_is_refused(tmp_path):
    """A hard link cannot be told from the file by O_NOFOLLOW: its link count gives it away."""
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    os.link(src / "config.json", beside(dst, "lock"))
    message = refuse(tmp_path, src, dst)
    assert message == (
        f"{beside(dst, 'lock')}: has other hard links, where fusemoe-ckpt keeps the lock file; remove it"
    )


def test_a_fifo_as_the_lock_file_is_refused_without_blocking(tmp_path, no_hang):  # noqa: F811
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    os.mkfifo(beside(dst, "lock"))
    message = refuse(tmp_path, src, dst)
    assert message == f"{beside(dst, 'lock')}: is not a regular file, where fusemoe-ckpt keeps the lock file; remove it"


@pytest.mark.parametrize("suffix", ["partial", "replaced"])
@pytest.mark.parametrize("options", [[], ["--overwrite"], ["--resume"], ["--resume", "--overwrite"]])
def test_a_partial_or_replaced_directory_link_is_refused(tmp_path, suffix, options):
    """A link planted where the partial output or the replaced DST goes: refused by name before a
    byte is written, whatever the options; the folder it points to keeps its files."""
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("an earlier output")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("not yours")
    beside(dst, suffix).symlink_to(victim)
    what = "the partial output" if suffix == "partial" else "the replaced output"
    message = refuse(tmp_path, src, dst, *options)
    assert message == (
        f"{beside(dst, suffix)}: is a symbolic link where fusemoe-ckpt keeps {what}; links there are not "
        "followed and nothing was written through it; remove it"
    )


def test_a_file_where_the_partial_directory_goes_is_refused(tmp_path):
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    beside(dst, "partial").write_text("not a directory")
    message = refuse(tmp_path, src, dst, "--overwrite")
    assert (
        message
        == f"{beside(dst, 'partial')}: is not a directory, where fusemoe-ckpt keeps the partial output; remove it"
    )


@pytest.mark.parametrize("options", [["--resume"], ["--resume", "--overwrite"]])
def test_a_journal_link_in_the_partial_directory_is_never_read(tmp_path, options):
    """--resume reads the journal of the partial directory: a link planted there is refused (or, with
    --overwrite, removed with the partial directory, never its target)."""
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    partial = beside(dst, "partial")
    partial.mkdir()
    os.mkfifo(tmp_path / "fifo")
    (partial / ".fusemoe-journal").symlink_to(tmp_path / "fifo")
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", "-q", str(src), str(dst), *options])
    if "--overwrite" in options:
        assert (result.exit_code, result.output) == (0, "")
        assert (tmp_path / "fifo").exists() and not partial.exists()
    else:
        assert one_line_error(result) == (
            f"{partial / '.fusemoe-journal'}: is a symbolic link where fusemoe-ckpt keeps the resume journal; "
            "links there are not followed and nothing was written through it; remove it"
        )


# --- 2. DST that is a link, or a mount point ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["non-empty", "empty", "dangling"])
def test_a_dst_link_is_resolved_and_stays_a_link_to_the_output(tmp_path, kind):
    """DST linking to a directory gets the output written there (renamed onto the target, beside
    it), says so, and the link keeps pointing at it; --overwrite used to end in `Cannot call rmtree
    on a symbolic link` after the whole output was written."""
    src = qwen_source(tmp_path)
    target = tmp_path / "disks" / "big" / "out"
    if kind != "dangling":
        target.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True)
    if kind == "non-empty":
        (target / "old.txt").write_text("replaced")
    link = tmp_path / "dst"
    link.symlink_to(target)
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", "-q", "--overwrite", str(src), str(link)])
    assert result.exit_code == 0, result.output
    assert result.stderr == f"Warning: {link}: is a symbolic link; the output is written to its target {target}\n"
    assert link.is_symlink() and link.resolve() == target
    assert not (target / "old.txt").exists()
    assert load_checkpoint(target).keys() == load_checkpoint(link).keys()
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disks", "dst", "src"]


def test_a_dst_link_loop_is_refused(tmp_path):
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    dst.symlink_to(tmp_path / "dst")
    message = refuse(tmp_path, src, dst)
    assert message == f"{dst}: is a symbolic link that does not resolve (a loop); remove it or fix it"


def _in_namespace(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a shell script as root of private user and mount namespaces (mounts vanish with it)."""
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1"},
    )


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces to mount")
@pytest.mark.parametrize("mount", ["tmpfs", "bind"])
def test_a_mount_point_dst_is_refused_before_anything_is_written(tmp_path, mount):
    """rename() cannot replace a mount point (EBUSY): the whole output used to be written on the parent
    file system first. A bind mount of the same file system is found too (/proc/self/mountinfo)."""
    src = qwen_source(tmp_path)
    dst = tmp_path / "mnt"
    dst.mkdir()
    (tmp_path / "elsewhere").mkdir()
    how = 'mount -t tmpfs -o size=1m tmpfs "$1"' if mount == "tmpfs" else 'mount --bind "$3" "$1"'
    script = f'{how} || exit 99; "$2" -m fusemoe_ckpt convert -q "$4" "$1"; code=$?; ls -A "$1"; exit $code'
    result = _in_namespace(script, str(dst), sys.executable, str(tmp_path / "elsewhere"), str(src))
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"Error: {dst}: is a mount point, which the finished output cannot be renamed onto; nothing was "
        f"written; convert into a new directory inside it, such as {dst / 'NAME'}\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "mnt", "src"]
    assert list((tmp_path / "elsewhere").iterdir()) == []


# --- 3. symlinked subfolders of SRC -------------------------------------------------------------------


def test_a_symlinked_subfolder_is_copied_as_its_files(tmp_path):
    """A tokenizer folder shared between checkpoints by a link: copied as real files, none dropped,
    no link out of DST."""
    src = qwen_source(tmp_path)
    shared = tmp_path / "shared-tokenizer"
    (shared / "nested").mkdir(parents=True)
    (shared / "tokenizer.json").write_text('{"version": "1.0"}')
    (shared / "nested" / "vocab.txt").write_text("a\nb\n")
    (shared / "weights.safetensors").write_bytes(b"never copied")
    (src / "tokenizer").symlink_to(shared)
    dst = tmp_path / "dst"
    result = CliRunner().invoke(cli, ["convert", "-q", str(src), str(dst)])
    assert (result.exit_code, result.output) == (0, "")
    copied = dst / "tokenizer"
    assert copied.is_dir() and not copied.is_symlink()
    assert sorted(str(p.relative_to(copied)) for p in copied.rglob("*")) == [
        "nested",
        "nested/vocab.txt",
        "tokenizer.json",
    ]
    assert (copied / "nested" / "vocab.txt").read_text() == "a\nb\n"
    assert not any(p.is_symlink() for p in dst.rglob("*"))


@pytest.mark.parametrize("aim", ["src", "parent"])
def test_a_symlinked_subfolder_that_loops_is_refused(tmp_path, aim):
    src = qwen_source(tmp_path)
    loop = src / "tokenizer"
    loop.symlink_to(src if aim == "src" else tmp_path)
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message == (
        f"{loop}: a symbolic link to a folder that contains it (a loop); remove it from the source or "
        "replace it with the files it should hold"
    )


# --- 5. verify and unfuse read their inputs with convert's care ------------------------------------


@pytest.fixture
def converted(tmp_path) -> tuple[Path, Path]:
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    assert CliRunner().invoke(cli, ["convert", "-q", str(src), str(dst)]).exit_code == 0
    return src, dst


def _verify(src: Path, dst: Path, *options: str):
    return CliRunner().invoke(cli, ["verify", str(src), str(dst), *options])


def _verify_error(result) -> str:
    """verify's failure: the mismatch lines on stdout, then one `Error: ` line on stderr, exit 1."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr.removeprefix("Error: ").rstrip("\n")


def test_verify_with_a_fifo_as_dst_index_reports_it_without_blocking(converted, no_hang):  # noqa: F811
    src, dst = converted
    (dst / INDEX).unlink()
    os.mkfifo(dst / INDEX)
    result = _verify(src, dst)
    assert f"{INDEX}: {dst / INDEX}: not a regular file\n" in result.stdout
    assert _verify_error(result).startswith(f"{dst} differs from the plan of {src}")


def test_verify_with_a_fifo_as_a_dst_shard_reports_it_without_blocking(converted, no_hang):  # noqa: F811
    src, dst = converted
    shard = dst / "model-00001-of-00001.safetensors"
    shard.unlink()
    os.mkfifo(shard)
    result = _verify(src, dst)
    assert f"shard {shard.name} is invalid: {shard}: not a regular file" in result.stdout
    _verify_error(result)


def test_verify_load_check_with_a_fifo_as_dst_config_reports_it_without_blocking(converted, no_hang):  # noqa: F811
    """transformers would wait on the FIFO forever: DST's config.json is read as SRC's is, first."""
    src, dst = converted
    (dst / "config.json").unlink()
    os.mkfifo(dst / "config.json")
    result = _verify(src, dst, "--load-check")
    assert f"config.json: cannot build the model: {dst / 'config.json'}: not a regular file\n" in result.stdout
    _verify_error(result)


def test_verify_reports_tampered_provenance_by_field(converted):
    """A recorded field of the wrong type used to reach the user as a bare TypeError; it is a fault of
    DST's index, named with the field, and every tensor is still checked."""
    src, dst = converted
    index = json.loads((dst / INDEX).read_text())
    index["metadata"]["fusemoe_ckpt_family"] = ["qwen2_moe"]
    (dst / INDEX).write_text(json.dumps(index))
    result = _verify(src, dst)
    assert result.stdout == (
        f"{INDEX}: {dst / INDEX}: metadata.fusemoe_ckpt_family is ['qwen2_moe'], not a family name\n"
    )
    assert _verify_error(result) == (
        f"{dst} differs from the plan of {src}: 1 mismatching keys or files of 8 planned tensors"
    )


@pytest.mark.parametrize("name", [INDEX, "model-00001-of-00001.safetensors", "config.json"])
def test_unfuse_refuses_special_files_in_its_source(converted, tmp_path, no_hang, name):  # noqa: F811
    _, fused = converted
    (fused / name).unlink()
    os.mkfifo(fused / name)
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, ["unfuse", str(fused), str(tmp_path / "back")])
    assert one_line_error(result) == f"{fused / name}: not a regular file"
    assert snapshot(tmp_path) == before


def test_unfuse_refuses_a_dst_lock_link(converted, tmp_path):
    _, fused = converted
    back = tmp_path / "back"
    beside(back, "lock").symlink_to(fused / "config.json")
    before = (fused / "config.json").read_bytes()
    result = CliRunner().invoke(cli, ["unfuse", str(fused), str(back)])
    assert one_line_error(result).startswith(f"{beside(back, 'lock')}: is a symbolic link where fusemoe-ckpt")
    assert (fused / "config.json").read_bytes() == before and not back.exists()


# --- 6. an index and a model.safetensors it does not name -------------------------------------------


def test_an_index_and_a_different_single_file_are_refused_naming_both(tmp_path):
    """transformers and accelerate load model.safetensors where both are, loaders that follow the index
    load its shards: which one is the model is not ours to guess."""
    src = qwen_source(tmp_path)
    save_file({"lm_head.weight": __import__("torch").zeros(2, 2)}, src / "model.safetensors")
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message == (
        f"{src}: holds both {INDEX} and a model.safetensors the index does not name: two weight sets, and "
        "loaders disagree on which is the model (transformers and accelerate load model.safetensors, loaders "
        "that follow the index its shards); remove the one that is not"
    )


def test_an_index_that_names_model_safetensors_itself_converts(tmp_path):
    """One shard named model.safetensors with an index beside it is one layout, not two."""
    src = qwen_source(tmp_path)
    reference = CliRunner().invoke(cli, ["convert", "-q", str(src), str(tmp_path / "reference")])
    assert reference.exit_code == 0
    single = tmp_path / "single"
    shutil.copytree(tmp_path / "reference", single)
    index = json.loads((single / INDEX).read_text())
    (single / "model-00001-of-00001.safetensors").rename(single / "model.safetensors")
    index["weight_map"] = dict.fromkeys(index["weight_map"], "model.safetensors")
    (single / INDEX).write_text(json.dumps(index))
    result = CliRunner().invoke(cli, ["convert", "-q", str(single), str(tmp_path / "again")])
    assert (result.exit_code, result.output) == (0, "")
    assert load_checkpoint(tmp_path / "again").keys() == load_checkpoint(tmp_path / "reference").keys()


def test_a_shard_name_is_still_checked_when_both_layouts_agree(tmp_path):
    """The layout check comes after the index is read: a missing shard is still named."""
    src = qwen_source(tmp_path)
    (src / SHARD_2).unlink()
    assert refuse(tmp_path, src, tmp_path / "dst") == f"{src / SHARD_2}: shard file not found"
