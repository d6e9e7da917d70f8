"""The engines table (rules/consumers.py) and everything shown from it: the consumers command, inspect's
line and the model card, which must say what the table says."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.commands.example import write_example
from fusemoe_ckpt.hub.model_card import write_model_card
from fusemoe_ckpt.rules import consumers as table
from fusemoe_ckpt.rules.families import FAMILIES

METADATA = {"fusemoe_ckpt_family": "qwen2_moe", "fusemoe_ckpt_fused_layers": 2, "fusemoe_ckpt_experts": 8}


def _card(tmp_path, model_type: str | None) -> str:
    root = tmp_path / "card"
    root.mkdir(exist_ok=True)
    config = {"architectures": ["Qwen3MoeForCausalLM"]} | ({"model_type": model_type} if model_type else {})
    (root / "config.json").write_text(json.dumps(config))
    return write_model_card(root, METADATA, repo_id="me/fused", endpoint="https://hub.example").read_text()


def _engines_part(card: str) -> str:
    return card[card.index("### Other engines") :]


def _items(part: str, title: str) -> list[str]:
    """The nested items under the card's list entry that starts with `title`."""
    lines = part.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"- {title}")), None)
    if start is None:
        return []
    items = []
    for line in lines[start + 1 :]:
        if not line.startswith("  - "):
            break
        items.append(line[4:])
    return items


def test_every_row_is_a_known_model_type_engine_and_status_once():
    family_types = {t for f in FAMILIES for t in f.model_types}
    keys = [(s.engine, s.model_type) for s in table.SUPPORT]
    assert len(keys) == len(set(keys))
    for s in table.SUPPORT:
        assert s.model_type in family_types, s
        assert s.engine in table.ENGINES, s
        assert s.status in (table.LOADS, table.NEEDS_UNFUSE, table.WRONG), s
        assert s.detail and s.evidence, s


def test_an_unchecked_engine_reads_unknown_not_a_guess():
    rows = table.consumers_of("deepseek_v3")
    assert [s.engine for s in rows] == list(table.ENGINES)
    trt = next(s for s in rows if s.engine == table.TENSORRT_LLM)
    assert (trt.status, trt.confirmed) == (table.UNKNOWN, False)
    assert {s.status for s in table.consumers_of("olmoe")} == {table.UNKNOWN}


@pytest.mark.parametrize("model_type", sorted({s.model_type for s in table.SUPPORT}))
def test_the_card_names_every_engine_under_what_the_table_says(tmp_path, model_type):
    part = _engines_part(_card(tmp_path, model_type))
    lines = part.splitlines()
    for s in table.consumers_of(model_type):
        label = table.engine_label(s.engine)
        holding = [line for line in lines if label in line]
        assert holding, f"{label} missing from the card for {model_type}"
        if s.status == table.WRONG:
            assert any(line.startswith(f"> - **{label}") and s.detail in line for line in holding)
        elif s.status == table.LOADS:
            assert any(item.startswith(label) and item.endswith(s.detail) for item in _items(part, "Load the fused"))
        elif s.status == table.NEEDS_UNFUSE:
            assert any(
                item.startswith(label) and item.endswith(s.detail) for item in _items(part, "Need the per-expert")
            )
        else:
            assert any(line.startswith("- Not checked for this model type:") for line in holding)


def test_the_card_warns_by_name_where_a_loader_is_silently_wrong(tmp_path):
    part = _engines_part(_card(tmp_path, "qwen3_moe"))
    warning = [line for line in part.splitlines() if line.startswith(">")]
    assert warning[0] == "> **Warning:** these accept this repo without an error and load its experts wrong:"
    assert [line.split(":")[0] for line in warning if line.startswith("> - ")] == [
        "> - **SGLang 0.5.23",
        "> - **mlx-lm sharded_load 0.32",
        "> - **llm-compressor 0.14",
    ]
    assert "fusemoe-ckpt unfuse" in warning[-1]
    assert (
        "llama.cpp convert_hf_to_gguf.py of llama-cpp-python 0.3.36: "
        "writes the same GGUF as from the per-expert original" in _items(part, "Load the fused layout")
    )
    assert _items(part, "Need the per-expert layout") == [
        "mlx-lm load 0.32: mlx_lm.load (strict=True) refuses it: ValueError: Received N parameters not in model"
    ]


