"""Open a source checkpoint: its index, its shard headers and its config, all validated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError
from .index_scan import DIGEST_MASK, IndexSummary, name_digest, summarize_index, weight_map_entries
from .json_document import expect, read_json, shorten
from .safetensors_format import read_header
from .tensor_table import TensorTable

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Numbers of config.json (or of its text_config) that planning reads.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
CONFIG_COUNTS = ("hidden_size", "zero_expert_num", *EXPERT_COUNT_FIELDS)


@dataclass
class SourceCheckpoint:
    """Everything convert needs to know about a source checkpoint, read from headers alone."""

    root: Path
    index_file: Path | None
    shard_files: list[Path]
    tensors: TensorTable
    config: dict | None = None
    index_metadata: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.tensors.total_bytes

    def without_tensors(self) -> SourceCheckpoint:
        """This checkpoint's files, config and index metadata, without the map of its tensors: what
        writing a plan needs, once the plan holds every byte range (at 300k tensors the map is 25 MB)."""
        return replace(self, tensors=TensorTable())


def open_checkpoint(src: str | os.PathLike) -> SourceCheckpoint:
    """Read the index (or the single `model.safetensors`), every shard header and config.json.

    Raises:
        CheckpointError: anything missing, unsafe or inconsistent, naming the file and key.
    """
    root = Path(src)
    if not root.is_dir():
        raise CheckpointError(f"{root}: source is not a directory")
    index_path = root / INDEX_NAME
    if index_path.exists():
        summary = summarize_index(index_path)
        shard_names = sorted(summary.shards)
        if SINGLE_NAME not in shard_names and os.path.lexists(root / SINGLE_NAME):
            raise CheckpointError(both_layouts(root))
        shard_files = [resolve_inside(root, index_path, name) for name in shard_names]
        index_metadata = summary.metadata
    elif (root / SINGLE_NAME).exists():
        summary, index_metadata, index_path = None, {}, None
        shard_files = [root / SINGLE_NAME]
    else:
        raise CheckpointError(f"{root}: no {INDEX_NAME} or {SINGLE_NAME} found")

    tensors, agree = _collect_tensors(root, shard_files, summary)
    if summary is not None and not agree:
        _check_index(root, index_path, summary, tensors)
    return SourceCheckpoint(
        root=root,
        index_file=index_path,
        shard_files=shard_files,
        tensors=tensors,
        config=_read_config(root),
        index_metadata=index_metadata,
    )


def both_layouts(where: object) -> str:
    """The message for a folder (or repo) holding an index and a model.safetensors it does not name."""
    return (
        f"{where}: holds both {INDEX_NAME} and a {SINGLE_NAME} the index does not name: two weight sets, "
        f"and loaders disagree on which is the model (transformers and accelerate load {SINGLE_NAME}, "
        "loaders that follow the index its shards); remove the one that is not"
    )


def resolve_inside(root: Path, index_path: Path, name: str) -> Path:
    """The shard path for an index entry, refusing names that leave the checkpoint directory.

    The check is on the name, not on the resolved file, so the symlinks of the Hub cache layout
    (snapshot files pointing into a blobs directory) keep working.
    """
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or "\\" in name or ".." in pure.parts or name.startswith("~"):
        raise CheckpointError(f"{index_path}: shard name {name!r} points outside {root}")
    return root / pure


def _collect_tensors(root: Path, shard_files: list[Path], summary: IndexSummary | None) -> tuple[TensorTable, bool]:
    """Every tensor of the shards, reading one header at a time and dropping it once its tensors are
    recorded (a checkpoint of 300k tensors would otherwise hold every parsed header at once); and
    whether each shard holds just the names the index maps to it, as far as their count and digest
    tell (always True without an index).

    Raises:
        CheckpointError: a malformed header, or a tensor stored in two shards (reported after every
            header is read, as the first one found).
    """
    expected: dict[Path, tuple[int, int]] = {}
    if summary is not None:
        # Two names of one file ("a" and "./a") are one shard: their entries add up.
        for shard, (count, digest) in summary.shards.items():
            seen_count, seen_digest = expected.get(_shard_path(root, shard), (0, 0))
            expected[_shard_path(root, shard)] = (seen_count + count, (seen_digest + digest) & DIGEST_MASK)
    tensors = TensorTable(sum(count for count, _ in expected.values()))
    twice = None
    agree = True
    for path in dict.fromkeys(shard_files):
        header = read_header(path)
        if summary is not None:
            agree = agree and expected[path] == (len(header.tensors), name_digest(header.tensors))
        found = tensors.add_shard(path, header.data_start, header.tensors.values())
        if found is not None and twice is None:
            name, other = found
            twice = f"{path}: tensor {name!r} is also stored in {tensors.tensor(other).file.name}"
    if twice:
        raise CheckpointError(twice)
    return tensors, agree


def _check_index(root: Path, index_path: Path, summary: IndexSummary, tensors: TensorTable) -> None:
    """Refuse an index entry whose shard lacks its tensor, the first in the index's order.

    Taken when a shard's count or digest of names differs from the index's: it holds a tensor the
    index does not name (kept, as the header is what is read), or lacks one it does.

    Raises:
        CheckpointError: naming the index, the tensor and the shard.
    """
    for name, shard in weight_map_entries(index_path, summary):
        found = tensors.get(name)
        if found is None or found.file != _shard_path(root, shard):
            raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {shard}, which lacks it")


def _shard_path(root: Path, shard: str) -> Path:
    return root / PurePosixPath(shard)


def _read_config(root: Path) -> dict | None:
    path = root / CONFIG_NAME
    return read_config(path) if path.exists() else None


def read_config(path: Path) -> dict:
    """config.json at `path`, with the fields fusemoe-ckpt reads type-checked.

    Raises:
        CheckpointError: not a regular file, not a JSON object, or a field of the wrong type.
    """
    config = read_json(path, what=CONFIG_NAME)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    check_config_fields(config, path)
    return config


def check_config_fields(config: dict, path: Path) -> None:
    """Refuse a config.json field fusemoe-ckpt reads that has the wrong type (null is absent).

    Raises:
        CheckpointError: naming config.json and the key, with what it must be.
    """
    expect(config, "model_type", str, "a string", path)
    architectures = expect(config, "architectures", list, "a list of class names", path)
    if architectures is not None and not all(isinstance(a, str) for a in architectures):
        raise CheckpointError(f"{path}: architectures is {shorten(architectures)}, not a list of class names")
    for key in ("dtype", "torch_dtype"):
        expect(config, key, str, "a dtype name", path)
    expect(config, "quantization_config", dict, "a JSON object", path)
    text_config = expect(config, "text_config", dict, "a JSON object", path)
    for scope, prefix in ((config, ""), (text_config or {}, "text_config.")):
        for key in CONFIG_COUNTS:
            expect(scope, key, int, "a whole number", path, prefix=prefix)
