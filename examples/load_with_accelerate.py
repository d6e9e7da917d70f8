"""Load a converted checkpoint the way exact-key loaders do, and show that every weight arrives.

    python examples/load_with_accelerate.py FUSED_DIR [ORIGINAL_DIR]

Builds the model on the meta device, fills it with accelerate's `load_checkpoint_and_dispatch`
(strict: every key of the model must be in the checkpoint and vice versa), checks that no parameter
is left on meta, and runs a forward pass. Given ORIGINAL_DIR too, compares the logits with
`from_pretrained(ORIGINAL_DIR)`, which fuses the experts itself.
"""

import sys

import torch
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from transformers import AutoConfig, AutoModelForCausalLM


def main(fused_dir: str, original_dir: str | None = None) -> None:
    config = AutoConfig.from_pretrained(fused_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.tie_weights()
    model = load_checkpoint_and_dispatch(model, fused_dir, device_map={"": "cpu"}, strict=True)
    on_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if on_meta:
        raise SystemExit(f"left on meta: {on_meta}")
    print(f"loaded {sum(1 for _ in model.parameters())} parameters with accelerate dispatch, none on meta")
    input_ids = torch.arange(8).unsqueeze(0) % config.vocab_size
    with torch.no_grad():
        logits = model(input_ids).logits
    print(f"forward pass: logits {tuple(logits.shape)}, first values {logits[0, 0, :4].tolist()}")
    if original_dir:
        reference = AutoModelForCausalLM.from_pretrained(original_dir, dtype=torch.float32)
        with torch.no_grad():
            expected = reference(input_ids).logits
        same = torch.equal(logits, expected)
        print(f"logits equal to from_pretrained({original_dir}): {same}")
        if not same:
            raise SystemExit(1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
