"""Hub in and out against tests/fake_hub.py: convert from a repo id, push, download the push back."""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from fusemoe_ckpt import UsageError, convert
from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.commands.example import write_example

from .fake_hub import FakeHub
from .test_disk_full import _can_mount_tmpfs

SOURCE_CARD = "---\nlicense: apache-2.0\ntags:\n- moe\n---\n\n# Tiny MoE\n\nThe source card's own text.\n"
# Files a real repo carries that convert must never download.
NOT_NEEDED = ["pytorch_model.bin", "model.gguf", "onnx/model.onnx", "consolidated.safetensors", "original/w.pth"]


def _hub_env(tmp_path: Path, endpoint: str) -> dict[str, str]:
    """What a user would export: huggingface_hub reads these itself."""
    return {
        "HF_ENDPOINT": endpoint,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-home" / "hub"),
        "HF_TOKEN": "hf_dummy_token",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1",  # the stand-in Hub takes LFS uploads, not Xet
    }


def _reload_hub_constants() -> None:
    """huggingface_hub reads its environment once, at import: read it again."""
    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)


@pytest.fixture
def set_hub_env(tmp_path, monkeypatch):
    """Sets the HF_* variables (and any extra) and makes huggingface_hub see them; undone after."""

    def apply(endpoint: str, **extra: str) -> None:
        for name, value in {**_hub_env(tmp_path, endpoint), **extra}.items():
            monkeypatch.setenv(name, value)
        _reload_hub_constants()

    yield apply
    monkeypatch.undo()
    _reload_hub_constants()


@pytest.fixture
def hub(set_hub_env):
    with FakeHub() as server:
        set_hub_env(server.url)
        yield server


@pytest.fixture
def source_repo(hub, tmp_path) -> str:
    """The built-in example as `org/tiny-moe`, with a card, a license and weights convert must skip."""
    folder = write_example(tmp_path / "repo")
    (folder / "README.md").write_text(SOURCE_CARD)
    (folder / "LICENSE").write_text("Apache License 2.0\n")
    (folder / "tokenizer_config.json").write_text("{}\n")
    (folder / "chat_template.jinja").write_text("{{ messages }}\n")
    for name in NOT_NEEDED:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"weights in another format")
    hub.add_repo("org/tiny-moe", folder)
    return "org/tiny-moe"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".cache" not in p.relative_to(root).parts
    }


def _metadata(root: Path) -> dict:
    return json.loads((root / "model.safetensors.index.json").read_text())["metadata"]


def test_convert_from_repo_id_push_and_download_back(hub, source_repo, tmp_path):
    dst = tmp_path / "fused"
    result = CliRunner().invoke(cli, ["convert", "-q", source_repo, str(dst), "--push-to-hub", "me/tiny-moe-fused"])
    assert result.exit_code == 0, result.output

    # Only what convert needs came down: never other weight formats or unreferenced safetensors.
    assert sorted(hub.fetched()) == sorted(
        [
            "LICENSE",
            "README.md",
            "chat_template.jinja",
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer_config.json",
        ]
    )
    # The same bytes as converting the repo's folder directly, and the repo and commit recorded.
    convert(tmp_path / "repo", tmp_path / "local")
    local, fused = _tree(tmp_path / "local"), _tree(dst)
    shards = [name for name in local if name.endswith(".safetensors")]
    assert shards and all(local[name] == fused[name] for name in shards)
    metadata = _metadata(dst)
    assert metadata["fusemoe_ckpt_source"] == source_repo
    assert metadata["fusemoe_ckpt_source_revision"] == hub.repos[source_repo].refs["main"]

    # What the Hub holds is DST, byte for byte, and so is a fresh download of it.
    pushed = hub.files("me/tiny-moe-fused")
    assert {name: data for name, data in pushed.items() if name != ".gitattributes"} == fused
    from huggingface_hub import snapshot_download

    again = Path(snapshot_download("me/tiny-moe-fused", cache_dir=tmp_path / "again"))
    assert {name: data for name, data in _tree(again).items() if name != ".gitattributes"} == fused
    # HF_TOKEN went with every request to the Hub (an LFS upload goes to the storage URL handed out).
    assert {auth for _, path, auth in hub.requests if not path.startswith("/lfs-")} == {"Bearer hf_dummy_token"}
    # The shards travelled as LFS uploads, not inside the commit.
    assert len([path for method, path, _ in hub.requests if method == "PUT"]) == len(shards)


