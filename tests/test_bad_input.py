"""Bad input to `convert`: one line on stderr naming the file or key, exit 1, nothing written anywhere."""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fusemoe_ckpt import FAMILIES
from fusemoe_ckpt.cli import cli

from .conftest import HIDDEN, INTERMEDIATE, QWEN3_CONFIG, expert_tensors, write_checkpoint

INDEX = "model.safetensors.index.json"
SHARD_1 = "model-00001-of-00003.safetensors"
SHARD_2 = "model-00002-of-00003.safetensors"
EXPERTS_0 = "model.layers.0.mlp.experts"
EXPERTS_1 = "model.layers.1.mlp.experts"


# --- helpers ---------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` with its type, mtime and, for files, its bytes."""
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
        state[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode), info.st_mtime_ns, content)
    return state


def partial_of(dst: Path) -> Path:
    """The hidden sibling convert writes into before renaming it to `dst`."""
    return dst.parent / f".{dst.name}.fusemoe-partial"


def one_line_error(result: Result, exit_code: int = 1) -> str:
    """The single `Error: ` line of a failed run, without its prefix (`exit_code` 2 for a usage error)."""
    assert result.exit_code == exit_code, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stderr == lines[0] + "\n"
    assert lines[0].startswith("Error: "), lines[0]
    return lines[0].removeprefix("Error: ")


def refuse(tmp_path: Path, src: Path, dst: Path, *options: str, exit_code: int = 1) -> str:
    """Run `convert SRC DST`, check it fails cleanly and changes nothing under `tmp_path`; the message."""
    before = snapshot(tmp_path)
    dst_existed, partial_existed = os.path.lexists(dst), os.path.lexists(partial_of(dst))
    result = CliRunner().invoke(cli, ["convert", str(src), str(dst), *options])
    message = one_line_error(result, exit_code)
    assert os.path.lexists(dst) == dst_existed
    assert os.path.lexists(partial_of(dst)) == partial_existed
    assert snapshot(tmp_path) == before
    return message


def shard_bytes(header: bytes | dict, data: bytes = b"") -> bytes:
    """A safetensors file from a raw or JSON header and a data buffer, with no validation at all."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def entry(start: int, end: int, *, dtype: str = "F32", shape: tuple[int, ...] = (2,)) -> dict:
    """One header entry; the default is two F32 values, 8 bytes."""
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}


def edit_weight_map(src: Path, edit: Callable[[dict[str, str]], None]) -> Path:
    """Apply `edit` to the index's weight_map in place; the index path."""
    index_path = src / INDEX
    index = json.loads(index_path.read_text())
    edit(index["weight_map"])
    index_path.write_text(json.dumps(index))
    return index_path


def qwen_source(tmp_path: Path, tensors: dict[str, torch.Tensor] | None = None, **kwargs) -> Path:
    """A three-shard Qwen3-MoE checkpoint at tmp_path/src (by default two layers of four experts)."""
    kwargs.setdefault("config", QWEN3_CONFIG)
    return write_checkpoint(tmp_path / "src", expert_tensors() if tensors is None else tensors, shards=3, **kwargs)


# --- the source directory and its index ------------------------------------------------------------


@pytest.mark.parametrize("exists", [True, False], ids=["empty-dir", "no-dir"])
def test_no_index_and_no_single_file(tmp_path, exists):
    """A directory with neither an index nor model.safetensors (or no directory) is refused."""
    src = tmp_path / "src"
    if exists:
        src.mkdir()
    message = refuse(tmp_path, src, tmp_path / "dst")
    if exists:
        assert message == f"{src}: no {INDEX} or model.safetensors found"
    else:
        assert message == f"{src}: source is not a directory"


def test_index_names_a_missing_shard(tmp_path):
    """An index naming a shard file that does not exist names that file."""
    src = qwen_source(tmp_path)
    (src / SHARD_2).unlink()
    assert refuse(tmp_path, src, tmp_path / "dst") == f"{src / SHARD_2}: shard file not found"