def test_a_change_in_the_table_shows_in_the_card(tmp_path, monkeypatch):
    before = _engines_part(_card(tmp_path, "qwen3_moe"))
    assert "> - **SGLang 0.5.23" in before
    changed = tuple(
        dataclasses.replace(s, status=table.LOADS, detail="a fused loader, now")
        if (s.engine, s.model_type) == (table.SGLANG, "qwen3_moe")
        else s
        for s in table.SUPPORT
    )
    monkeypatch.setattr(table, "SUPPORT", changed)
    after = _engines_part(_card(tmp_path, "qwen3_moe"))
    assert "> - **SGLang" not in after
    assert "SGLang 0.5.23: a fused loader, now" in _items(after, "Load the fused layout")


def test_a_config_without_model_type_gets_unknown(tmp_path):
    part = _engines_part(_card(tmp_path, None))
    assert "config.json names no `model_type`: which engines load this layout is unknown." in part


def test_consumers_command_lists_one_line_per_engine():
    result = CliRunner().invoke(cli, ["consumers", "mixtral"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "mixtral:"
    status_lines = [line for line in lines if line.startswith("  ") and not line.startswith("    ")]
    assert len(status_lines) == len(table.ENGINES)
    assert "  llama.cpp convert_hf_to_gguf.py of llama-cpp-python 0.3.36: needs the per-expert layout " in (
        "\n".join(status_lines)
    )
    assert "  llm-compressor 0.14: loads the fused layout [checked]" in status_lines
    assert "  SGLang 0.5.23: WARNING: accepts the fused layout and loads it wrong [checked]" in status_lines
    assert "  TensorRT-LLM (version not recorded): loads the fused layout [reported]" in status_lines
    assert "evidence:" not in result.output
    with_evidence = CliRunner().invoke(cli, ["consumers", "mixtral", "--evidence"]).output
    assert with_evidence.count("    evidence: ") == sum(s.model_type == "mixtral" for s in table.SUPPORT)


def test_consumers_json_is_the_table():
    result = CliRunner().invoke(cli, ["consumers", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["schema_version"] == 1
    assert data["statuses"] == ["loads", "needs_unfuse", "wrong", "unknown"]
    assert data["engines"] == [{"name": e.name, "version": e.version} for e in table.ENGINES]
    assert sorted(data["model_types"]) == sorted({s.model_type for s in table.SUPPORT})
    rows = {(r["engine"], m): r for m, rs in data["model_types"].items() for r in rs}
    assert len(rows) == len(table.ENGINES) * len(data["model_types"])
    for s in table.SUPPORT:
        assert rows[(s.engine.name, s.model_type)] == {
            "engine": s.engine.name,
            "version": s.engine.version,
            "status": s.status,
            "detail": s.detail,
            "evidence": s.evidence,
            "confirmed": s.confirmed,
        }
    one = json.loads(CliRunner().invoke(cli, ["consumers", "qwen3_moe", "--json"]).output)
    assert list(one["model_types"]) == ["qwen3_moe"]


def test_consumers_of_an_unknown_model_type_is_a_usage_error():
    result = CliRunner().invoke(cli, ["consumers", "nope"])
    assert result.exit_code == 2
    assert result.output == (
        "Error: unknown model type 'nope': no family rule or engine check names it; "
        "checked: deepseek_v2, deepseek_v3, mixtral, qwen2_moe, qwen3_moe\n"
    )


def test_inspect_names_the_engines_for_the_checkpoints_model_type(tmp_path):
    write_example(tmp_path / "tiny")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "tiny")])
    assert result.exit_code == 0, result.output
    line = result.output.splitlines()[1]
    assert line == table.verdict_line("qwen3_moe")
    assert line.startswith("engines on the fused layout of qwen3_moe: load it: vLLM 0.33, ")
    assert "; need unfuse: mlx-lm load 0.32; " in line
    assert "; load it WRONG: SGLang 0.5.23, mlx-lm sharded_load 0.32, llm-compressor 0.14" in line
