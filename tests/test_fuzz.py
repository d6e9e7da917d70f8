"""Property-based tests: whatever the header or checkpoint, the parser and the planner either succeed
with a result that holds together or raise our own error, never anything else."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from fusemoe_ckpt import FusemoeError, family_by_name, open_checkpoint, plan_conversion, plan_for
from fusemoe_ckpt.batch.manifest import FIELDS, load_manifest
from fusemoe_ckpt.errors import CheckpointError, ManifestError
from fusemoe_ckpt.reading.safetensors_format import DTYPE_SIZES, TensorInfo, encode_header, read_header

SETTINGS = settings(derandomize=True, max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = sorted(DTYPE_SIZES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- the header parser ------------------------------------------------------------------------------

junk = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4), st.integers(-5, 5))
entries = st.one_of(
    junk,
    st.fixed_dictionaries(
        {
            "dtype": st.one_of(st.sampled_from(DTYPES), junk),
            "shape": st.one_of(st.lists(st.one_of(st.integers(-1, 4), junk), max_size=3), junk),
            "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-1, 64), junk), max_size=3), junk),
        }
    ),
)
headers = st.dictionaries(st.one_of(st.text(max_size=6), st.just("__metadata__")), entries, max_size=4)


@st.composite
def well_formed(draw) -> tuple[dict, int]:
    """A header whose tensors tile their data buffer: the parser must accept these unless mutated."""
    header, position = {}, 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = DTYPE_SIZES[dtype] * math.prod(shape)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + size]}
        position += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    return header, position


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """`data` unchanged, cut short, with one byte changed, or with a different length prefix."""
    kind = draw(st.sampled_from(["none", "truncate", "flip", "length"]))
    if kind == "truncate" or (kind == "flip" and not data):
        return data[: draw(st.integers(0, len(data)))]
    if kind == "flip":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    return data


def parse(workdir: Path, data: bytes):
    path = workdir / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        return path, read_header(path)
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: ")
        assert "\n" not in str(e)
        return path, None


def check_accepted(path: Path, header) -> None:
    """An accepted header tiles its data buffer with tensors of dtype x shape bytes, and safetensors
    itself reads the file the same way."""
    position = 0
    for info in sorted(header.tensors.values(), key=lambda t: t.start):
        assert info.start == position
        assert info.nbytes == DTYPE_SIZES[info.dtype] * math.prod(info.shape)
        position = info.end
    assert header.data_start + position == path.stat().st_size
    with safe_open(path, "np") as f:
        assert sorted(f.keys()) == sorted(header.tensors)
        for name, info in header.tensors.items():
            assert tuple(f.get_slice(name).get_shape()) == info.shape


@SETTINGS
@given(st.binary(max_size=96))
def test_random_bytes(workdir, data):
    parse(workdir, data)


@SETTINGS
@given(headers, st.integers(0, 80), st.data())
def test_random_headers(workdir, header, data_len, data):
    body = json.dumps(header).encode()
    raw = data.draw(mutations(struct.pack("<Q", len(body)) + body + bytes(data_len)))
    path, parsed = parse(workdir, raw)
    if parsed is not None:
        check_accepted(path, parsed)


@SETTINGS
@given(well_formed(), st.data())
def test_mutated_well_formed_headers(workdir, header_and_size, data):
    header, size = header_and_size
    body = json.dumps(header).encode()
    original = struct.pack("<Q", len(body)) + body + bytes(size)
    raw = data.draw(mutations(original))
    path, parsed = parse(workdir, raw)
    if raw == original:
        assert parsed is not None
    if parsed is not None:
        check_accepted(path, parsed)


# --- the planner ------------------------------------------------------------------------------------

PROJECTIONS = ["gate_proj", "up_proj", "down_proj", "gate_proj.weight_scale_inv"]
keys = st.builds(
    "model.layers.{}.mlp.experts.{}.{}".format,
    st.sampled_from(["0", "1"]),
    st.sampled_from(["0", "1", "2", "01", "x"]),
    st.sampled_from([f"{p}.weight" if "." not in p else p for p in PROJECTIONS]),
) | st.sampled_from(["model.embed_tokens.weight", "model.layers.0.mlp.experts.gate_up_proj", "lm_head.weight"])
tensor_specs = st.tuples(st.sampled_from(["F32", "BF16", "F16"]), st.sampled_from([(3, 4), (4, 3), (4, 4), (2,)]))


@st.composite
def checkpoints(draw) -> dict[str, tuple[str, tuple[int, ...]]]:
    """A complete per-expert checkpoint, then none to three random edits: a key dropped, a key's
    dtype or shape changed, a stray key added (gaps, 1 beside 01, ids like x, scales, fused keys)."""
    dtype = draw(st.sampled_from(["F32", "BF16"]))
    hidden, intermediate = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    tensors = {"model.embed_tokens.weight": (dtype, (8, hidden))}
    for layer in range(draw(st.integers(1, 2))):
        for expert in range(draw(st.integers(1, 3))):
            prefix = f"model.layers.{layer}.mlp.experts.{expert}."
            tensors[prefix + "gate_proj.weight"] = (dtype, (intermediate, hidden))
            tensors[prefix + "up_proj.weight"] = (dtype, (intermediate, hidden))
            tensors[prefix + "down_proj.weight"] = (dtype, (hidden, intermediate))
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["drop", "retype", "add"]))
        if edit == "add":
            tensors[draw(keys)] = draw(tensor_specs)
        elif len(tensors) > 1:
            key = draw(st.sampled_from(sorted(tensors)))
            if edit == "drop":
                del tensors[key]
            else:
                tensors[key] = draw(tensor_specs)
    return tensors


configs = st.one_of(
    st.none(),
    st.fixed_dictionaries({"model_type": st.just("qwen3_moe"), "num_experts": st.integers(-1, 4)}),
    st.just("not json"),
)


def write_fuzzed_checkpoint(root: Path, tensors: dict, config, index_edit: str | None) -> None:
    """Tensors split over two shards with an index, written with our own encoder and zero data."""
    root.mkdir()
    weight_map = {}
    names = sorted(tensors)
    for i, part in enumerate((names[::2], names[1::2])):
        infos, position = [], 0
        for name in part:
            dtype, shape = tensors[name]
            size = DTYPE_SIZES[dtype] * math.prod(shape)
            infos.append(TensorInfo(name, dtype, shape, position, position + size))
            position += size
        filename = f"model-{i + 1:05d}-of-00002.safetensors"
        (root / filename).write_bytes(encode_header(infos, {"format": "pt"}) + bytes(position))
        weight_map |= dict.fromkeys(part, filename)
    first = names[0]
    if index_edit == "wrong-shard":
        weight_map[first] = (
            "model-00002-of-00002.safetensors"
            if weight_map[first].startswith("model-00001")
            else ("model-00001-of-00002.safetensors")
        )
    elif index_edit == "outside":
        weight_map[first] = "../" + weight_map[first]
    elif index_edit == "extra-key":
        weight_map["model.not_stored.weight"] = weight_map[first]
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    if config is not None:
        (root / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))


counter = iter(range(10**9))


INDEX_EDITS = st.sampled_from([None, None, "wrong-shard", "outside", "extra-key"])


@SETTINGS
@given(checkpoints(), configs, INDEX_EDITS, st.integers(1, 600))
def test_planner_returns_a_consistent_plan_or_our_error(workdir, tensors, config, index_edit, max_shard_size):
    """Random expert keys (gaps, duplicates as 1 and 01, non-numeric ids, scales, mixed shapes and
    dtypes, fused and unfused side by side), bad configs and bad index entries."""
    root = workdir / f"ckpt{next(counter)}"
    write_fuzzed_checkpoint(root, tensors, config, index_edit)
    try:
        source = open_checkpoint(root)
        plan = plan_conversion(source, family_by_name("qwen2_moe"), max_shard_size=max_shard_size)
    except FusemoeError as e:
        assert "\n" not in str(e)
        return
    # Every source byte lands exactly once in the output, within a file that holds it.
    assert plan.total_size == source.total_bytes
    sizes = {path: path.stat().st_size for path in source.shard_files}
    for shard in plan.shards:
        assert shard.data_size <= max_shard_size or len(shard.tensors) == 1 or _one_module(shard)
        # The planned header is itself a valid safetensors header for the planned data.
        written = workdir / "planned.safetensors"
        written.write_bytes(shard.header + bytes(shard.data_size))
        parsed = read_header(written)
        assert [parsed.tensors[t.name].shape for t in shard.tensors] == [t.shape for t in shard.tensors]
        for tensor in shard.tensors:
            assert sum(p.length for p in tensor.pieces) == tensor.nbytes
            for piece in tensor.pieces:
                assert piece.offset >= 0 and piece.offset + piece.length <= sizes[piece.file]
    assert set(plan.tensor_to_filename) == {t.name for s in plan.shards for t in s.tensors}


def _one_module(shard) -> bool:
    """A module's fused tensors are kept together even when together they exceed the limit."""
    return len({t.name.rpartition(".")[0] for t in shard.tensors}) == 1


