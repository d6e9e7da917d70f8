"""The index read chunk by chunk accepts and refuses exactly what the whole-document read does, with
the same messages, and hands on the same entries in the same order; opening a checkpoint through it
keeps every error of the index against its headers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fusemoe_ckpt.errors import CheckpointError
from fusemoe_ckpt.reading.index_scan import (
    DIGEST_MASK,
    IndexScan,
    name_digest,
    read_index,
    read_index_metadata,
    summarize_index,
    weight_map_entries,
)
from fusemoe_ckpt.reading.source import open_checkpoint

# Small chunks put a chunk boundary inside names, escapes, numbers and between key and value.
CHUNK_SIZES = (1, 2, 3, 5, 7, 16, 61, 1 << 20)

_MAP = {"model.a.weight": "s1.safetensors", "model.b.weight": "s2.safetensors"}


def _doc(weight_map: object = None, **fields: object) -> str:
    return json.dumps({**fields, "weight_map": _MAP if weight_map is None else weight_map}, indent=2)


ACCEPTED = {
    "pretty": _doc(metadata={"total_size": 12}),
    "compact": json.dumps({"metadata": {"total_size": 1}, "weight_map": _MAP}, separators=(",", ":")),
    "map-first": json.dumps({"weight_map": _MAP, "metadata": {"x": [1, 2.5e3, True, None]}}),
    "map-between": json.dumps({"a": -12345, "weight_map": _MAP, "b": "x"}),
    "no-metadata": json.dumps({"weight_map": _MAP}),
    "metadata-null": json.dumps({"weight_map": _MAP, "metadata": None}),
    "number-last": '{"weight_map": {"a": "s"}, "n": 1234567890}',
    "whitespace": ' \t\r\n{ \n"weight_map"\t:\r{ "a" \n: \t"s" ,\r\n"b":"t"\n}\n,"metadata" : { } } \n\t',
    "escapes": json.dumps({"weight_map": {'q"uote': "s", "back\\slash": "s", "sl/ash\b\f\n\r\t": "t\\u", "\x7f": "s"}}),
    "unicode-escaped": json.dumps({"weight_map": {"é😀\u2028": "s😀", "\udc80lone": "s"}}),
    "unicode-raw": json.dumps({"weight_map": {"é😀\u2028": "s😀", "x": "é"}}, ensure_ascii=False),
    "escaped-slash-and-u": '{"weight_map": {"a\\/b\\u0041\\ud83d\\ude00": "s\\u00e9"}}',
    "unsorted": json.dumps({"weight_map": {"z": "s1", "a": "s2", "m": "s1"}}),
    "repeated-name": '{"weight_map": {"a": "s1", "b": "s2", "a": "s2"}}',
    "repeated-name-sorted": '{"weight_map": {"a": "s1", "a": "s2", "b": "s2"}}',
    "repeated-map": '{"weight_map": {"x": "s9"}, "metadata": {}, "weight_map": {"a": "s1"}}',
    "map-after-number": '{"weight_map": 5, "weight_map": {"a": "s1"}}',
    "map-after-bad-map": '{"weight_map": {"a": 1}, "weight_map": {"a": "s1"}}',
    "repeated-metadata": '{"metadata": 1, "weight_map": {"a": "s"}, "metadata": {"k": 2}}',
    "deep-metadata": json.dumps({"weight_map": _MAP, "metadata": {"k": [[[[[[[[[[[]]]]]]]]]]]}}),
    "depth-64": '{"weight_map": {"a": "s"}, "m": ' + "[" * 63 + "]" * 63 + "}",
    "long-name": json.dumps({"weight_map": {"n" * 70_000: "s", "b": "s"}}),
}

REFUSED = {
    "not-json": "{not json",
    "empty": "",
    "truncated": '{"weight_map": {"a": "s"',
    "truncated-string": '{"weight_map": {"a": "s',
    "array": "[]",
    "empty-object": "{}",
    "no-weight-map": '{"metadata": {}}',
    "map-not-object": '{"weight_map": ["a", "s"]}',
    "non-string-shard": '{"weight_map": {"a": 1}}',
    "null-shard": '{"weight_map": {"a": "s", "b": null}}',
    "empty-map": '{"weight_map": {}}',
    "empty-map-last": '{"weight_map": {"a": "s"}, "weight_map": {}}',
    "bad-map-last": '{"weight_map": {"a": "s"}, "weight_map": 5}',
    "metadata-not-object": '{"weight_map": {"a": "s"}, "metadata": [1]}',
    "nan": '{"weight_map": {"a": "s"}, "metadata": {"x": NaN}}',
    "infinity": '{"metadata": {"x": Infinity}, "weight_map": {"a": "s"}}',
    "minus-infinity": '{"weight_map": {"a": "s"}, "metadata": {"x": [-Infinity]}}',
    "nan-shard": '{"weight_map": {"a": NaN}}',
    "too-deep": '{"weight_map": {"a": "s"}, "m": ' + "[" * 64 + "]" * 64 + "}",
    "too-deep-in-map": '{"weight_map": {"a": ' + "[" * 63 + "]" * 63 + "}}",
    "trailing-data": '{"weight_map": {"a": "s"}} x',
    "two-documents": '{"weight_map": {"a": "s"}}{}',
    "trailing-comma-map": '{"weight_map": {"a": "s",}}',
    "trailing-comma-object": '{"weight_map": {"a": "s"},}',
    "missing-colon": '{"weight_map": {"a" "s"}}',
    "single-quotes": "{'weight_map': {'a': 's'}}",
    "control-in-name": '{"weight_map": {"a\tb": "s"}}',
    "newline-in-shard": '{"weight_map": {"a": "s\n"}}',
    "bad-escape": '{"weight_map": {"a\\x": "s"}}',
    "short-u-escape": '{"weight_map": {"a\\u12": "s"}}',
    "form-feed-space": '{"weight_map":\f{"a": "s"}}',
    "bom": '\ufeff{"weight_map": {"a": "s"}}',
    "number-key": '{"weight_map": {1: "s"}}',
    "leading-zero": '{"weight_map": {"a": "s"}, "n": 01}',
}


def _old(path: Path) -> tuple:
    try:
        weight_map, metadata = read_index(path)
    except CheckpointError as e:
        return ("refused", str(e))
    return ("accepted", list(weight_map.items()), metadata)


def _scanned(path: Path, chunk_size: int) -> tuple:
    try:
        summary = summarize_index(path, chunk_size=chunk_size)
        scan = IndexScan(path, chunk_size=chunk_size)
        entries = list(scan)
    except CheckpointError as e:
        return ("refused", str(e))
    assert scan.metadata == summary.metadata
    if summary.in_scan_order:
        assert scan.entries == len(entries)
        return ("accepted", entries, summary.metadata)
    return ("accepted", list(weight_map_entries(path, summary)), summary.metadata)


def _metadata_only(path: Path, chunk_size: int) -> dict | str:
    try:
        return read_index_metadata(path, chunk_size=chunk_size)
    except CheckpointError as e:
        return str(e)


def _stats(entries: list[tuple[str, str]]) -> dict[str, tuple[int, int]]:
    counts = Counter(shard for _, shard in entries)
    return {shard: (n, name_digest(name for name, s in entries if s == shard)) for shard, n in counts.items()}


def _check_same(tmp_path: Path, raw: bytes) -> tuple:
    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(raw)
    old = _old(path)
    for chunk_size in CHUNK_SIZES:
        assert _scanned(path, chunk_size) == old, chunk_size
        assert _metadata_only(path, chunk_size) == (old[2] if old[0] == "accepted" else old[1])
    if old[0] == "accepted":
        assert summarize_index(path, chunk_size=5).shards == _stats(old[1])
    return old


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_index_gives_the_same_entries(tmp_path, name):
    outcome = _check_same(tmp_path, ACCEPTED[name].encode())
    assert outcome[0] == "accepted"
    # The names decode as json decodes them: compared with json.loads on the same text.
    assert outcome[1] == [(k, v) for k, v in json.loads(ACCEPTED[name])["weight_map"].items()]


@pytest.mark.parametrize("name", REFUSED)
def test_refused_index_gives_the_same_message(tmp_path, name):
    outcome = _check_same(tmp_path, REFUSED[name].encode())
    assert outcome[0] == "refused"
    assert outcome[1].startswith(f"{tmp_path / 'model.safetensors.index.json'}: ")


@pytest.mark.parametrize(
    "raw",
    [b'{"weight_map": {"a": "\xff"}}', b'{"weight_map": {"\xc3": "s"}}', b'{"weight_map": {"a": "s"}}\xe2\x82'],
    ids=["invalid-byte", "cut-sequence", "cut-at-end"],
)
def test_not_utf8_gives_the_same_message(tmp_path, raw):
    assert _check_same(tmp_path, raw)[1].endswith("not valid UTF-8: " + str(_decode_error(raw)))


def _decode_error(raw: bytes) -> UnicodeDecodeError:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return e
    raise AssertionError("valid UTF-8")


def test_every_split_of_an_escaped_entry(tmp_path):
    """A boundary at every character: inside the name, inside each escape, between key and value."""
    text = '{"weight_map": {"pl\\u00e9ain": "s", "x\\ud83d\\ude00\\"y" :\n "s\\/2", "z": "s"}, "m": 12}'
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(text)
    expected = list(json.loads(text)["weight_map"].items())
    for chunk_size in range(1, len(text) + 1):
        assert list(IndexScan(path, chunk_size=chunk_size)) == expected


def test_repeated_names_are_read_as_json_reads_them(tmp_path):
    """json keeps a repeated key's last value at its first place; the shard it named first is no shard."""
    path = tmp_path / "model.safetensors.index.json"
    path.write_text('{"weight_map": {"b": "gone.safetensors", "a": "s1", "b": "s2"}}')
    summary = summarize_index(path)
    assert not summary.in_scan_order
    assert set(summary.shards) == {"s1", "s2"}
    assert list(weight_map_entries(path, summary)) == [("b", "s2"), ("a", "s1")]


