"""Planning does work per kind of key, not per key, where it can: frontier models have 140k to 300k
tensors and a few hundred kinds of key name and of header entry. Counted calls, not times."""

from __future__ import annotations

import torch

import fusemoe_ckpt.reading.safetensors_format as safetensors_format
import fusemoe_ckpt.rules.key_templates as key_templates
from fusemoe_ckpt.plan.conversion import plan_for
from fusemoe_ckpt.rules.families import family_by_name
from fusemoe_ckpt.rules.patterns import Rename

from .conftest import QWEN3_CONFIG, expert_tensors, write_checkpoint

LAYERS, EXPERTS = 3, 40
_MAPPED = 2 + 2 * (1 + 3 * 2)


def _source(tmp_path):
    tensors = expert_tensors(layers=LAYERS, experts=EXPERTS, dtype=torch.bfloat16)
    return write_checkpoint(tmp_path / "src", tensors, shards=2, config=QWEN3_CONFIG), len(tensors)


def _counted(monkeypatch, module, name: str) -> list:
    calls = []
    original = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def test_keys_are_mapped_once_per_template(tmp_path, monkeypatch):
    src, count = _source(tmp_path)
    calls = _counted(monkeypatch, key_templates, "map_key")
    _, plan = plan_for(src)
    assert len(plan.fused_groups) == 2 * LAYERS
    # The embedding and the norm have no number (mapped as they are); the templates are the router's
    # and the three expert weights', these also with layer and expert number equal, each mapped with
    # two placeholder sets. Mapping every key (`count` calls) was the old way.
    assert count > 300
    assert len(calls) <= _MAPPED, calls


def test_no_group_rename_no_pass_over_the_keys(tmp_path, monkeypatch):
    src, _ = _source(tmp_path)
    assert family_by_name("qwen2_moe").renames == ()
    calls = _counted(monkeypatch, Rename, "apply")
    plan_for(src)
    # Only the templates' keys go through the renames (five legacy renames each), none for active_groups.
    assert len(calls) <= 5 * _MAPPED


def test_header_entries_of_one_dtype_and_shape_are_checked_once(tmp_path, monkeypatch):
    src, count = _source(tmp_path)
    calls = _counted(monkeypatch, safetensors_format, "_parse_entry")
    plan_for(src)
    # Per shard: embedding, norm, router, and gate/up, down shapes (all bf16).
    assert len(calls) <= 2 * 5 < count