# --- the index, config.json and the manifest: every JSON document goes through one parser ----------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12,
)


@st.composite
def json_documents(draw, value) -> bytes:
    """`value` as JSON text (floats may come out as NaN or Infinity, which are not JSON), then maybe
    cut short, a byte changed, or wrapped in brackets nested past any sane depth."""
    raw = json.dumps(draw(value)).encode()
    kind = draw(st.sampled_from(["none", "none", "truncate", "flip", "deep"]))
    if kind == "truncate":
        return raw[: draw(st.integers(0, len(raw)))]
    if kind == "flip" and raw:
        at = draw(st.integers(0, len(raw) - 1))
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    if kind == "deep":
        depth = draw(st.integers(60, 5000))
        return b"[" * depth + raw + b"]" * draw(st.sampled_from([depth, 0]))
    return raw


def assert_one_line(error: FusemoeError, folder: Path) -> None:
    """One line; naming the document or its folder when it names a path first (else a key or field)."""
    assert "\n" not in str(error)
    assert str(error).startswith(str(folder)) or not str(error).startswith("/"), str(error)


@pytest.fixture(scope="module")
def valid_source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("valid") / "src"
    write_fuzzed_checkpoint(root, {"model.embed_tokens.weight": ("F32", (2, 2))}, None, None)
    return root


