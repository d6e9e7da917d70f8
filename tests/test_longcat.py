"""LongCat-Flash's zero experts: transformers holds gate_up_proj with n_routed + zero_expert_num rows
but down_proj with n_routed rows. A released checkpoint stores only the routed experts, which
transformers 5.24 itself refuses (a size mismatch); convert writes the missing rows as zeros, which
forward never reads (zero experts are identities). tests/test_transformers_families.py covers
transformers' own save, which stores gate/up rows for the zero experts too."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

transformers = pytest.importorskip("transformers")

from accelerate import init_empty_weights, load_checkpoint_and_dispatch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from fusemoe_ckpt import convert, unfuse, verify  # noqa: E402
from fusemoe_ckpt.cli import cli  # noqa: E402

from .conftest import load_checkpoint, write_checkpoint  # noqa: E402
from .tiny_models import BASE, TINY_MODELS  # noqa: E402

ROUTED, ZERO = 4, 2
EXPERTS = "model.layers.0.mlp.experts"


@pytest.fixture(scope="module")
def longcat(tmp_path_factory):
    """(transformers' own per-expert save, the same with only the routed experts, tiny config)."""
    root = tmp_path_factory.mktemp("longcat")
    torch.manual_seed(0)
    config = AutoConfig.for_model("longcat_flash", **(BASE | TINY_MODELS["longcat_flash"]))
    assert (config.n_routed_experts, config.zero_expert_num) == (ROUTED, ZERO)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(root / "full")
    tensors = load_checkpoint(root / "full") if (root / "full" / "model.safetensors.index.json").exists() else None
    if tensors is None:
        from safetensors.torch import load_file

        tensors = load_file(root / "full" / "model.safetensors")
    zero_keys = [k for k in tensors if any(f".experts.{e}." in k for e in range(ROUTED, ROUTED + ZERO))]
    assert len(zero_keys) == 2 * ZERO  # gate and up of each zero expert, no down
    routed = {k: v for k, v in tensors.items() if k not in zero_keys}
    write_checkpoint(root / "routed", routed, shards=2, config=config.to_dict())
    return root / "full", root / "routed"


def test_routed_only_checkpoint_gets_zero_rows_and_loads(longcat, tmp_path):
    full, routed = longcat
    result = CliRunner().invoke(cli, ["convert", str(routed), str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    assert "2 zero experts' gate/up rows written as zeros" in result.output
    ours = load_checkpoint(tmp_path / "ours")
    gate_up, down = ours[f"{EXPERTS}.gate_up_proj"], ours[f"{EXPERTS}.down_proj"]
    assert (gate_up.shape[0], down.shape[0]) == (ROUTED + ZERO, ROUTED)
    assert torch.count_nonzero(gate_up[ROUTED:]) == 0
    convert(full, tmp_path / "from-full")
    expected = load_checkpoint(tmp_path / "from-full")
    assert sorted(ours) == sorted(expected)
    for key in expected:
        if key != f"{EXPERTS}.gate_up_proj":
            assert torch.equal(ours[key], expected[key]), key
    assert torch.equal(gate_up[:ROUTED], expected[f"{EXPERTS}.gate_up_proj"][:ROUTED])

    config = AutoConfig.from_pretrained(tmp_path / "ours")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model = load_checkpoint_and_dispatch(model, str(tmp_path / "ours"), device_map={"": "cpu"}, strict=True).eval()
    reference = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).eval()
    input_ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reference(input_ids).logits)
    with pytest.raises(RuntimeError, match="mismatched"):
        AutoModelForCausalLM.from_pretrained(routed)  # what transformers 5.24 does with the released layout

    assert verify(routed, tmp_path / "ours").ok
    unfuse(tmp_path / "ours", tmp_path / "back")
    back = load_checkpoint(tmp_path / "back")
    assert [k for k in back if ".experts.5." in k] == [f"{EXPERTS}.5.gate_proj.weight", f"{EXPERTS}.5.up_proj.weight"]


def test_a_zero_expert_past_the_declared_ones_is_refused(longcat, tmp_path):
    full, _ = longcat
    from safetensors.torch import load_file

    tensors = load_file(full / "model.safetensors")
    tensors[f"{EXPERTS}.6.gate_proj.weight"] = tensors[f"{EXPERTS}.0.gate_proj.weight"].clone()
    tensors[f"{EXPERTS}.6.up_proj.weight"] = tensors[f"{EXPERTS}.0.up_proj.weight"].clone()
    config = AutoConfig.from_pretrained(full).to_dict()
    src = write_checkpoint(tmp_path / "src", tensors, config=config)
    result = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "dst")])
    assert result.exit_code == 1
    assert "the checkpoint has expert 6, but config.json declares 4 experts and 2 zero experts" in result.output