def test_sorted_names_are_read_in_one_pass(tmp_path):
    path = tmp_path / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": {f"t{i:03d}": f"s{i % 3}" for i in range(300)}}))
    scan = IndexScan(path, chunk_size=64)
    assert len(list(scan)) == 300
    assert scan.in_order and scan.single_map


@settings(max_examples=60, deadline=None)
@given(
    weight_map=st.dictionaries(st.text(max_size=8), st.sampled_from(["s1", "é/s2", 'q"3']), max_size=8),
    extra=st.dictionaries(
        st.text(max_size=4), st.recursive(st.none() | st.integers() | st.text(max_size=4), st.lists), max_size=3
    ),
    map_first=st.booleans(),
    indent=st.sampled_from([None, 0, 2, "\t"]),
    ensure_ascii=st.booleans(),
    chunk_size=st.sampled_from([1, 3, 8, 1 << 20]),
)
def test_generated_index_agrees(tmp_path_factory, weight_map, extra, map_first, indent, ensure_ascii, chunk_size):
    fields = {"weight_map": weight_map, **extra} if map_first else {**extra, "weight_map": weight_map}
    path = tmp_path_factory.mktemp("index") / "model.safetensors.index.json"
    path.write_text(json.dumps(fields, indent=indent, ensure_ascii=ensure_ascii), encoding="utf-8")
    assert _scanned(path, chunk_size) == _old(path)