def test_model_card_keeps_the_source_card_and_adds_provenance(hub, source_repo, tmp_path):
    dst = tmp_path / "fused"
    assert CliRunner().invoke(cli, ["convert", "-q", source_repo, str(dst)]).exit_code == 0
    for _ in range(2):  # a second push replaces the section rather than adding one
        result = CliRunner().invoke(cli, ["push", "-q", str(dst), "me/fused"])
        assert result.exit_code == 0, result.output
    from huggingface_hub import ModelCard

    text = hub.files("me/fused")["README.md"].decode()
    card = ModelCard(text)
    assert card.data.base_model == source_repo
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["moe", "fused-moe", "fusemoe-ckpt"]
    assert card.text.count("## Fused-expert checkpoint") == 1
    assert "the routed experts of 2 layers (8 experts in all) fused" in card.text
    assert "family rule `qwen2_moe`" in card.text
    assert 'snapshot_download("me/fused")' in card.text and "load_checkpoint_and_dispatch" in card.text
    # The source is a qwen3_moe: the card says, from rules/consumers.py, which engines read it wrong.
    assert "What each engine, at the version tested, does with a fused `qwen3_moe` checkpoint:" in card.text
    assert "> - **SGLang 0.5.23: Qwen3MoeForCausalLM.load_weights skips the fused expert names" in card.text
    assert card.text.rstrip().endswith("# Tiny MoE\n\nThe source card's own text.".rstrip())
    assert text == (dst / "README.md").read_text()


