"""The source's tensors as columns: a read-only mapping that answers as the dict it replaces did."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusemoe_ckpt import convert
from fusemoe_ckpt.errors import FamilyError
from fusemoe_ckpt.reading.tensor_table import SourceTensor, TensorTable

from .conftest import QWEN3_CONFIG, expert_tensors, load_checkpoint, write_checkpoint

A, B = Path("a.safetensors"), Path("b.safetensors")


def _tensor(name: str, offset: int = 0, file: Path = A, dtype: str = "BF16", shape=(2, 3)) -> SourceTensor:
    return SourceTensor(name, dtype, shape, file, offset, 12)


def test_a_table_answers_as_a_dict_of_its_tensors_in_order():
    tensors = [_tensor(f"model.layers.{i}.w", offset=100 * i) for i in (3, 1, 2)] + [_tensor("é.ü", 7, file=B)]
    table = TensorTable.of(tensors)
    expected = {t.name: t for t in tensors}
    assert list(table) == list(expected)
    assert dict(table.items()) == expected
    assert list(table.values()) == tensors
    assert len(table) == 4
    assert table["é.ü"] == _tensor("é.ü", 7, file=B)
    assert table.get("missing") is None and "missing" not in table and 3 not in table
    with pytest.raises(KeyError):
        table["model.layers.4.w"]
    assert table.total_bytes == 48
    assert table.start_of_each_file() == {A: 100, B: 7}


def test_the_first_of_a_name_is_kept_and_the_second_reported():
    table = TensorTable()
    assert table.add("x", 1, ("BF16", (1,), A, 2, None)) == -1
    assert table.add("y", 3, ("BF16", (1,), A, 2, None)) == -1
    assert table.add("x", 5, ("F32", (1,), B, 4, None)) == 0
    assert table["x"] == SourceTensor("x", "BF16", (1,), A, 1, 2)
    assert len(table) == 2


def test_without_leaves_names_out_and_the_table_unchanged():
    table = TensorTable.of(_tensor(name, i) for i, name in enumerate("abcd"))
    fewer = table.without(["b", "d", "not-there"])
    assert list(fewer) == ["a", "c"] and len(fewer) == 2
    assert "b" not in fewer and fewer.get("d") is None and fewer["c"].offset == 2
    assert list(fewer.without(["a"])) == ["c"]
    assert list(table) == ["a", "b", "c", "d"]
    assert table.without([]) is table


def test_a_pickled_table_is_rebuilt_with_its_names():
    table = TensorTable.of(_tensor(f"t{i}", i) for i in range(50)).without(["t7"])
    copy = pickle.loads(pickle.dumps(table))
    assert dict(copy.items()) == dict(table.items()) and "t8" in copy and "t7" not in copy


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=8), max_size=80))
def test_any_names_in_any_number_are_found_as_a_dict_finds_them(names):
    """Across the hash table's growth, with collisions of short names, lone surrogates (JSON can
    spell them) and the empty name."""
    table, expected = TensorTable(), {}
    for i, name in enumerate(names):
        first = name not in expected
        assert table.add(name, i, ("BF16", (1,), A, 2, None)) == (-1 if first else list(expected).index(name))
        expected.setdefault(name, _tensor(name, i, shape=(1,)).replace(nbytes=2))
    assert dict(table.items()) == expected
    assert all(table[name] == tensor for name, tensor in expected.items())
    assert "\ud800x" not in table or "\ud800x" in expected


def test_experts_far_apart_are_held_without_a_row_for_each_id_between(tmp_path):
    """Expert ids are untrusted: one of 10**15 must be refused by its number, not by the memory an
    array up to it would take."""
    tensors = expert_tensors(layers=1, experts=4)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        far = tensors[f"model.layers.0.mlp.experts.3.{proj}.weight"].clone()
        tensors[f"model.layers.0.mlp.experts.{10**15}.{proj}.weight"] = far
    src = write_checkpoint(tmp_path / "src", tensors, config={**QWEN3_CONFIG, "num_experts": 4})
    with pytest.raises(FamilyError, match=f"the checkpoint has expert {10**15}, but config.json declares 4 experts"):
        convert(src, tmp_path / "dst")


def test_an_expert_first_seen_far_ahead_is_still_one_expert(tmp_path):
    """Expert 3000 comes first (held apart from the array of ids), then 0..3000 arrive: 3000 again,
    spelled 03000, is the same expert twice."""
    tensors = {}
    for expert in ["3000", *map(str, range(3001)), "03000"]:
        value = int(expert)
        for proj, shape in (("gate_proj", (3, 4)), ("up_proj", (3, 4)), ("down_proj", (4, 3))):
            tensors[f"model.layers.0.mlp.experts.{expert}.{proj}.weight"] = torch.full(shape, float(value))
    config = {**QWEN3_CONFIG, "num_experts": 3001, "num_hidden_layers": 1}
    src = write_checkpoint(tmp_path / "twice", tensors, config=config)
    with pytest.raises(FamilyError, match=r"experts\.3000\.down_proj\.weight: expert 3000 of .* appears twice"):
        convert(src, tmp_path / "dst")
    del tensors["model.layers.0.mlp.experts.03000.gate_proj.weight"]
    for proj in ("up_proj", "down_proj"):
        del tensors[f"model.layers.0.mlp.experts.03000.{proj}.weight"]
    src = write_checkpoint(tmp_path / "once", tensors, config=config)
    convert(src, tmp_path / "dst")
    fused = load_checkpoint(tmp_path / "dst")["model.layers.0.mlp.experts.gate_up_proj"]
    assert fused.shape == (3001, 6, 4)
    assert fused[3000].eq(3000).all() and fused[17].eq(17).all()


def test_may_name_is_false_only_when_no_name_holds_the_text():
    table = TensorTable.of([_tensor("model.layers.0.mlp.input_scale"), _tensor("é.weight", 4)])
    assert table.may_name("input_scale") and table.may_name("é.w") and table.may_name("")
    assert not table.may_name("activation_scale") and not table.may_name(".scale")