def test_digest_is_order_independent_and_64_bit():
    names = [f"model.layers.{i}.weight" for i in range(50)]
    assert name_digest(names) == name_digest(reversed(names)) <= DIGEST_MASK
    assert name_digest(names) != name_digest(names[:-1])


# --- opening a checkpoint: the index against the headers --------------------------------------------


def _source(tmp_path: Path, weight_map_text: str) -> Path:
    """Shards s1 (a, b) and s2 (c), and the index text given."""
    src = tmp_path / "src"
    src.mkdir(parents=True)
    save_file({"a": torch.zeros(1), "b": torch.ones(1)}, src / "s1.safetensors")
    save_file({"c": torch.full((1,), 2.0)}, src / "s2.safetensors")
    (src / "model.safetensors.index.json").write_text('{"weight_map": {' + weight_map_text + "}}")
    return src


def _refusal(src: Path) -> str:
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(src)
    return str(e.value)


@pytest.mark.parametrize(
    "entries",
    ['"a": "s1", "b": "s1", "c": "s2"', '"c": "s2", "b": "s1", "a": "s1"'],
    ids=["sorted", "unsorted"],
)
def test_index_that_matches_its_headers(tmp_path, entries):
    entries = entries.replace('"s1"', '"s1.safetensors"').replace('"s2"', '"s2.safetensors"')
    source = open_checkpoint(_source(tmp_path, entries))
    assert {name: t.file.name for name, t in source.tensors.items()} == {
        "a": "s1.safetensors",
        "b": "s1.safetensors",
        "c": "s2.safetensors",
    }
    assert [p.name for p in source.shard_files] == ["s1.safetensors", "s2.safetensors"]