def test_a_local_source_without_a_card_gets_a_fresh_one(hub, tmp_path):
    write_example(tmp_path / "tiny")
    convert(tmp_path / "tiny", tmp_path / "fused")
    result = CliRunner().invoke(cli, ["push", str(tmp_path / "fused"), "me/fresh"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Pushed to {hub.url}/me/fresh (main at ")
    from huggingface_hub import ModelCard

    card = ModelCard(hub.files("me/fresh")["README.md"].decode())
    assert card.data.base_model is None  # a local source is no Hub repo to link
    assert card.data.tags == ["fused-moe", "fusemoe-ckpt"]
    assert card.data.library_name == "transformers"
    assert f"`{tmp_path / 'tiny'}`" in card.text


def test_push_to_a_branch_with_a_message_and_private(hub, tmp_path):
    write_example(tmp_path / "tiny")
    convert(tmp_path / "tiny", tmp_path / "fused")
    args = ["push", "-q", str(tmp_path / "fused"), "me/x", "--private", "--revision", "dev", "--commit-message", "M"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    repo = hub.repos["me/x"]
    assert repo.private
    assert repo.messages[repo.refs["dev"]] == "M"
    assert repo.refs["main"] != repo.refs["dev"]
    assert "model.safetensors.index.json" in hub.files("me/x", "dev")


def test_revision_selects_the_source_commit(hub, source_repo, tmp_path):
    first = hub.repos[source_repo].refs["main"]
    hub.repos[source_repo].commit("main", {}, "emptied")  # main moves on; the old commit stays
    result = CliRunner().invoke(cli, ["convert", "-q", source_repo, str(tmp_path / "out"), "--revision", first])
    assert result.exit_code == 0, result.output
    assert _metadata(tmp_path / "out")["fusemoe_ckpt_source_revision"] == first


def _one_line_error(result, exit_code: int = 1) -> str:
    """The last line of stderr, after any of huggingface_hub's progress bars, is the only error line."""
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert len(errors) == 1 and errors[0].startswith("Error: "), result.stderr
    assert result.stderr.endswith(errors[0] + "\n")
    return errors[0]


def test_missing_repo(hub, tmp_path):
    line = _one_line_error(CliRunner().invoke(cli, ["convert", "org/nothing-here", str(tmp_path / "out")]))
    assert line == (
        f"Error: org/nothing-here: no model repo of that name on {hub.url}, and no local directory either "
        "(a private repo needs HF_TOKEN with access)"
    )
    assert not (tmp_path / "out").exists()


def test_gated_repo(hub, tmp_path):
    write_example(tmp_path / "repo")
    hub.add_repo("org/gated", tmp_path / "repo", gated=True)
    line = _one_line_error(CliRunner().invoke(cli, ["convert", "org/gated", str(tmp_path / "out")]))
    assert line == (
        f"Error: org/gated: gated repo; request access at {hub.url}/org/gated, "
        "then set HF_TOKEN to a token of that account"
    )


def test_missing_revision(hub, source_repo, tmp_path):
    result = CliRunner().invoke(cli, ["convert", source_repo, str(tmp_path / "out"), "--revision", "v9"])
    assert _one_line_error(result) == "Error: org/tiny-moe@v9: the repo has no such branch, tag or commit"


def test_hub_down(set_hub_env, tmp_path):
    with FakeHub() as server:
        url = server.url  # a port that was just free, and is closed again below
    set_hub_env(url)
    line = _one_line_error(CliRunner().invoke(cli, ["convert", "org/tiny-moe", str(tmp_path / "out")]))
    assert line.startswith(f"Error: org/tiny-moe: cannot reach the Hub at {url} (ConnectError: ")
    assert line.endswith(f"and the cache {tmp_path / 'hf-home' / 'hub'} lacks it; check the network or HF_ENDPOINT")
    line = _one_line_error(CliRunner().invoke(cli, ["push", str(tmp_path), "me/x"]), exit_code=2)
    assert line.startswith(f"Error: {tmp_path}: no readable model.safetensors.index.json")
    write_example(tmp_path / "tiny")
    convert(tmp_path / "tiny", tmp_path / "fused")
    line = _one_line_error(CliRunner().invoke(cli, ["push", str(tmp_path / "fused"), "me/x"]))
    assert line.startswith(f"Error: me/x: cannot reach the Hub at {url} (ConnectError: ")


def test_offline_run_resolves_the_repo_id_from_the_cache(hub, source_repo, tmp_path):
    """A real process with HF_HUB_OFFLINE=1 and the Hub gone: the populated cache answers."""
    assert CliRunner().invoke(cli, ["convert", "-q", source_repo, str(tmp_path / "online")]).exit_code == 0
    env = {**os.environ, **_hub_env(tmp_path, "http://127.0.0.1:9"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    command = [sys.executable, "-m", "fusemoe_ckpt", "convert", "-q", source_repo, str(tmp_path / "offline")]
    subprocess.run(command, env=env, check=True, capture_output=True)
    assert _tree(tmp_path / "offline") == _tree(tmp_path / "online")

    missing = subprocess.run(
        [*command[:-2], "org/never-downloaded", str(tmp_path / "x")], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 1
    assert missing.stderr == (
        f"Error: org/never-downloaded: HF_HUB_OFFLINE is set and the cache {tmp_path / 'hf-home' / 'hub'} "
        "lacks it; download it once online, or unset HF_HUB_OFFLINE\n"
    )


def test_destination_problems_are_found_before_downloading(hub, source_repo, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    (tmp_path / ".left.fusemoe-partial").mkdir()
    for dst in ("full", "left"):
        result = CliRunner().invoke(cli, ["convert", "-q", source_repo, str(tmp_path / dst)])
        assert result.exit_code == 1 and "--overwrite" in result.stderr
    assert hub.requests == []


def test_a_second_convert_downloads_nothing_again(hub, source_repo, tmp_path):
    for name in ("one", "two"):
        assert CliRunner().invoke(cli, ["convert", "-q", source_repo, str(tmp_path / name)]).exit_code == 0
    assert len(hub.fetched()) == len(set(hub.fetched()))


def test_local_paths_win_over_repo_ids(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_example(tmp_path / "org" / "tiny-moe")
    result = CliRunner().invoke(cli, ["convert", "-q", "org/tiny-moe", "out"])
    assert result.exit_code == 0, result.output
    assert hub.requests == []
    assert _metadata(tmp_path / "out")["fusemoe_ckpt_source"] == "org/tiny-moe"


def test_revision_of_a_local_path_is_refused(tmp_path):
    write_example(tmp_path / "tiny")
    with pytest.raises(UsageError, match="a revision applies to a Hub repo id, and this is a local path"):
        convert(tmp_path / "tiny", tmp_path / "out", revision="main")


def test_private_needs_push_to_hub(tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(tmp_path), str(tmp_path / "out"), "--private"])
    assert result.exit_code == 2
    assert "--private applies to the repo --push-to-hub creates" in result.output


def test_push_refuses_a_folder_convert_did_not_write(hub, tmp_path):
    folder = write_example(tmp_path / "tiny")
    from fusemoe_ckpt import push_to_hub

    with pytest.raises(UsageError, match="not written by fusemoe-ckpt convert"):
        push_to_hub(folder, "me/x")
    assert hub.requests == []


def test_a_local_convert_never_imports_huggingface_hub(tmp_path):
    """huggingface_hub costs ~0.2 s and ~15 MB to import: only the Hub path pays for it."""
    write_example(tmp_path / "tiny")
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from fusemoe_ckpt.cli import cli\n"
        f"result = CliRunner().invoke(cli, ['convert', '-q', {str(tmp_path / 'tiny')!r}, {str(tmp_path / 'out')!r}])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert 'huggingface_hub' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", script], check=True, env=env)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_batch_converts_and_pushes_a_hub_entry_then_skips_it_without_downloading(hub, source_repo, tmp_path):
    """A repo id src in a manifest (entry processes reach the Hub through the same HF_* settings):
    converted and pushed once; a re-run skips it from the index metadata alone, fetching no source
    file again, and pushes again with nothing to change."""
    manifest = tmp_path / "zoo.jsonl"
    entry = {"src": source_repo, "dst": "out/tiny", "push_to_hub": "me/tiny-fused", "private": True}
    manifest.write_text(json.dumps(entry) + "\n")
    report = tmp_path / "report.json"
    result = CliRunner().invoke(cli, ["batch", str(manifest), "--report", str(report)])
    assert result.exit_code == 0, result.output
    (first,) = json.loads(report.read_text())["entries"]
    assert (first["status"], first["src"], first["dst"]) == ("converted", source_repo, str(tmp_path / "out" / "tiny"))
    assert first["pushed_to"].endswith("/me/tiny-fused")
    fused = _tree(tmp_path / "out" / "tiny")
    assert {name: data for name, data in hub.files("me/tiny-fused").items() if name != ".gitattributes"} == fused
    fetched = len(hub.fetched())

    result = CliRunner().invoke(cli, ["batch", str(manifest), "--report", str(report)])
    assert result.exit_code == 0, result.output
    (second,) = json.loads(report.read_text())["entries"]
    assert (second["status"], second["pushed_to"]) == ("skipped", first["pushed_to"])
    assert len(hub.fetched()) == fetched
    assert _tree(tmp_path / "out" / "tiny") == fused


# --- hostile sources on the Hub, a full cache, a finished DST ---------------------------------------


def test_a_repo_with_an_index_and_another_model_safetensors_is_refused_before_its_shards(hub, tmp_path):
    """transformers would load model.safetensors, convert the index's shards: refused, downloading no
    weights, as a local folder holding both is."""
    folder = write_example(tmp_path / "repo")
    (folder / "model.safetensors").write_bytes((folder / "model-00001-of-00002.safetensors").read_bytes())
    commit = hub.add_repo("org/both", folder)
    line = _one_line_error(CliRunner().invoke(cli, ["convert", "-q", "org/both", str(tmp_path / "out")]))
    assert line == (
        f"Error: org/both@{commit}: holds both model.safetensors.index.json and a model.safetensors the index "
        "does not name: two weight sets, and loaders disagree on which is the model (transformers and "
        "accelerate load model.safetensors, loaders that follow the index its shards); remove the one that is not"
    )
    assert not [name for name in hub.fetched() if name.endswith(".safetensors")]
    assert not (tmp_path / "out").exists()


def test_a_disk_that_fills_while_downloading_names_the_cache_and_the_space(hub, source_repo, tmp_path, monkeypatch):
    """A full disk mid-download used to print `OSError: [Errno 28] No space left on device`."""
    import errno

    import fusemoe_ckpt.hub.download as download_module

    real, calls = download_module.snapshot_download, []

    def fills_up(*args, **kwargs):
        calls.append(kwargs.get("allow_patterns"))
        if len(calls) == 2:  # the shards, after the index and the side files
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(download_module, "snapshot_download", fills_up)
    line = _one_line_error(CliRunner().invoke(cli, ["convert", "-q", source_repo, str(tmp_path / "out")]))
    needed = sum(len(data) for name, data in hub.files(source_repo).items() if name.startswith("model-"))
    cache = tmp_path / "hf-home" / "hub"
    assert re.fullmatch(
        rf"Error: {re.escape(str(cache))}: cannot download the shards of {source_repo}: No space left on device "
        rf"\(ENOSPC\); they need [\d.]+ KB \({needed} bytes\) and [\d.]+ [KMGT]?B \(\d+ bytes\) is free; "
        r"free space there, or set HF_HUB_CACHE to a disk with room",
        line,
    ), line
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user and mount namespaces to mount tmpfs")
def test_a_cache_without_room_for_the_shards_is_refused_before_downloading_them(hub, tmp_path):
    """A real 64 KiB tmpfs as the cache: the index and side files fit, the shards would not; refused
    before any shard is fetched, naming the cache and the space needed."""
    import torch
    from safetensors.torch import save_file

    folder = write_example(tmp_path / "repo")
    save_file({"lm_head.weight": torch.zeros(256, 512)}, folder / "model-00002-of-00002.safetensors")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != "model-00002-of-00002.safetensors"}
    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    hub.add_repo("org/big", folder)
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, **_hub_env(tmp_path, hub.url), "HF_HUB_CACHE": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    script = 'mount -t tmpfs -o size=64k tmpfs "$1" || exit 99; shift; exec "$@"'
    command = [sys.executable, "-m", "fusemoe_ckpt", "convert", "-q", "org/big", str(tmp_path / "out")]
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(cache), *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    needed = sum(len(data) for name, data in hub.files("org/big").items() if name.startswith("model-"))
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(
        rf"Error: {re.escape(str(cache))}: cannot download the shards of org/big: they need [\d.]+ KB "
        rf"\({needed} bytes\) and [\d.]+ KB \(\d+ bytes\) is free; free space there, or set HF_HUB_CACHE to a "
        r"disk with room\n",
        result.stderr.splitlines(keepends=True)[-1],
    ), result.stderr
    assert not [name for name in hub.fetched() if name.endswith(".safetensors")]
    assert not (tmp_path / "out").exists()


def test_resume_of_a_finished_hub_conversion_says_complete(hub, source_repo, tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(cli, ["convert", "-q", source_repo, str(out)]).exit_code == 0
    before = _tree(out)
    again = runner.invoke(cli, ["convert", source_repo, str(out), "--resume"])
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith(f"already complete: {out} holds this conversion")
    assert _tree(out) == before
    refused = runner.invoke(cli, ["convert", "-q", source_repo, str(out)])
    assert _one_line_error(refused) == (
        f"Error: {out}: exists and is not empty: it already holds this conversion of {source_repo}; "
        "pass --resume to accept it as complete, or --overwrite to convert again"
    )
