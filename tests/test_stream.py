"""`convert REPO DST --stream` (and `--push-to-hub`) against the stand-in Hub: source shards fetched
one at a time beside DST and dropped when used, the result byte for byte a local convert's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusemoe_ckpt import convert
from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.plan.conversion import plan_for

from .conftest import PAUSE_LAUNCHER
from .stream_models import OUTPUT_SHARD, write_stream_repo
from .test_batch import wait_for
from .test_disk_full import _can_mount_tmpfs
from .test_hub import _one_line_error, _tree, hub, set_hub_env  # noqa: F401 - fixtures

REPO = "org/stream-moe"


@pytest.fixture
def stream_repo(hub, tmp_path) -> Path:  # noqa: F811 - the fixture imported above
    folder = write_stream_repo(tmp_path / "repo")
    hub.add_repo(REPO, folder)
    return folder


@pytest.fixture
def local(stream_repo, tmp_path) -> dict[str, bytes]:
    """What a local convert of the repo's folder writes."""
    convert(stream_repo, tmp_path / "local", max_shard_size=OUTPUT_SHARD)
    return _tree(tmp_path / "local")


def _stream(dst: Path, *options: str):
    return CliRunner().invoke(
        cli, ["convert", "-q", REPO, str(dst), "--stream", "--max-shard-size", OUTPUT_SHARD, *options]
    )


def _weights(tree: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in tree.items() if name.endswith(".safetensors")}


