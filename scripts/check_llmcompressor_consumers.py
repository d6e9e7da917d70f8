"""Does llm-compressor load the fused layout? Load tiny per-expert and fused checkpoints the way its
MoE examples do (`with load_quantizable_moe(): AutoModelForCausalLM.from_pretrained(...)`) and compare
the logits with plain transformers' from the per-expert original.

    python scripts/check_gguf_consumers.py LLAMA_CPP_DIR OUT qwen3_moe mixtral deepseek_v3  # writes the models
    LLMC_PYTHON scripts/check_llmcompressor_consumers.py OUT qwen3_moe mixtral deepseek_v3

LLMC_PYTHON is a Python with llmcompressor and the transformers it accepts (0.14.0 pins
transformers<=5.17), not fusemoe-ckpt's dependencies.

Result recorded in src/fusemoe_ckpt/rules/consumers.py (llmcompressor 0.14.0, transformers 5.17.0,
CPU): the per-expert originals load with the reference logits; fused qwen3_moe and deepseek_v3 load
without an error and with other logits (their experts re-initialised); fused mixtral loads with the
reference logits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from llmcompressor.modeling.moe.linearize import load_quantizable_moe
from transformers import AutoModelForCausalLM


def _hide_unimportable_aliases() -> None:
    """transformers' apply_patches (entered by load_quantizable_moe) lists every loaded transformers
    module with dir(), which imports the target of a lazy alias; a target that needs torchvision (not
    installed beside a CPU torch here) would stop it. Such aliases are no part of any MoE model."""
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("transformers"):
            try:
                dir(module)
            except ImportError:
                module.__dir__ = lambda: []


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.arange(8).unsqueeze(0)).logits.float()


def main() -> None:
    out = Path(sys.argv[1]).resolve()
    _hide_unimportable_aliases()
    for model_type in sys.argv[2:]:
        original, fused = out / model_type / "original", out / model_type / "fused"
        print(f"== {model_type}")
        reference = _logits(AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32))
        for kind, path in (("original", original), ("fused", fused)):
            torch.manual_seed(1)
            with load_quantizable_moe():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            logits = _logits(model)
            same = torch.equal(logits, reference)
            gap = (logits - reference).abs().max().item()
            print(
                f"   {kind} under load_quantizable_moe: loaded; "
                f"logits equal to the reference: {same} (max gap {gap:.3g})"
            )


if __name__ == "__main__":
    main()