def test_shard_that_is_a_directory(tmp_path):
    """A shard path that is a directory is not read as a shard."""
    src = qwen_source(tmp_path)
    (src / SHARD_2).unlink()
    (src / SHARD_2).mkdir()
    assert refuse(tmp_path, src, tmp_path / "dst") == f"{src / SHARD_2}: not a regular file"


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "{tmp}/outside.safetensors",
        "nested/../../outside.safetensors",
        "..\\outside.safetensors",
        "~/outside.safetensors",
    ],
    ids=["dot-dot", "absolute", "nested-dot-dot", "backslash", "home"],
)
def test_index_entry_outside_source(tmp_path, name):
    """Index entries that leave SRC are refused even when the file they point at is a valid shard."""
    src = qwen_source(tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((src / SHARD_2).read_bytes())
    name = name.format(tmp=tmp_path)
    index = edit_weight_map(src, lambda wm: wm.update({k: name for k, v in wm.items() if v == SHARD_2}))
    assert refuse(tmp_path, src, tmp_path / "dst") == f"{index}: shard name {name!r} points outside {src}"


@pytest.mark.parametrize("key_elsewhere", [True, False], ids=["key-in-other-shard", "key-in-no-shard"])
def test_index_maps_a_key_to_a_shard_that_lacks_it(tmp_path, key_elsewhere):
    """An index entry whose shard does not hold the key names the key and the shard."""
    src = qwen_source(tmp_path)
    key = "model.embed_tokens.weight" if key_elsewhere else "model.not_stored.weight"
    index = edit_weight_map(src, lambda wm: wm.update({key: SHARD_2}))
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message == f"{index}: tensor {key!r} is mapped to {SHARD_2}, which lacks it"


def test_same_key_in_two_shards(tmp_path):
    """A key stored in two shards names the key and both files."""
    src = qwen_source(tmp_path)
    key = "model.embed_tokens.weight"
    assert key in load_file(src / SHARD_1)
    second = load_file(src / SHARD_2) | {key: torch.zeros(8, HIDDEN)}
    save_file(second, src / SHARD_2, metadata={"format": "pt"})
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message == f"{src / SHARD_2}: tensor {key!r} is also stored in {SHARD_1}"


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "'weight_map' must map tensor names to shard file names"),
        ('{"weight_map": {"a": 1}}', "'weight_map' must map tensor names to shard file names"),
    ],
    ids=["not-json", "not-object", "non-string-shard"],
)
def test_malformed_index(tmp_path, text, phrase):
    """An index that is not JSON, or whose weight_map is not names to files, names the index."""
    src = qwen_source(tmp_path)
    (src / INDEX).write_text(text)
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message.startswith(f"{src / INDEX}: ")
    assert phrase in message


def test_malformed_config(tmp_path):
    """A config.json that is not JSON names config.json."""
    src = qwen_source(tmp_path)
    (src / "config.json").write_text("{model_type: qwen3_moe")
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message.startswith(f"{src / 'config.json'}: not valid JSON")


# --- shard headers ----------------------------------------------------------------------------------

_DUPLICATE = b'{"w": %s, "w": %s}' % ((json.dumps(entry(0, 8)).encode(),) * 2)

