"""Read the bytes a piece puts into its output tensor, in bounded chunks: plain, transposed or cast.

The writer uses this for every piece the kernel cannot copy as is, and verify uses it for every
piece, so both hold the same bounded amount of tensor bytes: one chunk, or for a transposed piece
a band of about one chunk twice (as read and as turned).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from ..plan.cast import cast_bytes
from ..plan.pieces import Piece
from ..reading.files import open_regular, read_exact
from ..reading.safetensors_format import DTYPE_SIZES

# Tensor bytes read at once by a cast or a comparison.
READ_CHUNK = 8 * 1024 * 1024
# Memory one worker dequantizes in: rows of source, their float32 values, the rounding's uint32 work
# and the output. --dequantize runs a worker per CPU: on 16 CPUs, 4 MiB gave 1.73 GB/s in 108 MiB,
# 8 MiB 1.79 GB/s in 169 MiB, 2 MiB 0.94 GB/s (numpy calls too short to keep 16 threads busy).
DEQUANTIZE_CHUNK = 4 * 1024 * 1024
# Bytes held per source byte while dequantizing (1 + 4 + 4 + 2, rounded up).
DEQUANTIZE_WORK_FACTOR = 12

# memoryview formats of each element size, for moving whole elements when transposing.
_ELEMENT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}


def piece_chunks(fd: int, piece: Piece, *, chunk: int | None = None) -> Iterator[bytes | bytearray]:
    """The output bytes of `piece`, read from `fd` (its open file) in order, each chunk at most
    `chunk` (default READ_CHUNK) bytes of source (a transposed matrix: bands of whole output rows, each
    at most `chunk` bytes unless one output row is larger)."""
    chunk = chunk or READ_CHUNK
    if piece.file is None:
        for start in range(0, piece.length, chunk):
            yield bytes(min(chunk, piece.length - start))
        return
    if piece.scales is not None:
        yield from _dequantized_chunks(fd, piece, min(chunk, DEQUANTIZE_CHUNK))
        return
    if piece.transpose is not None:
        for turned in _transposed_bands(fd, piece, chunk):
            if piece.cast is None:
                yield turned
            else:
                yield from _cast_chunks(turned, piece.cast, chunk)
        return
    element = DTYPE_SIZES[piece.cast[0]] if piece.cast else 1
    step = max(element, chunk // element * element)
    end = piece.offset + piece.length
    for offset in range(piece.offset, end, step):
        data = read_exact(fd, offset, min(step, end - offset), piece.file)
        yield data if piece.cast is None else cast_bytes(data, *piece.cast)


def _cast_chunks(data: bytearray, cast: tuple[str, str], chunk: int) -> Iterator[bytearray]:
    element = DTYPE_SIZES[cast[0]]
    step = max(element, chunk // element * element)
    view = memoryview(data)
    for start in range(0, len(data), step):
        yield cast_bytes(view[start : start + step], *cast)


def _transposed_bands(fd: int, piece: Piece, chunk: int) -> Iterator[bytearray]:
    """The transpose of the row-major (rows, cols) matrix of `piece`, in order: whole when it fits in
    `chunk` bytes, else in bands of output rows, each read as the same columns of every source row
    (a strided read of about `chunk` bytes), so a large matrix is never held whole."""
    rows, cols = piece.transpose
    element = piece.length // (rows * cols)
    if piece.length <= chunk:
        yield _transposed(read_exact(fd, piece.offset, piece.length, piece.file), (rows, cols))
        return
    width = max(1, chunk // (rows * element))
    for start in range(0, cols, width):
        columns = min(width, cols - start)
        band = bytearray()
        for row in range(rows):
            band += read_exact(fd, piece.offset + (row * cols + start) * element, columns * element, piece.file)
        yield _transposed(band, (rows, columns))


def _transposed(data: bytearray, shape: tuple[int, int]) -> bytearray:
    """The row-major (rows, cols) matrix in `data` as its (cols, rows) transpose."""
    rows, cols = shape
    code = _ELEMENT_CODES[len(data) // (rows * cols)]
    source = memoryview(data).cast(code)
    out = bytearray(len(data))
    target = memoryview(out).cast(code)
    for col in range(cols):
        target[col * rows : (col + 1) * rows] = source[col::cols]
    return out


def _dequantized_chunks(fd: int, piece: Piece, chunk: int) -> Iterator[bytes]:
    """The quantized matrix of `piece`, whole rows at a time, dequantized by its scales into the
    output dtype. The rows read at once hold about `chunk` // DEQUANTIZE_WORK_FACTOR bytes, so the
    float32 values, the rounding and the output together stay near `chunk`."""
    from ..plan.dequantize import dequantize_rows, scale_values, zero_point_values  # numpy, for --dequantize

    scales = piece.scales
    grid = scale_values(_read_whole(scales.file, scales.offset, scales.nbytes), scales)
    zeros = scales.zero_points
    if zeros is not None:
        zeros = zero_point_values(_read_whole(zeros.file, zeros.offset, zeros.nbytes), scales)
    row_bytes = scales.row_bytes
    # A row of packed values becomes several times its bytes as float32.
    expansion = scales.shape[1] / row_bytes
    step = max(1, int(chunk / DEQUANTIZE_WORK_FACTOR / expansion) // row_bytes) * row_bytes
    for start in range(0, piece.length, step):
        data = read_exact(fd, piece.offset + start, min(step, piece.length - start), piece.file)
        yield dequantize_rows(data, start // row_bytes, grid, scales, piece.cast[1], zeros)


def _read_whole(file, offset: int, length: int) -> bytearray:
    """The `length` bytes at `offset` of `file` (a matrix's scales or zero points)."""
    scale_fd = open_regular(file, what="shard file")[0]
    try:
        return read_exact(scale_fd, offset, length, file)
    finally:
        os.close(scale_fd)
