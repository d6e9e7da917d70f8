"""Casting floating tensors while converting: the one place fusemoe-ckpt imports torch.

torch is imported on the first cast, so a conversion without `--dtype` never loads it.
"""

from __future__ import annotations

import warnings

from ..errors import UsageError

# The dtypes `--dtype` accepts, as the safetensors header names them.
OUTPUT_DTYPES: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# Floating dtypes that are cast. FP8 tensors are quantized storage that belongs with its scales, and
# complex ones are not weights: both are copied untouched, like integers and booleans.
CASTABLE = frozenset({"F16", "BF16", "F32", "F64"})

_TORCH_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def output_dtype(name: str | None) -> str | None:
    """The safetensors dtype for a `--dtype` value ("bfloat16" -> "BF16"); None stays None.

    Raises:
        UsageError: `name` is not one of OUTPUT_DTYPES.
    """
    if name is None:
        return None
    if name in OUTPUT_DTYPES.values():
        return name
    try:
        return OUTPUT_DTYPES[name]
    except KeyError:
        raise UsageError(f"dtype {name!r} is not one of {', '.join(OUTPUT_DTYPES)}") from None


def cast_of(dtype: str, target: str | None) -> tuple[str, str] | None:
    """(dtype, target) when a tensor of `dtype` must be cast to `target`, else None."""
    if target is None or dtype == target or dtype not in CASTABLE:
        return None
    return dtype, target


def cast_bytes(data: bytes | bytearray | memoryview, source: str, target: str) -> bytearray:
    """The elements in `data` (little-endian `source`) converted to `target` exactly as torch's `.to()`.

    The result is written straight into a new buffer through `Tensor.copy_`, the kernel `.to()` uses,
    so no numpy is needed (it has no bfloat16) and memory holds the input and output once each.
    """
    import torch  # only the cast path loads torch

    count = len(data) // _SIZES[source]
    out = bytearray(count * _SIZES[target])
    if count:
        with warnings.catch_warnings():
            # A read-only input is fine: it is only read. torch warns about it all the same.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            values = torch.frombuffer(data, dtype=getattr(torch, _TORCH_NAMES[source]))
        torch.frombuffer(out, dtype=getattr(torch, _TORCH_NAMES[target])).copy_(values)
    return out


_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
