"""The command line: help, the families list, the example, convert's output."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fusemoe_ckpt import FAMILIES, __version__
from fusemoe_ckpt.cli import cli

from .conftest import load_checkpoint
from .test_bad_input import one_line_error


def _commands() -> list[str]:
    return sorted(cli.commands)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert cli.commands[command].help and cli.commands[command].help.split("\n")[0] in result.output


def test_version_is_the_installed_metadata():
    # version.py reads METADATA itself, to spare start-up importlib.metadata: the two must agree.
    from importlib.metadata import version

    assert __version__ == version("fusemoe-ckpt")
    assert CliRunner().invoke(cli, ["--version"]).output == f"fusemoe-ckpt, version {version('fusemoe-ckpt')}\n"


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_version_imports_no_command():
    """`--version` loads the command line and the version alone: no command's modules, no json."""
    code = (
        "import sys; from fusemoe_ckpt.cli import main; sys.argv = ['fusemoe-ckpt', '--version']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "names = ['importlib.metadata', 'json', 'dataclasses', 'fusemoe_ckpt.batch.cluster', 'fusemoe_ckpt.commands']\n"
        "imported = [name for name in names if name in sys.modules]\n"
        "assert not imported, f'imported: {imported}'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout == f"fusemoe-ckpt, version {__version__}\n"


def test_families_lists_every_family_with_patterns():
    output = CliRunner().invoke(cli, ["families"]).output
    for family in FAMILIES:
        assert re.search(rf"^{re.escape(family.name)}$", output, re.MULTILINE)
        for pattern in family.source_patterns:
            assert pattern in output
        for model_type in family.model_types:
            assert model_type in output


def test_convert_prints_a_summary(qwen_checkpoint, tmp_path):
    result = CliRunner().invoke(cli, ["convert", str(qwen_checkpoint), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(
        r"2 layers fused, 8 experts, [\d.]+ KB written in 1 shards, [\d.]+ s, [\d.]+ GB/s -> .*/out\n",
        result.output,
    )


def test_convert_quiet_prints_nothing(qwen_checkpoint, tmp_path):
    result = CliRunner().invoke(cli, ["convert", "-q", str(qwen_checkpoint), str(tmp_path / "out")])
    assert (result.exit_code, result.output) == (0, "")


def test_nothing_to_fuse_says_so(qwen_checkpoint, tmp_path):
    CliRunner().invoke(cli, ["convert", "-q", str(qwen_checkpoint), str(tmp_path / "once")])
    result = CliRunner().invoke(cli, ["convert", str(tmp_path / "once"), str(tmp_path / "twice")])
    assert result.exit_code == 0
    assert result.output.startswith("Nothing to fuse: no per-expert tensors for family qwen2_moe; copied through.\n")


def test_auto_map_config_warns(qwen_checkpoint, tmp_path):
    config = qwen_checkpoint / "config.json"
    config.write_text(config.read_text()[:-1] + ', "auto_map": {"AutoModel": "modeling.Model"}}')
    result = CliRunner().invoke(cli, ["convert", "-q", str(qwen_checkpoint), str(tmp_path / "out")])
    assert result.exit_code == 0
    assert "Warning: " in result.stderr and "auto_map" in result.stderr


def test_family_option_overrides_config(qwen_checkpoint, tmp_path):
    config = qwen_checkpoint / "config.json"
    config.write_text('{"model_type": "some_new_moe"}')
    result = CliRunner().invoke(
        cli, ["convert", "-q", "--family", "qwen2_moe", str(qwen_checkpoint), str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_checkpoint(tmp_path / "out")
    assert result.stderr == (
        "Warning: --family qwen2_moe overrides config.json's model_type 'some_new_moe' (no family rule); "
        "check the result against the model with `fusemoe-ckpt verify --load-check SRC DST`\n"
    )


def test_family_that_config_json_names_anyway_gives_no_warning(qwen_checkpoint, tmp_path):
    result = CliRunner().invoke(
        cli, ["convert", "-q", "--family", "qwen2_moe", str(qwen_checkpoint), str(tmp_path / "out")]
    )
    assert (result.exit_code, result.stderr) == (0, "")


def test_forcing_a_sub_model_family_on_a_whole_model_warns(qwen_checkpoint, tmp_path):
    """dots3_note's text experts match qwen2_moe, whose rule lacks the whole model's renames: forcing it
    converts with a warning that says how to check the result against the model."""
    (qwen_checkpoint / "config.json").write_text('{"model_type": "dots3_note"}')
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", "-q", "--family", "qwen2_moe", str(qwen_checkpoint), str(out)])
    assert result.exit_code == 0
    assert result.stderr == (
        "Warning: --family qwen2_moe overrides config.json's model_type 'dots3_note' (family dots3_note); "
        "check the result against the model with `fusemoe-ckpt verify --load-check SRC DST`\n"
    )


def test_example_converts(tmp_path):
    runner = CliRunner()
    assert runner.invoke(cli, ["example", str(tmp_path / "tiny")]).exit_code == 0
    result = runner.invoke(cli, ["convert", str(tmp_path / "tiny"), str(tmp_path / "fused")])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("2 layers fused, 8 experts")


def test_python_dash_m_runs():
    result = subprocess.run(
        [sys.executable, "-m", "fusemoe_ckpt", "--version"], capture_output=True, text=True, check=True
    )
    assert __version__ in result.stdout


def test_families_lists_scoped_rules_where_they_apply_and_refuses_none():
    output = CliRunner().invoke(cli, ["families"]).output
    assert (
        "  ExpertMerge (under model.vision_tower.): .mlp.experts.*.fc1.weight + .mlp.experts.*.fc3.weight "
        "-> .mlp.experts.gate_up_proj\n"
    ) in output
    assert "  Transpose: \\.mixer\\.experts\\.down_projs -> \\.mixer\\.experts\\.down_proj\n" in output
    assert "refused" not in output


# --- errors: one line each, exit 2 for usage, 1 for the rest ----------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "No such option '--bogus'; see 'fusemoe-ckpt --help'"),
        (["nothing"], "No such command 'nothing'; see 'fusemoe-ckpt --help'"),
        (["convert"], "Missing argument 'SRC'; see 'fusemoe-ckpt convert --help'"),
        (["convert", "a", "b", "--dtype", "fp4"], None),
        (["verify", "a"], "Missing argument 'DST'; see 'fusemoe-ckpt verify --help'"),
        (["batch", "m", "--jobs", "0"], None),
    ],
    ids=["group-option", "command", "argument", "choice", "verify-argument", "range"],
)
def test_click_usage_errors_are_one_line_with_exit_2(args, message):
    """click's own usage errors used to print the usage, a hint and the error on three lines."""
    result = CliRunner().invoke(cli, args, prog_name="fusemoe-ckpt")
    assert one_line_error(result, exit_code=2) == message or message is None
    assert "Usage:" not in result.output


def test_dst_that_is_a_file_is_a_one_line_usage_error(tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(cli, ["convert", str(tmp_path), str(tmp_path / "file")], prog_name="fusemoe-ckpt")
    assert one_line_error(result, exit_code=2) == (
        f"Invalid value for 'DST': Directory '{tmp_path / 'file'}' is a file; see 'fusemoe-ckpt convert --help'"
    )


def test_our_usage_errors_exit_2_and_other_errors_1(qwen_checkpoint, tmp_path):
    runner = CliRunner()
    usage = runner.invoke(cli, ["convert", str(qwen_checkpoint), str(tmp_path / "a"), "--max-shard-size", "huge"])
    assert one_line_error(usage, exit_code=2).startswith("max shard size 'huge' is not a number of bytes")
    failed = runner.invoke(cli, ["convert", str(tmp_path / "missing"), str(tmp_path / "b")])
    assert one_line_error(failed, exit_code=1) == f"{tmp_path / 'missing'}: source is not a directory"


@pytest.mark.parametrize("name", ["new\nline", "esc\x1b[31mred", "tab\tand\rreturn"])
def test_a_path_with_control_characters_cannot_split_the_line(tmp_path, name):
    """A newline in a path used to split the one-line error; an escape sequence reached the terminal."""
    src = tmp_path / name
    src.mkdir()
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "dst")])
    shown = str(src).encode("unicode_escape").decode("ascii")
    assert one_line_error(result) == f"{shown}: no model.safetensors.index.json or model.safetensors found"


def test_a_tensor_key_with_a_newline_cannot_split_the_line(tmp_path):
    from .test_bad_input import entry, shard_bytes

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "qwen3_moe"}')
    key = "model.layers.0\n.mlp.experts.x.gate_proj.weight"
    (src / "model.safetensors").write_bytes(shard_bytes({key: entry(0, 8)}, bytes(8)))
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "dst")])
    assert (
        one_line_error(result) == "model.layers.0\\n.mlp.experts.x.gate_proj.weight: expert index 'x' is not a number"
    )


def test_help_documents_the_exit_statuses():
    output = CliRunner().invoke(cli, ["--help"]).output
    for line in ("0    done", "1    failed", "2    usage error", "130  interrupted"):
        assert line in output


def test_warnings_are_one_line_too(qwen_checkpoint, tmp_path):
    """A warning names paths as errors do: a newline in one cannot split it."""
    (tmp_path / "target").mkdir()
    link = tmp_path / "d\nst"
    link.symlink_to(tmp_path / "target")
    result = CliRunner().invoke(cli, ["convert", "-q", str(qwen_checkpoint), str(link)])
    assert result.exit_code == 0, result.output
    shown = str(link).replace("\n", "\\n")
    assert (
        result.stderr
        == f"Warning: {shown}: is a symbolic link; the output is written to its target {tmp_path / 'target'}\n"
    )
