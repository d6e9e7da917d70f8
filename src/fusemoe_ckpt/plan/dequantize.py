"""Dequantize FP8 rows (and compressed-tensors' packed integer rows) by their scales, bit for bit as
transformers does, with numpy instead of torch.

transformers (`integrations/finegrained_fp8.py`, `Fp8Dequantize`) computes `(q.float() * s.float())
.to(dtype)`: each FP8 value and scale decoded exactly to float32, one float32 multiply, one rounding
to the output dtype (round to nearest even). A NaN stays a NaN (its bits are not canonicalised: torch's
scalar path writes 0x7FC0 and its vectorized CPU kernel 0xFFFF; FP8 weights hold none in practice). Decoding is a lookup
in a 256-entry table, so every step is exact and the result equals torch's. numpy costs 20 MB of
memory where torch costs 250 MB, which keeps `--dequantize` within convert's memory budget.
The block index comes from `weight_block_size`, never from dividing shapes, so a 576-row weight with
5 scale rows of 128 is dequantized right.

compressed-tensors (`forward_helpers.py::_dequantize`) computes `(q.to(s.dtype) - zp.to(s.dtype)) * s`
in the scale's dtype: here the integers are unpacked from their int32 words, the product taken in
float32 (exact for 16-bit scales) and rounded to the scale's dtype (`Scales.rounding`), then to the
output dtype, which is the rounding torch does.
"""

from __future__ import annotations

import functools

import numpy as np

from ..reading.quantization_records import Scales


def _float8_table(exponent_bits: int, mantissa_bits: int, *, finite: bool) -> np.ndarray:
    """The float32 value of each of the 256 codes of an FP8 format (IEEE-like, `finite`: only the
    all-ones code of each sign is NaN and there is no infinity, as in E4M3FN)."""
    bias = (1 << (exponent_bits - 1)) - 1
    top = (1 << exponent_bits) - 1
    values = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exponent = (code >> mantissa_bits) & top
        mantissa = code & ((1 << mantissa_bits) - 1)
        fraction = mantissa / (1 << mantissa_bits)
        if finite and exponent == top and mantissa == (1 << mantissa_bits) - 1:
            value = float("nan")
        elif not finite and exponent == top:
            value = sign * float("inf") if mantissa == 0 else float("nan")
        elif exponent == 0:
            value = sign * fraction * 2.0 ** (1 - bias)
        else:
            value = sign * (1.0 + fraction) * 2.0 ** (exponent - bias)
        values[code] = value
    return values


def _e8m0_table(*, raw_bytes: bool) -> np.ndarray:
    """Scales stored as exponents: 2 ** (code - 127). As F8_E8M0 (torch's float8_e8m0fnu), 0xFF is
    NaN; as raw U8 bytes, transformers computes `exp2(byte - 127)`, so 0xFF is 2 ** 128 = inf."""
    with np.errstate(over="ignore"):  # 2 ** 128 is inf, as in torch
        values = np.ldexp(np.float32(1.0), np.arange(256, dtype=np.int32) - 127).astype(np.float32)
    if not raw_bytes:
        values[255] = np.nan
    return values


@functools.cache
def code_table(dtype: str) -> np.ndarray:
    """float32 value of each byte code of the one-byte `dtype`."""
    if dtype == "F8_E4M3":
        return _float8_table(4, 3, finite=True)
    if dtype == "F8_E5M2":
        return _float8_table(5, 2, finite=False)
    if dtype == "F8_E8M0":
        return _e8m0_table(raw_bytes=False)
    if dtype == "U8":
        return _e8m0_table(raw_bytes=True)
    raise ValueError(f"no byte table for {dtype}")


def scale_values(raw: bytes | bytearray, scales: Scales) -> np.ndarray:
    """The scale grid as float32, shape `scales.grid`."""
    if scales.dtype == "F32":
        grid = np.frombuffer(raw, dtype="<f4")
    elif scales.dtype == "BF16":
        grid = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif scales.dtype == "F16":
        grid = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    else:
        grid = code_table(scales.dtype)[np.frombuffer(raw, dtype=np.uint8)]
    return grid.reshape(scales.grid)


@functools.cache
def _pair_table(dtype: str) -> np.ndarray:
    """float32 values of both codes of each little-endian pair of bytes: (65536, 2), 512 KiB. Looking
    pairs up with `np.take` is several times faster than looking up single bytes."""
    single = code_table(dtype)
    pairs = np.arange(65536, dtype=np.uint32)
    return np.stack([single[pairs & 0xFF], single[pairs >> 8]], axis=1)


def decode(data: bytes | bytearray, dtype: str) -> np.ndarray:
    """The one-byte-per-element `data` of `dtype` as float32, exactly."""
    raw = np.frombuffer(data, dtype=np.uint8)
    even = len(raw) & ~1
    values = np.take(_pair_table(dtype), raw[:even].view("<u2"), axis=0).reshape(-1)
    if even < len(raw):
        values = np.append(values, code_table(dtype)[raw[even:]])
    return values