INDEX_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "weight_map": json_values | st.just({"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}),
        "metadata": json_values,
    },
)


@SETTINGS
@given(json_documents(json_values | INDEX_FIELDS))
def test_random_index_documents(valid_source, document):
    """Any index text: the source opens, or our error names the index in one line (never a bare
    RecursionError, TypeError or KeyError)."""
    index = valid_source / "model.safetensors.index.json"
    index.write_bytes(document)
    try:
        open_checkpoint(valid_source)
    except FusemoeError as e:
        assert_one_line(e, valid_source)


CONFIG_FIELDS = st.fixed_dictionaries(
    {"model_type": st.just("qwen3_moe") | json_values},
    optional={
        name: json_values
        for name in (
            "architectures",
            "num_experts",
            "hidden_size",
            "text_config",
            "torch_dtype",
            "dtype",
            "quantization_config",
            "auto_map",
        )
    },
)


@SETTINGS
@given(json_documents(CONFIG_FIELDS | json_values), st.booleans())
def test_random_configs(workdir, document, dequantize):
    """Any config.json, fields of any type: planned, or our one-line error."""
    root = workdir / f"config{next(counter)}"
    tensors = {
        f"model.layers.0.mlp.experts.0.{p}.weight": ("F32", (2, 2)) for p in ("gate_proj", "up_proj", "down_proj")
    }
    write_fuzzed_checkpoint(root, tensors, None, None)
    (root / "config.json").write_bytes(document)
    try:
        plan_for(root, dequantize=dequantize)
    except FusemoeError as e:
        assert_one_line(e, root)


MANIFEST_FIELDS = st.dictionaries(
    st.sampled_from([*FIELDS, "unknown"]),
    json_values | st.sampled_from(["./a", "org/name", "5GB", "bfloat16"]),
    max_size=5,
)


@SETTINGS
@given(st.lists(json_documents(MANIFEST_FIELDS | json_values) | st.sampled_from([b"", b"# note"]), max_size=4))
def test_random_manifests(workdir, lines):
    """Any manifest: entries, or a ManifestError naming the file (and line) in one line."""
    manifest = workdir / "zoo.jsonl"
    manifest.write_bytes(b"\n".join(line.replace(b"\n", b" ") for line in lines))
    try:
        entries = load_manifest(manifest)
    except ManifestError as e:
        assert "\n" not in str(e)
        assert str(e).startswith(f"{manifest}:") or str(e).startswith(f"{manifest}: ")
        return
    assert entries and all(entry.dst.is_absolute() for entry in entries)
