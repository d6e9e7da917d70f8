"""Does llama.cpp's convert_hf_to_gguf.py read the fused layout? Run it on tiny per-expert and fused
checkpoints of each model type and compare the two GGUFs, tensor by tensor.

    python scripts/check_gguf_consumers.py LLAMA_CPP_DIR OUT qwen3_moe mixtral deepseek_v3

LLAMA_CPP_DIR holds convert_hf_to_gguf.py and gguf-py/ (a llama.cpp checkout, or the copy in
llama-cpp-python's sdist: `pip download llama-cpp-python --no-deps --no-binary :all:`, then
`vendor/llama.cpp`). Each model is tests/tiny_models.py's config built by transformers in bfloat16,
saved per expert (`save_pretrained`) and fused (`save_original_format=False`). The tiny models carry
no tokenizer, so the converter's `set_vocab` is skipped: the tensors are what is compared.

Result recorded in src/fusemoe_ckpt/rules/consumers.py (llama-cpp-python 0.3.36's llama.cpp, CPU):
qwen3_moe converts from both, 27 tensors equal in name, shape, type and bytes; mixtral's fused
checkpoint stops with "Can not map tensor 'model.layers.0.mlp.experts.gate_up_proj'" and
deepseek_v3's with "Unprocessed experts: [...experts.down_proj, ...experts.gate_up_proj]", while
both per-expert originals convert.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from tiny_models import BASE, TINY_MODELS  # noqa: E402

_WRAPPER = """
import sys
sys.path.insert(0, {llama!r})
sys.path.insert(1, {gguf!r})
import convert_hf_to_gguf as c

_get = c.get_model_class


def get_model_class(*args, **kwargs):
    cls = _get(*args, **kwargs)
    cls.set_vocab = lambda self: None  # no tokenizer in a tiny model
    return cls


c.get_model_class = get_model_class
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
c.main()
"""


def gguf_tensors(llama: Path, path: Path) -> dict[str, tuple]:
    sys.path.insert(0, str(llama / "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(path)
    return {
        t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name, hashlib.sha256(bytes(t.data)).hexdigest())
        for t in reader.tensors
    }


def check(llama: Path, out: Path, model_type: str, wrapper: Path) -> None:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **(BASE | TINY_MODELS[model_type]))
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    root = out / model_type
    model.save_pretrained(root / "original")
    model.save_pretrained(root / "fused", save_original_format=False)
    print(f"== {model_type}")
    results = {}
    for kind in ("original", "fused"):
        gguf_path = root / f"{kind}.gguf"
        args = [sys.executable, str(wrapper), str(root / kind), "--outfile", str(gguf_path), "--outtype", "bf16"]
        run = subprocess.run(args, capture_output=True, text=True)
        last = (run.stdout + run.stderr).strip().splitlines()[-1:]
        print(f"   {kind}: exit {run.returncode}: {last[0] if last else ''}")
        results[kind] = gguf_tensors(llama, gguf_path) if run.returncode == 0 else None
    original, fused = results["original"], results["fused"]
    if original is not None and fused is not None:
        print(f"   {len(original)} tensors; equal in name, shape, type and bytes: {original == fused}")
        for name in sorted(set(original) | set(fused)):
            if original.get(name) != fused.get(name):
                print(f"     differs: {name}")


def main() -> None:
    llama, out, model_types = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve(), sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    wrapper = out / "run_convert.py"
    wrapper.write_text(_WRAPPER.format(llama=str(llama), gguf=str(llama / "gguf-py")))
    for model_type in model_types:
        check(llama, out, model_type, wrapper)


if __name__ == "__main__":
    main()