# (file bytes, what the message must say, whether safetensors itself refuses the file too)
HEADER_CASES = {
    "shorter-than-8-bytes": (b"\x01\x02\x03", "truncated: 3 bytes, shorter than the 8-byte header length", True),
    "header-past-end": (
        struct.pack("<Q", 1000) + b"{}",
        "truncated: header length 1000 runs past the end of the 10-byte file",
        True,
    ),
    "header-too-large": (
        struct.pack("<Q", 100_000_001) + b"{}",
        "header length 100000001 exceeds the 100000000-byte limit",
        True,
    ),
    "not-json": (shard_bytes(b"not json"), "header is not valid UTF-8 JSON: Expecting value", True),
    "not-utf8": (shard_bytes(b'{"\xff": 1}'), "header is not valid UTF-8 JSON: 'utf-8' codec can't decode", True),
    "not-an-object": (shard_bytes(b"[]"), "header is not a JSON object", True),
    # safetensors (serde) keeps the last of duplicate keys; we refuse the ambiguity.
    "duplicate-key": (shard_bytes(_DUPLICATE, bytes(8)), "header names tensor 'w' twice", False),
    "bad-metadata": (shard_bytes({"__metadata__": {"format": 1}}), "__metadata__ must map strings to strings", True),
    # Found by tests/test_fuzz.py: a falsy non-object used to pass as "no metadata".
    "metadata-false": (shard_bytes({"__metadata__": False}), "__metadata__ must map strings to strings", True),
    "unknown-dtype": (
        shard_bytes({"w": entry(0, 8, dtype="F128")}, bytes(8)),
        "tensor 'w': unknown dtype 'F128'",
        True,
    ),
    "negative-shape": (
        shard_bytes({"w": entry(0, 8, shape=(-1,))}, bytes(8)),
        "tensor 'w': shape [-1] is not a list of sizes",
        True,
    ),
    "offsets-not-a-pair": (
        shard_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, bytes(8)),
        "tensor 'w': data_offsets [0] is not [start, end]",
        True,
    ),
    "offsets-past-end": (
        shard_bytes({"w": entry(0, 16)}, bytes(8)),
        "tensor 'w': data_offsets [0, 16] outside the 8-byte data buffer",
        True,
    ),
    "offsets-reversed": (
        shard_bytes({"w": entry(8, 0)}, bytes(8)),
        "tensor 'w': data_offsets [8, 0] outside the 8-byte data buffer",
        True,
    ),
    "overlap": (
        shard_bytes({"a": entry(0, 8), "b": entry(4, 12)}, bytes(12)),
        "tensor 'b' overlaps the tensor before it",
        True,
    ),
    # Entries listed out of offset order are checked in offset order, as safetensors does.
    "overlap-listed-in-reverse": (
        shard_bytes({"b": entry(4, 12), "a": entry(0, 8)}, bytes(12)),
        "tensor 'b' overlaps the tensor before it",
        True,
    ),
    "gap-listed-in-reverse": (
        shard_bytes({"b": entry(12, 20), "a": entry(0, 8)}, bytes(20)),
        "tensor 'b' starts at 12, leaving a gap after 8",
        True,
    ),
    "size-not-dtype-times-shape": (
        shard_bytes({"w": entry(0, 8, shape=(3,))}, bytes(8)),
        "tensor 'w': 8 bytes but F32 [3] needs 12",
        True,
    ),
    "gap": (
        shard_bytes({"a": entry(0, 8), "b": entry(12, 20)}, bytes(20)),
        "tensor 'b' starts at 12, leaving a gap after 8",
        True,
    ),
    "trailing-bytes": (
        shard_bytes({"a": entry(0, 8)}, bytes(12)),
        "tensors cover 8 bytes but the data buffer holds 12 (truncated or padded file)",
        True,
    ),
    # After an entry of the same dtype and shape: true and 2.0 equal 1 and 2 (and hash alike), no sizes.
    "bool-shape-after-its-twin": (
        shard_bytes(
            {"a": entry(0, 4, shape=(1,)), "b": {"dtype": "F32", "shape": [True], "data_offsets": [4, 8]}}, bytes(8)
        ),
        "tensor 'b': shape [True] is not a list of sizes",
        True,
    ),
    "float-shape-after-its-twin": (
        shard_bytes({"a": entry(0, 8), "b": {"dtype": "F32", "shape": [2.0], "data_offsets": [8, 16]}}, bytes(16)),
        "tensor 'b': shape [2.0] is not a list of sizes",
        True,
    ),
    "bool-offset-after-its-twin": (
        shard_bytes(
            {"a": entry(0, 4, shape=(1,)), "b": {"dtype": "F32", "shape": [1], "data_offsets": [True, 5]}}, bytes(8)
        ),
        "tensor 'b': data_offsets [True, 5] is not [start, end]",
        True,
    ),
    "size-after-its-twin": (
        shard_bytes({"a": entry(0, 8), "b": entry(8, 12)}, bytes(12)),
        "tensor 'b': 4 bytes but F32 [2] needs 8",
        True,
    ),
}


@pytest.mark.parametrize(("data", "phrase"), [case[:2] for case in HEADER_CASES.values()], ids=list(HEADER_CASES))
def test_malformed_shard_header(tmp_path, data, phrase):
    """A malformed header in one shard of three names that shard and what is wrong with it."""
    src = qwen_source(tmp_path)
    (src / SHARD_2).write_bytes(data)
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message.startswith(f"{src / SHARD_2}: {phrase}"), message


