"""The dtypes of quantized storage, as safetensors names them: quantized weights and their scales."""

from __future__ import annotations

FP8_WEIGHT_DTYPES = ("F8_E4M3", "F8_E5M2")
# FP4 (E2M1) experts: two values per I8 byte, the low nibble first; one scale per row and 32 values.
FP4_WEIGHT_DTYPE = "I8"
FP4_BLOCK = (1, 32)
# F32 (scale_fmt "float"), BF16, and E8M0 exponents (scale_fmt "ue8m0") stored as F8_E8M0 or raw U8.
SCALE_SIZES = {"F32": 4, "BF16": 2, "F8_E8M0": 1, "U8": 1}
# compressed-tensors scales are the model's dtype, F16 too.
SCALE_BYTES = SCALE_SIZES | {"F16": 2}
