"""A checkpoint fusemoe-ckpt wrote, read back as untrusted input: its index and the provenance it records.

verify, resume, batch and push decide from these fields which family, dtype and source made DST; a
field of the wrong type (tampered, or written by something else) is refused by name, never used.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError
from .index_scan import read_index, read_index_metadata
from .json_document import expect

# The metadata fields the tool writes and reads back, with their types as messages name them.
RECORDED_FIELDS: dict[str, tuple[type, str]] = {
    "total_size": (int, "a whole number"),
    "total_parameters": (int, "a whole number"),
    "fusemoe_ckpt_version": (str, "a version string"),
    "fusemoe_ckpt_family": (str, "a family name"),
    "fusemoe_ckpt_source": (str, "a path or a Hub repo id"),
    "fusemoe_ckpt_source_revision": (str, "a commit id"),
    "fusemoe_ckpt_fused_layers": (int, "a whole number"),
    "fusemoe_ckpt_experts": (int, "a whole number"),
    "fusemoe_ckpt_dtype": (str, "a dtype name"),
    "fusemoe_ckpt_dequantized": (bool, "true or false"),
}


def read_converted_index(index_path: Path) -> tuple[dict[str, str], dict]:
    """The weight map and metadata of the index at `index_path`, every recorded field type-checked.

    Raises:
        CheckpointError: the index is unreadable or malformed, or a recorded field has the wrong
            type; the message names the index and the field.
    """
    weight_map, metadata = read_index(index_path)
    check_recorded(metadata, index_path)
    return weight_map, metadata


def read_converted_metadata(index_path: Path) -> dict:
    """The metadata of the index at `index_path`, every recorded field type-checked; the weight map is
    checked as `read_converted_index` checks it, a chunk at a time, and not kept.

    Raises:
        CheckpointError: as `read_converted_index`.
    """
    metadata = read_index_metadata(index_path)
    check_recorded(metadata, index_path)
    return metadata


def check_recorded(metadata: dict, index_path: Path) -> None:
    """Refuse a recorded field of the wrong type.

    Raises:
        CheckpointError: naming the index and `metadata.FIELD`, with what it must be.
    """
    for key, (kind, expected) in RECORDED_FIELDS.items():
        expect(metadata, key, kind, expected, index_path, prefix="metadata.")


def recorded_metadata(index_path: Path) -> dict:
    """The metadata of the index at `index_path`, or an empty dict when it is missing or malformed
    (what to do about that is the caller's: verify reports it, resume starts over)."""
    try:
        return read_converted_metadata(index_path)
    except CheckpointError:
        return {}