@pytest.mark.parametrize(
    ("entries", "first", "shard"),
    [
        ('"a": "s2", "b": "s1", "c": "s2", "d": "s1"', "a", "s2"),
        ('"c": "s2", "d": "s2", "b": "s1", "a": "s2"', "d", "s2"),
    ],
    ids=["sorted", "unsorted"],
)
def test_first_entry_its_shard_lacks_in_index_order(tmp_path, entries, first, shard):
    src = _source(tmp_path, entries.replace('"s1"', '"s1.safetensors"').replace('"s2"', '"s2.safetensors"'))
    index = src / "model.safetensors.index.json"
    assert _refusal(src) == f"{index}: tensor {first!r} is mapped to {shard}.safetensors, which lacks it"


def test_header_tensor_the_index_does_not_name_is_kept(tmp_path):
    """As before: the header is what is read; the index only has to hold no entry a shard lacks."""
    source = open_checkpoint(_source(tmp_path, '"a": "s1.safetensors", "c": "s2.safetensors"'))
    assert sorted(source.tensors) == ["a", "b", "c"]


def test_repeated_name_counts_its_last_shard(tmp_path):
    src = _source(
        tmp_path,
        '"a": "missing.safetensors", "b": "s1.safetensors", "c": "s2.safetensors", "a": "s1.safetensors"',
    )
    assert sorted(open_checkpoint(src).tensors) == ["a", "b", "c"]
    src = _source(
        tmp_path / "2", '"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors", "a": "s2.safetensors"'
    )
    assert (
        _refusal(src)
        == f"{src / 'model.safetensors.index.json'}: tensor 'a' is mapped to s2.safetensors, which lacks it"
    )


def test_one_shard_under_two_names(tmp_path):
    """'s1' and './s1' are one file: the entries of both count for it."""
    source = open_checkpoint(_source(tmp_path, '"a": "s1.safetensors", "b": "./s1.safetensors", "c": "s2.safetensors"'))
    assert sorted(source.tensors) == ["a", "b", "c"]


@pytest.mark.parametrize(
    "bad", [None, "\\x", "\\u12", "\\\t"], ids=["valid", "unknown-escape", "short-u", "escaped-tab"]
)
def test_many_escaped_names(tmp_path, bad):
    """Runs of names with escapes are decoded a batch at a time; a bad escape in the middle of one is
    refused as a whole-document read refuses it."""
    names = [f'layer.{i}.\\u00e9\\"x\\\\' for i in range(2000)]
    if bad is not None:
        names[1234] += bad
    text = '{"weight_map": {' + ", ".join(f'"{name}": "s{i % 3}"' for i, name in enumerate(names)) + "}}"
    outcome = _check_same(tmp_path, text.encode())
    assert outcome[0] == ("accepted" if bad is None else "refused")