def zero_point_values(raw: bytes | bytearray, scales: Scales) -> np.ndarray:
    """The zero points of a compressed-tensors matrix as float32, shape `scales.grid`: `bits`-bit
    integers packed in int32 words along the rows of each grid column, stored offset by 2 ** (bits - 1)."""
    zero = scales.zero_points
    grid_rows, grid_cols = scales.grid
    words = np.frombuffer(raw, dtype="<u4").reshape(-1, grid_cols)  # [ceil(rows * bits / 32), grid cols]
    by_column = np.ascontiguousarray(words.T)  # each grid column's words, in row order
    return _unpacked(by_column.view(np.uint8), zero.bits, grid_cols, grid_rows).T.copy()


def _unpacked(data: np.ndarray, bits: int, count: int, cols: int) -> np.ndarray:
    """`count` rows of `bits`-bit values packed densely in little-endian int32 words (each row whole
    words), the first `cols` of each as float32 with compressed-tensors' offset 2 ** (bits - 1) removed."""
    raw = data.reshape(count, -1)
    values = np.take(_unpack_table(bits), raw, axis=0).reshape(count, -1)
    return values if values.shape[1] == cols else np.ascontiguousarray(values[:, :cols])


@functools.cache
def _unpack_table(bits: int) -> np.ndarray:
    """The signed values of each byte of packed `bits`-bit integers, low bits first, as float32:
    (256, 8 // bits)."""
    if bits not in (4, 8):
        raise ValueError(f"cannot unpack {bits}-bit values")
    codes = np.arange(256)
    parts = [(codes >> shift) & ((1 << bits) - 1) for shift in range(0, 8, bits)]
    return (np.stack(parts, axis=1) - (1 << (bits - 1))).astype(np.float32)


def dequantize_rows(
    data: bytes | bytearray,
    first_row: int,
    grid: np.ndarray,
    scales: Scales,
    output: str,
    zero_points: np.ndarray | None = None,
) -> memoryview:
    """Rows `first_row`, `first_row` + 1, ... of the quantized matrix, whose bytes are `data`,
    dequantized to `output` ("BF16", "F16" or "F32"): a view of the little-endian bytes.

    Each value is `(q - zero point) * scale` in float32; where `scales.rounding` names a 16-bit dtype
    (compressed-tensors computes in the scale's dtype) the product is rounded to it first. Both
    factors are exact in that dtype and their product exact in float32, so this is its one rounding.
    """
    rows, cols = scales.shape
    block_rows, block_cols = scales.block
    count = len(data) // scales.row_bytes
    if scales.bits is None:
        values = decode(data, scales.quantized_dtype).reshape(count, cols)
    else:
        values = _unpacked(np.frombuffer(data, dtype=np.uint8), scales.bits, count, cols)
    row_index = np.arange(first_row, first_row + count) // block_rows
    row_scales = grid[row_index]  # (count, grid cols)
    row_zeros = None if zero_points is None else zero_points[row_index]
    if cols % block_cols == 0:
        blocks = values.reshape(count, cols // block_cols, block_cols)
        if row_zeros is not None:
            blocks -= row_zeros[:, :, None]
        blocks *= row_scales[:, :, None]
    else:
        if row_zeros is not None:
            values -= np.repeat(row_zeros, block_cols, axis=1)[:, :cols]
        values *= np.repeat(row_scales, block_cols, axis=1)[:, :cols]
    if scales.rounding in ("BF16", "F16") and scales.rounding != output:
        values = _rounded(values, scales.rounding)
    return _encode(values, output)


def _rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """`values` rounded to `dtype` (round to nearest even, as torch) and widened back to float32."""
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return values.astype(np.float16).astype(np.float32)
    upper = np.frombuffer(_encode(values, "BF16"), dtype="<u2")
    return (upper.astype(np.uint32) << 16).view(np.float32).reshape(values.shape)


def _encode(values: np.ndarray, output: str) -> memoryview:
    if output == "F32":
        return _bytes_of(values.astype("<f4"))
    if output == "F16":
        with np.errstate(over="ignore"):  # past float16's range is inf, as in torch
            return _bytes_of(values.astype("<f2"))
    if output != "BF16":
        raise ValueError(f"cannot dequantize to {output}")
    # Round to nearest even on the upper 16 bits, as torch's float -> bfloat16 does, in place. A
    # quiet NaN (all a decoded FP8 NaN times a scale can be) keeps its NaN bits through the sum.
    bits = values.reshape(-1).view(np.uint32)
    rounded = bits >> 16
    rounded &= 1
    rounded += 0x7FFF
    rounded += bits
    rounded >>= 16
    return _bytes_of(rounded.astype("<u2"))


def _bytes_of(array: np.ndarray) -> memoryview:
    """The bytes of a contiguous array, without copying them."""
    return memoryview(array.reshape(-1)).cast("B")
