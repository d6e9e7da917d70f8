"""Open a source checkpoint: its index, its shard headers and its config, all validated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import CheckpointError
from .json_document import expect, read_json, shorten
from .quantization import Scales
from .safetensors_format import ShardHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# Numbers of config.json (or of its text_config) that planning reads.
EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
CONFIG_COUNTS = ("hidden_size", "zero_expert_num", *EXPERT_COUNT_FIELDS)


class SourceTensor:
    """Where one source tensor's bytes live: `name`, `dtype`, `shape`, `file`, `offset`, `nbytes`, and
    `scales`, set on a quantized weight planned dequantized (`dtype` is then the dtype it becomes).

    Immutable. What the experts of a shard have in common (dtype, shape, file, size) is one shared
    tuple, a tensor holding only its name, offset and that tuple: 56 bytes instead of 120 with its
    size, at 300k tensors 19 MB less.
    """

    __slots__ = ("name", "offset", "_kind")

    name: str
    offset: int
    _kind: tuple[str, tuple[int, ...], Path, int, Scales | None]

    def __init__(
        self,
        name: str,
        dtype: str,
        shape: tuple[int, ...],
        file: Path,
        offset: int,
        nbytes: int,
        scales: Scales | None = None,
        *,
        kinds: dict | None = None,
    ) -> None:
        """`kinds`: where tensors of one checkpoint find the kind tuple they share."""
        kind = (dtype, shape, file, nbytes, scales)
        if kinds is not None:
            kind = kinds.setdefault(kind, kind)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "offset", offset)
        object.__setattr__(self, "_kind", kind)

    dtype = property(lambda self: self._kind[0])
    shape = property(lambda self: self._kind[1])
    file = property(lambda self: self._kind[2])
    nbytes = property(lambda self: self._kind[3])
    scales = property(lambda self: self._kind[4])

    def replace(self, **changes: object) -> SourceTensor:
        """A copy with `changes` (field names as the constructor's)."""
        return SourceTensor(**{**dict(zip(_FIELDS, self._values(), strict=True)), **changes})

    def _values(self) -> tuple:
        dtype, shape, file, nbytes, scales = self._kind
        return self.name, dtype, shape, file, self.offset, nbytes, scales

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"SourceTensor is immutable: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SourceTensor):
            return NotImplemented
        return (self.name, self.offset, self._kind) == (other.name, other.offset, other._kind)

    def __hash__(self) -> int:
        return hash((self.name, self.offset, self._kind))

    def __reduce__(self):
        return SourceTensor, self._values()

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={v!r}" for f, v in zip(_FIELDS, self._values(), strict=True))
        return f"SourceTensor({fields})"


_FIELDS = ("name", "dtype", "shape", "file", "offset", "nbytes", "scales")


@dataclass
class SourceCheckpoint:
    """Everything convert needs to know about a source checkpoint, read from headers alone."""

    root: Path
    index_file: Path | None
    shard_files: list[Path]
    tensors: dict[str, SourceTensor]
    config: dict | None = None
    index_metadata: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


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
        weight_map, index_metadata = read_index(index_path)
        shard_names = sorted(set(weight_map.values()))
        if SINGLE_NAME not in shard_names and os.path.lexists(root / SINGLE_NAME):
            raise CheckpointError(both_layouts(root))
        shard_files = [resolve_inside(root, index_path, name) for name in shard_names]
    elif (root / SINGLE_NAME).exists():
        weight_map, index_metadata, index_path = None, {}, None
        shard_files = [root / SINGLE_NAME]
    else:
        raise CheckpointError(f"{root}: no {INDEX_NAME} or {SINGLE_NAME} found")

    tensors = _collect_tensors(root, shard_files, weight_map)
    if weight_map:
        # What is left names a tensor its shard lacks: the first, in the index's order.
        name, shard = next(iter(weight_map.items()))
        raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {shard}, which lacks it")
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


def read_index(index_path: Path) -> tuple[dict[str, str], dict]:
    """The weight map and the metadata (an empty dict where there is none) of a safetensors index.

    Raises:
        CheckpointError: not a regular file, not JSON, a weight map that is not names to files, or
            metadata that is not an object.
    """
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    if not weight_map:
        raise CheckpointError(f"{index_path}: 'weight_map' lists no tensors")
    return weight_map, expect(index, "metadata", dict, "a JSON object", index_path) or {}


def resolve_inside(root: Path, index_path: Path, name: str) -> Path:
    """The shard path for an index entry, refusing names that leave the checkpoint directory.

    The check is on the name, not on the resolved file, so the symlinks of the Hub cache layout
    (snapshot files pointing into a blobs directory) keep working.
    """
    pure = PurePosixPath(name)
    if not name or pure.is_absolute() or "\\" in name or ".." in pure.parts or name.startswith("~"):
        raise CheckpointError(f"{index_path}: shard name {name!r} points outside {root}")
    return root / pure


def _collect_tensors(root: Path, shard_files: list[Path], weight_map: dict[str, str] | None) -> dict[str, SourceTensor]:
    """Every tensor of the shards, reading one header at a time and dropping it once its tensors are
    recorded (a checkpoint of 300k tensors would otherwise hold every parsed header at once).

    Each entry of `weight_map` that its shard holds is removed from it, so what is left names a
    tensor its shard lacks.

    Raises:
        CheckpointError: a malformed header, or a tensor stored in two shards (reported after every
            header is read, as the first one found).
    """
    files_of: dict[Path, set[str]] = {path: set() for path in shard_files}
    if weight_map is not None:
        for shard in set(weight_map.values()):
            files_of.setdefault(_shard_path(root, shard), set()).add(shard)
    tensors: dict[str, SourceTensor] = {}
    kinds: dict = {}
    twice = None
    for path in dict.fromkeys(shard_files):
        header = read_header(path)
        names = files_of[path]
        for name, info in header.tensors.items():
            if name in tensors:
                twice = twice or f"{path}: tensor {name!r} is also stored in {tensors[name].file.name}"
                continue
            tensors[name] = _source_tensor(header, info, kinds)
            if weight_map is not None and weight_map.get(name) in names:
                del weight_map[name]
    if twice:
        raise CheckpointError(twice)
    return tensors


def _source_tensor(header: ShardHeader, info: TensorInfo, kinds: dict) -> SourceTensor:
    return SourceTensor(
        info.name, info.dtype, info.shape, header.path, header.data_start + info.start, info.nbytes, kinds=kinds
    )


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
