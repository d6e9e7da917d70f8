"""The command line: help, the families list, the example, convert's output."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fusemoe_ckpt import FAMILIES, __version__
from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.rules.families import REFUSED

from .conftest import load_checkpoint


def _commands() -> list[str]:
    return sorted(cli.commands)


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0
    assert cli.commands[command].help and cli.commands[command].help.split("\n")[0] in result.output


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


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


def test_a_model_holding_a_refused_sub_model_gets_no_family_hint(qwen_checkpoint, tmp_path):
    """dots3_note's text experts match qwen2_moe, but its vision encoder's rule is beyond it: no hint,
    since following one would convert the wrong plan without a word."""
    (qwen_checkpoint / "config.json").write_text('{"model_type": "dots3_note"}')
    result = CliRunner().invoke(cli, ["convert", str(qwen_checkpoint), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {qwen_checkpoint}: model_type 'dots3_note' is not supported: it holds a dots3_note_vision_encoder "
        "whose transformers rule needs a rule scoped to the vision encoder inside a dots3_note model; no family "
        "rule accounts for all its keys\n"
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


def test_families_lists_refused_model_types_with_the_reason():
    output = CliRunner().invoke(cli, ["families"]).output
    for model_type, reason in REFUSED.items():
        assert f"  {model_type}: {reason}\n" in output
