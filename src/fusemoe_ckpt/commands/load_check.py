"""The contract of strict accelerate dispatch, checked without loading a weight.

The model is built from DST's config on the meta device (a quantized config through transformers'
quantizer, which replaces modules as `from_pretrained` does, so FP8 scales are asked for); DST must
hold exactly its state dict's keys with their shapes, except tied parameters whose source DST holds
(save_pretrained writes one copy of a tied pair). Non-persistent buffers are not in a state dict,
so they are never asked for.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, UsageError
from ..reading.source import CONFIG_NAME, read_config


def load_check_problems(dst: Path, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
    """(key, problem) for every way DST's tensors (`shapes`, by key) differ from the state dict of
    the model built on the meta device from DST's config.

    Raises:
        UsageError: transformers is not installed.
    """
    try:
        import torch
        import transformers
    except ImportError as e:
        raise UsageError("--load-check needs transformers: pip install transformers") from e

    try:
        # Read as convert reads SRC's first: transformers would wait forever on a FIFO, or fail on
        # a field of the wrong type with a bare exception.
        read_config(dst / CONFIG_NAME)
    except CheckpointError as e:
        return [(CONFIG_NAME, f"cannot build the model: {e}")]
    config = transformers.AutoConfig.from_pretrained(dst)
    with torch.device("meta"):
        model = _build(transformers, config)
        quantization = getattr(config, "quantization_config", None)
        if quantization is not None:
            from transformers.quantizers.auto import AutoHfQuantizer

            AutoHfQuantizer.from_config(quantization, pre_quantized=True).preprocess_model(model)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})

    problems = []
    model_name = type(model).__name__
    for name, shape in shapes.items():
        if name not in expected:
            problems.append((name, f"not in {model_name} built from DST's config (strict dispatch refuses it)"))
        elif tuple(shape) != expected[name]:
            problems.append((name, f"{list(shape)} in DST, {list(expected[name])} in {model_name}"))
    for name in expected.keys() - shapes.keys():
        if tied.get(name) in shapes:
            continue
        problems.append((name, f"{model_name} has it but DST does not: dispatch would leave it on meta"))
    return problems


def _build(transformers, config):
    """The model class config.json names, else the causal-LM auto class, else the image-text-to-text
    one (a vision-language model whose config names a remote-code class), else the base auto class."""
    for architecture in getattr(config, "architectures", None) or []:
        model_class = getattr(transformers, architecture, None)
        if model_class is not None:
            return model_class._from_config(config)
    for auto_class in (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText):
        try:
            return auto_class.from_config(config)
        except ValueError:
            continue
    return transformers.AutoModel.from_config(config)