@pytest.mark.parametrize(
    "data", [case[0] for case in HEADER_CASES.values() if case[2]], ids=[k for k, v in HEADER_CASES.items() if v[2]]
)
def test_safetensors_refuses_the_same_headers(tmp_path, data):
    """The oracle: safetensors itself refuses these files, so refusing them is not over-strict."""
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorError), safe_open(path, "pt") as f:
        list(f.keys())


def test_unbroken_crafted_header_is_accepted(tmp_path):
    """The crafting helpers make a file safetensors accepts when nothing is broken."""
    path = tmp_path / "good.safetensors"
    path.write_bytes(shard_bytes({"a": entry(0, 8), "b": entry(8, 16)}, bytes(16)))
    with safe_open(path, "pt") as f:
        assert sorted(f.keys()) == ["a", "b"]


# --- expert groups ----------------------------------------------------------------------------------


def _drop(*prefixes: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        for key in [k for k in tensors if k.startswith(prefixes)]:
            del tensors[key]

    return edit


def _drop_matching(layer_prefix: str, projection: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        for key in [k for k in tensors if k.startswith(layer_prefix) and f".{projection}." in k]:
            del tensors[key]

    return edit


@pytest.mark.parametrize(
    ("edit", "missing"),
    [
        (_drop(f"{EXPERTS_0}.2."), f"{EXPERTS_0}.2.gate_proj.weight"),
        (_drop(f"{EXPERTS_0}.2.up_proj."), f"{EXPERTS_0}.2.up_proj.weight"),
        (_drop(f"{EXPERTS_1}.1.down_proj."), f"{EXPERTS_1}.1.down_proj.weight"),
        # The last expert: nothing after it shows the gap, only its siblings and the other layer.
        (_drop(f"{EXPERTS_1}.3.down_proj."), f"{EXPERTS_1}.3.down_proj.weight"),
        (_drop(f"{EXPERTS_0}.3."), f"{EXPERTS_0}.3.gate_proj.weight"),
    ],
    ids=["whole-expert-2", "one-up_proj", "one-down_proj", "last-expert-down_proj", "last-expert-of-one-layer"],
)
def test_missing_expert_is_named(tmp_path, edit, missing):
    """An expert group with an expert missing names the missing key."""
    tensors = expert_tensors()
    edit(tensors)
    src = qwen_source(tmp_path, tensors)
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message.startswith(f"{missing}: missing"), message


@pytest.mark.parametrize(
    ("projection", "phrase"),
    [
        ("gate_proj", "no tensor matches 'mlp.experts.*.gate_proj.weight' (family qwen2_moe)"),
        ("up_proj", "no tensor matches 'mlp.experts.*.up_proj.weight' (family qwen2_moe)"),
        ("down_proj", "down_proj"),
    ],
    ids=["gate_proj", "up_proj", "down_proj"],
)
def test_missing_projection_of_a_layer(tmp_path, projection, phrase):
    """A layer whose experts all lack one projection is refused, naming the layer's experts."""
    tensors = expert_tensors()
    _drop_matching(f"{EXPERTS_0}.", projection)(tensors)
    src = qwen_source(tmp_path, tensors)
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message.startswith(f"{EXPERTS_0}."), message
    assert phrase in message


def _replace(key: str, tensor: torch.Tensor) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[key] = tensor

    return edit


def _every(projection: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        for key in [k for k in tensors if f".{projection}." in k]:
            tensors[key] = change(tensors[key])

    return edit


def _rename_expert(old: str, new: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        for key in [k for k in tensors if k.startswith(old)]:
            tensors[new + key.removeprefix(old)] = tensors.pop(key)

    return edit


def _duplicate_expert(old: str, new: str) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        for key in [k for k in tensors if k.startswith(old)]:
            tensors[new + key.removeprefix(old)] = tensors[key].clone()

    return edit


_GATE_0 = f"{EXPERTS_0}.0.gate_proj.weight"


@pytest.mark.parametrize(
    ("edit", "key", "phrase"),
    [
        (
            _replace(f"{EXPERTS_0}.1.gate_proj.weight", torch.zeros(INTERMEDIATE + 1, HIDDEN)),
            f"{EXPERTS_0}.1.gate_proj.weight",
            f"F32 [4, 4] differs from {_GATE_0}: F32 [3, 4]",
        ),
        (
            _replace(f"{EXPERTS_1}.2.down_proj.weight", torch.zeros(HIDDEN, INTERMEDIATE, dtype=torch.float16)),
            f"{EXPERTS_1}.2.down_proj.weight",
            f"F16 [4, 3] differs from {EXPERTS_1}.0.down_proj.weight: F32 [4, 3]",
        ),
        (
            _every("up_proj", lambda tensor: tensor.to(torch.bfloat16)),
            f"{EXPERTS_0}.0.up_proj.weight",
            f"BF16 [3, 4] cannot be concatenated with {_GATE_0}: F32 [3, 4]",
        ),
        (
            _every("up_proj", lambda tensor: torch.zeros(INTERMEDIATE, HIDDEN + 1)),
            f"{EXPERTS_0}.0.up_proj.weight",
            f"F32 [3, 5] cannot be concatenated with {_GATE_0}: F32 [3, 4]",
        ),
        (
            _rename_expert(f"{EXPERTS_0}.1.", f"{EXPERTS_0}.one."),
            f"{EXPERTS_0}.one.down_proj.weight",
            "expert index 'one' is not a number",
        ),
        (
            _duplicate_expert(f"{EXPERTS_0}.1.", f"{EXPERTS_0}.01."),
            f"{EXPERTS_0}.1.down_proj.weight",
            f"expert 1 of {EXPERTS_0}.down_proj appears twice (also {EXPERTS_0}.01.down_proj.weight)",
        ),
        (
            _replace(f"{EXPERTS_0}.0.gate_proj.weight_scale_inv", torch.ones(1, 1)),
            f"{EXPERTS_0}.0.gate_proj.weight_scale_inv",
            "per-expert tensor that family qwen2_moe does not fuse",
        ),
    ],
    ids=[
        "shape-differs",
        "dtype-differs",
        "gate-up-dtypes-differ",
        "gate-up-widths-differ",
        "non-numeric-expert-id",
        "expert-id-twice",
        "unfused-per-expert-tensor",
    ],
)
def test_inconsistent_expert_group(tmp_path, edit, key, phrase):
    """Experts that cannot be stacked into one tensor name the offending key and the difference."""
    tensors = expert_tensors()
    edit(tensors)
    src = qwen_source(tmp_path, tensors)
    assert refuse(tmp_path, src, tmp_path / "dst").startswith(f"{key}: {phrase}")


# --- the destination --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "phrase"),
    [
        ("src/converted", "destination is inside the source"),
        ("src/a/b", "destination is inside the source"),
        ("src", "destination is inside the source"),
        (".", "destination contains the source"),
    ],
    ids=["inside", "deep-inside", "equal", "parent"],
)
def test_destination_overlapping_source(tmp_path, where, phrase):
    """DST inside, equal to or containing SRC is refused before anything is read or written."""
    src = qwen_source(tmp_path)
    dst = (tmp_path / where).resolve()
    assert refuse(tmp_path, src, dst) == f"{dst}: {phrase} {src}"


def test_non_empty_destination_needs_overwrite(tmp_path):
    """A non-empty DST is left alone without --overwrite, and the message names the option."""
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    message = refuse(tmp_path, src, dst)
    assert message == f"{dst}: exists and is not empty; pass --overwrite to replace it"


def test_non_empty_destination_with_overwrite_is_replaced(tmp_path):
    """With --overwrite a non-empty DST is replaced by the conversion and nothing is left beside it."""
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "stale.safetensors").write_bytes(b"old")
    before = snapshot(src)
    result = CliRunner().invoke(cli, ["convert", "-q", str(src), str(dst), "--overwrite"])
    assert (result.exit_code, result.output) == (0, "")
    assert not (dst / "stale.safetensors").exists()
    assert (dst / INDEX).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "src"]
    assert snapshot(src) == before


def test_leftover_partial_is_reported_not_reused(tmp_path):
    """A leftover `.DST.fusemoe-partial` is named and left as it is; DST is not created."""
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    partial = partial_of(dst)
    partial.mkdir()
    (partial / SHARD_1).write_bytes(b"half")
    message = refuse(tmp_path, src, dst)
    assert message == (
        f"{partial}: left by an interrupted conversion; pass --resume to continue it, "
        "--overwrite to start over, or remove it"
    )


# --- family and options -----------------------------------------------------------------------------


# Of several families with the same expert patterns, the hint names the first in the table.
MATCHING_HINT = {"qwen2_moe": ["qwen2_moe"], "mixtral": ["mixtral", "kimi_linear"]}


def same_keys_as(name: str) -> list[str]:
    """The families the hint names for checkpoints with family `name`'s expert keys."""
    return MATCHING_HINT[name]


MIXTRAL_KEYS = {"prefix": "model.layers.{layer}.block_sparse_moe.experts.{expert}.", "names": ("w1", "w3", "w2")}


@pytest.mark.parametrize(
    ("layout", "reference"),
    [({}, "qwen2_moe"), (MIXTRAL_KEYS, "mixtral"), ({"names": ("wi", "wj", "wo")}, None)],
    ids=["qwen-keys", "mixtral-keys", "no-matching-keys"],
)
def test_unknown_model_type_without_family(tmp_path, layout, reference):
    """A model_type with no rule asks for --family and lists the families whose patterns match."""
    src = qwen_source(tmp_path, expert_tensors(**layout), config={"model_type": "nosuch_moe"})
    message = refuse(tmp_path, src, tmp_path / "dst")
    if reference is None:
        hint = "no family's expert keys match this checkpoint"
    else:
        matching = same_keys_as(reference)
        assert reference in matching
        hint = f"families whose expert keys match this checkpoint: {', '.join(matching)}"
    assert message == f"{src}: model_type 'nosuch_moe' has no family rule; pass --family NAME ({hint})"


def test_no_config_without_family(tmp_path):
    """Without config.json and --family the message names both and the matching families."""
    src = qwen_source(tmp_path, config=None)
    message = refuse(tmp_path, src, tmp_path / "dst")
    assert message.startswith(f"{src}: no config.json")
    matching = ", ".join(same_keys_as("qwen2_moe"))
    assert message.endswith(f"pass --family NAME (families whose expert keys match this checkpoint: {matching})")


def test_unknown_family_lists_known_ones(tmp_path):
    """`--family nosuch` names the bad family and every known one."""
    src = qwen_source(tmp_path)
    message = refuse(tmp_path, src, tmp_path / "dst", "--family", "nosuch")
    known = ", ".join(sorted(family.name for family in FAMILIES))
    assert message == f"unknown family 'nosuch'; known families: {known}"


NOT_A_SIZE = "is not a number of bytes or a number followed by TB, GB, MB or KB"
BAD_SIZES = {
    "abc": NOT_A_SIZE,
    "5XB": NOT_A_SIZE,
    "1.5": NOT_A_SIZE,
    "nanGB": NOT_A_SIZE,
    "infGB": NOT_A_SIZE,
    "0": "must be positive",
    "-1GB": "must be positive",
}


@pytest.mark.parametrize(("value", "phrase"), BAD_SIZES.items(), ids=list(BAD_SIZES))
def test_bad_max_shard_size(tmp_path, value, phrase):
    """A --max-shard-size that is not a positive size names the value."""
    src = qwen_source(tmp_path)
    message = refuse(tmp_path, src, tmp_path / "dst", "--max-shard-size", value, exit_code=2)
    assert message == f"max shard size {value!r} {phrase}"


@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_workers(tmp_path, value):
    """--workers below 1 is refused rather than silently replaced by the default."""
    src = qwen_source(tmp_path)
    message = refuse(tmp_path, src, tmp_path / "dst", "--workers", value, exit_code=2)
    assert message == f"workers must be at least 1, not {value}"


# --- --debug ----------------------------------------------------------------------------------------


def test_debug_prints_the_traceback(tmp_path):
    """With --debug the same error comes with its traceback and chained cause, still exit 1."""
    src = qwen_source(tmp_path)
    (src / SHARD_2).write_bytes(shard_bytes(b"not json"))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, ["--debug", "convert", str(src), str(tmp_path / "dst")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "json.decoder.JSONDecodeError" in result.stderr
    assert "fusemoe_ckpt.errors.CheckpointError" in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"Error: {src / SHARD_2}: header is not valid UTF-8 JSON")
    assert snapshot(tmp_path) == before