def test_stream_equals_a_local_convert_and_fetches_every_byte_once(hub, stream_repo, local, tmp_path):  # noqa: F811
    dst = tmp_path / "fused"
    result = _stream(dst)
    assert result.exit_code == 0, result.output
    fused = _tree(dst)
    assert _weights(fused) == _weights(local) and len(_weights(local)) > 2
    assert set(fused) == set(local)
    # Every byte of every file came down once: shard headers by range, the rest by the download.
    sizes = {name: len(data) for name, data in hub.files(REPO).items()}
    assert hub.bytes_served() == sizes
    # Nothing went into the HF cache, and nothing is left beside DST.
    assert not (tmp_path / "hf-home" / "hub").exists() or not any((tmp_path / "hf-home" / "hub").rglob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def _allocated(folder: Path) -> int:
    """Bytes of disk the files under `folder` take (holes of a placeholder take none)."""
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def test_at_most_the_sources_a_layer_spans_are_on_disk(hub, stream_repo, tmp_path, monkeypatch):  # noqa: F811
    """Each layer's experts span two source shards; while an output shard is written, only the
    source shards it reads are on disk, and none that an earlier shard alone read."""
    import fusemoe_ckpt.write.output as output_module

    scratch = tmp_path / ".fused.fusemoe-sources"
    seen: list[tuple[str, list[str], int]] = []
    real = output_module.write_shard

    def measured(path, shard, **kwargs):
        # Downloaded: the file holds the shard's bytes (a placeholder holds its header, then holes).
        present = sorted(
            p.name for p in scratch.glob("*.safetensors") if p.read_bytes() == (stream_repo / p.name).read_bytes()
        )
        seen.append((shard.filename, present, _allocated(scratch)))
        return real(path, shard, **kwargs)

    monkeypatch.setattr(output_module, "write_shard", measured)
    assert _stream(tmp_path / "fused").exit_code == 0
    largest = max(p.stat().st_size for p in stream_repo.glob("*.safetensors"))
    assert all(len(present) <= 2 for _, present, _ in seen), seen
    assert max(allocated for _, _, allocated in seen) <= 2 * largest + 64 * 1024, seen
    # Exactly the source shards each output shard reads are on disk while it is written: those
    # holding the tensors it is made of, as a plan of the repo's own folder says.
    _, plan = plan_for(stream_repo, max_shard_size=OUTPUT_SHARD)
    reads = [sorted({p.file.name for t in shard.tensors for p in t.pieces}) for shard in plan.shards]
    assert [present for _, present, _ in seen] == reads
    # A layer's experts span two source shards, so some output shard needs two at once.
    assert max(len(files) for files in reads) == 2


def test_stream_and_push_commits_once_with_every_shard_preuploaded(hub, stream_repo, local, tmp_path):  # noqa: F811
    dst = tmp_path / "fused"
    commits_before = dict(hub.repos)
    result = _stream(dst, "--push-to-hub", "me/stream-fused")
    assert result.exit_code == 0, result.output
    repo = hub.repos["me/stream-fused"]
    assert "me/stream-fused" not in commits_before
    # Two commits: the empty repo's first, and the one that adds everything.
    assert len(repo.commits) == 2
    pushed = hub.files("me/stream-fused")
    assert _weights(pushed) == _weights(local)
    # Each shard travelled once, as an LFS upload, never inside the commit.
    puts = [path for method, path, _ in hub.requests if method == "PUT"]
    assert len(puts) == len(_weights(local))
    # DST keeps the small files, the card and the record of the upload; no shard.
    kept = _tree(dst)
    assert not _weights(kept)
    assert {"config.json", "tokenizer_config.json", "README.md", "model.safetensors.index.json"} <= set(kept)
    assert ".fusemoe-pushed" in kept
    # The card keeps the source's text and says what was fused, as a push of a local DST does.
    card = pushed["README.md"].decode()
    assert "## Fused-expert checkpoint" in card and "# Stream MoE" in card and f"base_model: {REPO}" in card
    assert {name: pushed[name] for name in kept if not name.startswith(".")} == {
        name: data for name, data in kept.items() if not name.startswith(".")
    }


def _paused_run(tmp_path: Path, point: str, dst: Path, *options: str) -> subprocess.Popen:
    """A --stream convert in a process of its own, paused at `point` (see tests/pause_launcher.py)."""
    flag = tmp_path / "paused"
    command = [sys.executable, PAUSE_LAUNCHER, f"{point}:{flag}", "cli", "convert", "-q", REPO, str(dst)]
    process = subprocess.Popen(
        [*command, "--stream", "--max-shard-size", OUTPUT_SHARD, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(flag, process)
    return process


@pytest.mark.parametrize(
    ("signum", "point"), [(signal.SIGKILL, "shard-done:3"), (signal.SIGTERM, "shard-done:2")], ids=["kill-9", "SIGTERM"]
)
def test_resume_after_a_kill_downloads_nothing_twice(hub, stream_repo, local, tmp_path, signum, point):  # noqa: F811
    """Killed once the second or third shard is journaled: by then the first source shard was
    used up and dropped, the next ones downloaded or not."""
    dst = tmp_path / "fused"
    process = _paused_run(tmp_path, point, dst)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == (-9 if signum == signal.SIGKILL else 143), stderr
    assert not dst.exists()
    first_run = hub.bytes_served()
    assert sum(first_run.values()) < sum(len(d) for d in hub.files(REPO).values())

    result = _stream(dst, "--resume")
    assert result.exit_code == 0, result.output
    assert _weights(_tree(dst)) == _weights(local)
    # Across both runs every byte came down once: the sources the two written shards alone read
    # were not fetched again, nor the one downloaded for the third.
    assert hub.bytes_served() == {name: len(data) for name, data in hub.files(REPO).items()}
    assert not (tmp_path / ".fused.fusemoe-sources").exists()
    assert not (tmp_path / ".fused.fusemoe-partial").exists()


def test_resume_of_a_push_uploads_no_shard_twice(hub, stream_repo, local, tmp_path):  # noqa: F811
    dst = tmp_path / "fused"
    # Killed after the second shard is written and journaled, before its upload.
    process = _paused_run(tmp_path, "shard-done:2", dst, "--push-to-hub", "me/stream-fused")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    repo = hub.repos["me/stream-fused"]
    # Nothing on the Hub looks complete: the repo holds only its first, empty commit.
    assert len(repo.commits) == 1 and set(hub.files("me/stream-fused")) == {".gitattributes"}
    assert len([1 for method, _, _ in hub.requests if method == "PUT"]) == 1

    result = _stream(dst, "--resume", "--push-to-hub", "me/stream-fused")
    assert result.exit_code == 0, result.output
    assert _weights(hub.files("me/stream-fused")) == _weights(local)
    assert len(repo.commits) == 2
    # Each shard uploaded once across both runs: the first not again, the second after the resume.
    assert len([1 for method, _, _ in hub.requests if method == "PUT"]) == len(_weights(local))
    assert hub.bytes_served() == {name: len(data) for name, data in hub.files(REPO).items()}


# Mounts a tmpfs of $1 at $2 in a private namespace, runs the rest with HF_HOME on it, copies DST out
# to $OUT when there is one, and lists what is left on the tmpfs on stderr after a marker line.
ON_TMPFS = """
mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99
mount="$2"; shift 2
export HF_HOME="$mount/hf-home" HF_HUB_CACHE="$mount/hf-home/hub"
"$@"; code=$?
[ -d "$mount/dst" ] && cp -r "$mount/dst" "$OUT"
echo "--- left:" >&2; (cd "$mount" && find . -name '*.safetensors' -o -name '.*fusemoe*' | sort) >&2
exit $code
"""


SIZE = r"[\d.]+ [KM]B \(\d+ bytes\)"
NO_ROOM = rf"Error: {{path}}: the conversion needs {SIZE} but only {SIZE} is free\n"


def _on_tmpfs(tmp_path: Path, size: str, *options: str) -> subprocess.CompletedProcess:
    mount = tmp_path / "small"
    mount.mkdir(exist_ok=True)
    command = [sys.executable, "-m", "fusemoe_ckpt", "convert", "-q", REPO, str(mount / "dst")]
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", ON_TMPFS, "sh", size, str(mount)]
        + [*command, "--max-shard-size", OUTPUT_SHARD, *options],
        env=os.environ | {"OUT": str(tmp_path / "out"), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces to mount tmpfs")
def test_stream_fits_a_disk_a_cached_convert_cannot(hub, stream_repo, local, tmp_path):  # noqa: F811
    """HF cache, scratch and DST on a tmpfs of 6.5 output shards: the model twice (cache and DST)
    does not fit, DST plus the two source shards a layer spans does."""
    size = str(13 * 200_000 // 2)
    cached = _on_tmpfs(tmp_path, size)
    assert cached.returncode == 1, cached.stderr
    error, left = cached.stderr.split("--- left:\n")
    assert error.startswith("Error: ") and error.count("\n") == 1, error
    # The source came down into the cache; DST then has no room beside it.
    assert re.fullmatch(NO_ROOM.format(path=re.escape(str(tmp_path / "small"))), error), error
    assert left.splitlines() == [
        f"./hf-home/hub/models--org--stream-moe/snapshots/{hub.repos[REPO].refs['main']}/{n}"
        for n in sorted(n for n in hub.files(REPO) if n.endswith(".safetensors"))
    ]

    streamed = _on_tmpfs(tmp_path, size, "--stream")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stderr.split("--- left:\n")[1].splitlines() == [f"./dst/{n}" for n in sorted(_weights(local))]
    assert _weights(_tree(tmp_path / "out")) == _weights(local)


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces to mount tmpfs")
def test_stream_push_fits_less_than_the_model(hub, stream_repo, local, tmp_path):  # noqa: F811
    """With --push-to-hub, 3.5 shards of disk suffice for a model of five: two sources and the
    output shard being written."""
    result = _on_tmpfs(tmp_path, str(7 * 200_000 // 2), "--stream", "--push-to-hub", "me/stream-fused")
    assert result.returncode == 0, result.stderr
    assert result.stderr.split("--- left:\n")[1].splitlines() == ["./dst/.fusemoe-pushed"]
    assert _weights(hub.files("me/stream-fused")) == _weights(local)


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces to mount tmpfs")
def test_no_room_for_one_shard_names_the_path_and_the_space(hub, stream_repo, tmp_path):  # noqa: F811
    result = _on_tmpfs(tmp_path, "150k", "--stream")
    assert result.returncode == 1, result.stderr
    error, left = result.stderr.split("--- left:\n")
    mount = tmp_path / "small"
    assert re.fullmatch(NO_ROOM.format(path=re.escape(str(mount))), error), error
    assert not left.strip()


def _nothing_left(tmp_path: Path) -> None:
    """Nothing at DST, no partial output and no downloads beside it."""
    assert sorted(p.name for p in tmp_path.iterdir() if "fused" in p.name) == []


def test_a_repo_without_safetensors(hub, tmp_path):  # noqa: F811
    folder = tmp_path / "bin-only"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (folder / "pytorch_model.bin").write_bytes(b"pickled weights")
    commit = hub.add_repo("org/bin-only", folder)
    result = CliRunner().invoke(cli, ["convert", "-q", "org/bin-only", str(tmp_path / "fused"), "--stream"])
    assert _one_line_error(result) == (
        f"Error: org/bin-only@{commit[:12]}: holds no model.safetensors.index.json or model.safetensors: "
        "no safetensors weights to convert"
    )
    _nothing_left(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_bad_download_fails_and_pushes_nothing(hub, stream_repo, tmp_path, damage):  # noqa: F811
    name = "model-00003-of-00004.safetensors"
    data = hub.files(REPO)[name]
    commit = hub.repos[REPO].refs["main"]
    if damage == "truncated":
        hub.serve_instead[name] = data[:-1000]
        message = f"download truncated: {len(data) - 1000} of {len(data)} bytes"
    else:
        hub.serve_instead[name] = data[:-1] + bytes([data[-1] ^ 1])
        bad = hashlib.sha256(hub.serve_instead[name]).hexdigest()
        message = f"downloaded bytes hash to {bad}, the Hub lists {hashlib.sha256(data).hexdigest()}"
    result = _stream(tmp_path / "fused", "--push-to-hub", "me/stream-fused")
    assert _one_line_error(result) == f"Error: {REPO}@{commit[:12]}/{name}: {message}"
    _nothing_left(tmp_path)
    # Shards were pre-uploaded, but no commit names them: the repo shows nothing of the conversion.
    assert len(hub.repos["me/stream-fused"].commits) == 1
    assert set(hub.files("me/stream-fused")) == {".gitattributes"}


def test_the_run_reads_the_commit_it_started_from(hub, stream_repo, local, tmp_path):  # noqa: F811
    """main moves on while the shards download: every file still comes from the pinned commit."""
    first = hub.repos[REPO].refs["main"]

    def move_main(method: str, path: str) -> None:
        if (
            method == "GET"
            and path.endswith("model-00002-of-00004.safetensors")
            and hub.repos[REPO].refs["main"] == first
        ):
            emptied = {name: b"" for name in hub.files(REPO)}
            hub.repos[REPO].commit("main", emptied, "rewrite every file")

    hub.on_request = move_main
    result = _stream(tmp_path / "fused")
    assert result.exit_code == 0, result.output
    assert hub.repos[REPO].refs["main"] != first
    assert _weights(_tree(tmp_path / "fused")) == _weights(local)
    index = json.loads((tmp_path / "fused" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["fusemoe_ckpt_source_revision"] == first


def test_the_pinned_commit_gone_mid_run(hub, stream_repo, tmp_path):  # noqa: F811
    """A force-push that drops the commit the run started from: one line naming it, nothing left."""
    first = hub.repos[REPO].refs["main"]

    def rewrite_history(method: str, path: str) -> None:
        if method == "GET" and path.endswith("model-00002-of-00004.safetensors") and first in hub.repos[REPO].commits:
            files = hub.repos[REPO].commits.pop(first)
            hub.repos[REPO].refs["main"] = ""
            hub.repos[REPO].commit("main", files, "force-pushed")

    hub.on_request = rewrite_history
    result = _stream(tmp_path / "fused")
    assert _one_line_error(result) == f"Error: {REPO}@{first}: the repo has no such branch, tag or commit"
    _nothing_left(tmp_path)


def test_a_finished_stream_run_again(hub, stream_repo, tmp_path):  # noqa: F811
    """Run again by a scheduler: --resume reports it complete, without --resume it is refused."""
    dst = tmp_path / "fused"
    assert _stream(dst).exit_code == 0
    before = _tree(dst)
    again = CliRunner().invoke(
        cli, ["convert", REPO, str(dst), "--stream", "--max-shard-size", OUTPUT_SHARD, "--resume"]
    )
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(f"already complete: {dst} holds this conversion (5 shards, ")
    assert _tree(dst) == before
    assert _one_line_error(_stream(dst)) == (
        f"Error: {dst}: exists and is not empty: it already holds this conversion of {REPO}; "
        "pass --resume to accept it as complete, or --overwrite to convert again"
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fused")] == []


def _uploads(hub) -> list[tuple[str, str]]:  # noqa: F811 - the fixture's object
    """Every request that sends the Hub something: LFS uploads, preuploads, commits, repo creation."""
    return [(method, path) for method, path, _ in hub.requests if method in ("PUT", "POST")]


def _record(dst: Path) -> list[dict]:
    return [json.loads(line) for line in (dst / ".fusemoe-pushed").read_text().splitlines()]


def test_a_finished_stream_push_run_again(hub, stream_repo, local, tmp_path):  # noqa: F811
    """DST keeps no shard, only the small files and the record: the record naming every shard of the
    index and the final commit makes --resume report it complete, uploading and committing nothing."""
    dst = tmp_path / "fused"
    assert _stream(dst, "--push-to-hub", "me/stream-fused").exit_code == 0
    repo = hub.repos["me/stream-fused"]
    record = _record(dst)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert record[0] == {"repo": "me/stream-fused"}
    assert {line["shard"]: line["size"] for line in record[1:-1]} == {
        name: len(data) for name, data in _weights(local).items()
    }
    assert set(index["weight_map"].values()) == set(_weights(local))
    # The commit is recorded last, once it was made: the one the repo's main now points at.
    assert record[-1] == {"commit": repo.refs["main"], "url": f"{hub.url}/me/stream-fused"}
    before, commits, sent = _tree(dst), len(repo.commits), len(_uploads(hub))

    again = CliRunner().invoke(
        cli,
        [
            "convert",
            REPO,
            str(dst),
            "--stream",
            "--max-shard-size",
            OUTPUT_SHARD,
            "--resume",
            "--push-to-hub",
            "me/stream-fused",
        ],
    )
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(
        f"already complete: {dst} records this conversion pushed to {hub.url}/me/stream-fused "
        f"(commit {repo.refs['main'][:8]}, 5 shards, "
    ), again.stdout
    assert len(_uploads(hub)) == sent and len(repo.commits) == commits
    assert _tree(dst) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fused")] == []
    # Without --resume, it is refused as this conversion; pushed to another repo, as something else.
    assert _one_line_error(_stream(dst, "--push-to-hub", "me/stream-fused")) == (
        f"Error: {dst}: exists and is not empty: it already holds this conversion of {REPO}; "
        "pass --resume to accept it as complete, or --overwrite to convert again"
    )
    other = f"Error: {dst}: exists and is not empty; pass --overwrite to replace it"
    assert _one_line_error(_stream(dst, "--resume", "--push-to-hub", "me/elsewhere")) == other
    # A record without the commit proves nothing: the push may never have been made.
    lines = (dst / ".fusemoe-pushed").read_text().splitlines()
    (dst / ".fusemoe-pushed").write_text("\n".join(lines[:-1]) + "\n")
    assert _one_line_error(_stream(dst, "--resume", "--push-to-hub", "me/stream-fused")) == other
    # Nor does one that lacks a shard of the index.
    (dst / ".fusemoe-pushed").write_text("\n".join(lines[:2] + lines[3:]) + "\n")
    assert _one_line_error(_stream(dst, "--resume", "--push-to-hub", "me/stream-fused")) == other
    assert len(_uploads(hub)) == sent and len(repo.commits) == commits


def test_a_push_killed_after_its_commit_does_not_commit_again(hub, stream_repo, local, tmp_path):  # noqa: F811
    """Killed after the final commit, before the rename into place: the record holds the commit, so
    --resume installs DST without uploading or committing again."""
    dst = tmp_path / "fused"
    process = _paused_run(tmp_path, "install:1", dst, "--push-to-hub", "me/stream-fused")
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    repo = hub.repos["me/stream-fused"]
    assert len(repo.commits) == 2 and _weights(hub.files("me/stream-fused")) == _weights(local)
    assert not dst.exists()
    assert _record(tmp_path / ".fused.fusemoe-partial")[-1]["commit"] == repo.refs["main"]
    sent = len(_uploads(hub))

    result = _stream(dst, "--resume", "--push-to-hub", "me/stream-fused")
    assert result.exit_code == 0, result.output
    assert len(repo.commits) == 2
    # Only create_repo (exist_ok) was asked again; no preupload, no LFS transfer, no commit.
    assert [path for _, path in _uploads(hub)[sent:]] == ["/api/repos/create"]
    assert _record(dst)[-1]["commit"] == repo.refs["main"]
    assert not _weights(_tree(dst)) and not (tmp_path / ".fused.fusemoe-partial").exists()
    # DST's small files, the model card among them, are those the commit holds.
    pushed, kept = hub.files("me/stream-fused"), _tree(dst)
    assert {name: data for name, data in kept.items() if not name.startswith(".")} == {
        name: pushed[name] for name in kept if not name.startswith(".")
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stream", "--verify"], "--verify reads the source, which --stream deletes as it goes"),
        (["--private"], "--private applies to the repo --push-to-hub creates"),
    ],
)
def test_usage_errors(hub, stream_repo, tmp_path, args, message):  # noqa: F811
    result = CliRunner().invoke(cli, ["convert", REPO, str(tmp_path / "fused"), *args])
    assert result.exit_code == 2 and message in result.stderr, result.output


def test_stream_of_a_local_folder_is_refused(stream_repo, tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(stream_repo), str(tmp_path / "fused"), "--stream"])
    assert _one_line_error(result, exit_code=2) == f"Error: {stream_repo}: --stream applies to a Hub repo id SRC"


def test_a_refused_upload_fails_and_commits_nothing(hub, stream_repo, tmp_path):  # noqa: F811
    hub.refuse_uploads = "storage quota exceeded"
    result = _stream(tmp_path / "fused", "--push-to-hub", "me/stream-fused")
    line = _one_line_error(result)
    assert line.startswith("Error: me/stream-fused: cannot upload model-00001-of-00005.safetensors: "), line
    assert "403" in line, line
    assert len(hub.repos["me/stream-fused"].commits) == 1
    _nothing_left(tmp_path)


def test_a_disk_that_fills_while_downloading_names_the_download(hub, stream_repo, tmp_path, monkeypatch):  # noqa: F811
    """The free space dropping after the run's own check: the download is refused before its bytes
    come, naming the file and the space it needs."""
    import fusemoe_ckpt.hub.fetch as fetch_module

    real = fetch_module.shutil.disk_usage
    scratch = tmp_path / ".fused.fusemoe-sources"

    def shrinking(path):
        usage = real(path)
        return usage._replace(free=50_000) if Path(path).is_relative_to(scratch) else usage

    monkeypatch.setattr(fetch_module.shutil, "disk_usage", shrinking)
    result = _stream(tmp_path / "fused")
    name = "model-00001-of-00004.safetensors"
    size = len(hub.files(REPO)[name])
    line = _one_line_error(result)
    assert re.fullmatch(
        rf"Error: {re.escape(str(scratch / ('.' + name + '.part')))}: cannot download: \S+ KB \((\d+) bytes\) more are "
        r"needed and 50.00 KB \(50000 bytes\) is free; free space there or convert to a disk with room",
        line,
    ), line
    assert int(re.search(r"\((\d+) bytes\) more", line)[1]) < size
    _nothing_left(tmp_path)


def test_a_batch_streams_and_pushes_then_skips_without_a_request(hub, stream_repo, local, tmp_path):  # noqa: F811
    """A manifest with a streamed entry and a streamed, pushed one: each equals a local convert byte
    for byte; run again, both are skipped from DST alone, without a single request to the Hub."""
    manifest = tmp_path / "zoo.jsonl"
    entries = [
        {"src": REPO, "dst": "out/streamed", "stream": True, "max_shard_size": OUTPUT_SHARD},
        {"src": REPO, "dst": "out/pushed", "stream": True, "max_shard_size": OUTPUT_SHARD, "push_to_hub": "me/zoo"},
    ]
    manifest.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    report = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["batch", str(manifest), "--report", str(report)])
    assert result.exit_code == 0, result.output
    streamed, pushed = json.loads(report.read_text())["entries"]
    assert (streamed["status"], pushed["status"]) == ("converted", "converted")
    assert (streamed["pushed_to"], pushed["pushed_to"]) == (None, f"{hub.url}/me/zoo")
    out = tmp_path / "out"
    assert _weights(_tree(out / "streamed")) == _weights(local) and set(_tree(out / "streamed")) == set(local)
    assert _weights(hub.files("me/zoo")) == _weights(local)
    assert not _weights(_tree(out / "pushed")) and ".fusemoe-pushed" in _tree(out / "pushed")
    # Streamed, not through the HF cache: each entry fetched every source byte once.
    sizes = {name: 2 * len(data) for name, data in hub.files(REPO).items()}
    assert hub.bytes_served() == sizes
    assert not any((tmp_path / "hf-home").rglob("*.safetensors"))
    # Pushed as it converted: one commit after the empty repo's, no separate push.
    assert len(hub.repos["me/zoo"].commits) == 2
    trees, requests = {name: _tree(out / name) for name in ("streamed", "pushed")}, len(hub.requests)

    again = CliRunner().invoke(cli, ["batch", str(manifest), "--report", str(report)])
    assert again.exit_code == 0, again.output
    streamed, pushed = json.loads(report.read_text())["entries"]
    assert (streamed["status"], pushed["status"]) == ("skipped", "skipped")
    assert pushed["pushed_to"] == f"{hub.url}/me/zoo"
    assert hub.requests[requests:] == []
    assert {name: _tree(out / name) for name in ("streamed", "pushed")} == trees
    assert sorted(p.name for p in out.iterdir()) == ["pushed", "streamed"]


def test_a_batch_resumes_a_streamed_push_killed_mid_run(hub, stream_repo, local, tmp_path):  # noqa: F811
    """An entry's process killed after its second shard: the next batch resumes it, uploading no
    shard twice and fetching no byte twice."""
    manifest = tmp_path / "zoo.jsonl"
    entry = {"src": REPO, "dst": "out/pushed", "stream": True, "max_shard_size": OUTPUT_SHARD, "push_to_hub": "me/zoo"}
    manifest.write_text(json.dumps(entry) + "\n")
    flag = tmp_path / "paused"
    command = [sys.executable, PAUSE_LAUNCHER, f"shard-done:3:{flag}", "cli", "batch", str(manifest)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(flag, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert len(hub.repos["me/zoo"].commits) == 1

    result = CliRunner().invoke(cli, ["batch", str(manifest)])
    assert result.exit_code == 0, result.output
    assert _weights(hub.files("me/zoo")) == _weights(local)
    assert len([1 for method, _, _ in hub.requests if method == "PUT"]) == len(_weights(local))
    assert hub.bytes_served() == {name: len(data) for name, data in hub.files(REPO).items()}
