"""One parser for every JSON document: not-JSON constants, deep nesting and fields of the wrong type
are refused in one line naming the document (and key); shapes are checked as safetensors checks them."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from fusemoe_ckpt.cli import cli
from fusemoe_ckpt.errors import CheckpointError, ManifestError, printable
from fusemoe_ckpt.reading.json_document import MAX_DEPTH, nesting_depth, parse_json
from fusemoe_ckpt.reading.safetensors_format import read_header

from .conftest import QWEN3_CONFIG, expert_tensors
from .test_bad_input import INDEX, SHARD_2, entry, one_line_error, qwen_source, refuse, shard_bytes
from .test_hostile import no_hang  # noqa: F401 - a fixture

DEEP = "[" * 100_000 + "]" * 100_000

# --- the parser itself ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        ("1", 0),
        ("[]", 1),
        ('{"a": [1, {"b": []}]}', 4),
        ('["[[[[", "}}}"]', 1),  # brackets inside strings do not count
        ('["\\"[[[", "\\\\", "[\\\\"]', 1),  # nor after escaped quotes and backslashes
        ('[["x"], "[", ["y"]]', 2),
        ("[" * 64 + "]" * 64, 64),
        (DEEP, 100_000),
        ("[{" * 40 + "}]" * 40, 80),  # arrays and objects alternating
        ("[" * 100_000, 100_000),  # unbalanced: every unclosed bracket counts
    ],
)
def test_nesting_depth(text, depth):
    assert nesting_depth(text.encode()) == depth


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": NaN}', "where: not valid JSON: NaN is not a JSON value"),
        ("[Infinity]", "where: not valid JSON: Infinity is not a JSON value"),
        ("[-Infinity]", "where: not valid JSON: -Infinity is not a JSON value"),
        (DEEP, f"where: not valid JSON: nested more than {MAX_DEPTH} levels deep"),
        ("[" * 100_000, f"where: not valid JSON: nested more than {MAX_DEPTH} levels deep"),
        ('{"a": 1,\n "b": }', "where: not valid JSON: Expecting value at line 2 column 7"),
        ('{"a" 1}', "where: not valid JSON: Expecting ':' delimiter at column 6"),
        ('{"a": "\\ud800\\u"}', "where: not valid JSON: Invalid \\uXXXX escape at column 15"),
    ],
)
def test_parse_json_refuses_in_one_line(text, message):
    with pytest.raises(CheckpointError) as caught:
        parse_json(text.encode(), "where")
    assert str(caught.value) == message


def test_parse_json_raises_the_callers_class_and_duplicate_message():
    with pytest.raises(ManifestError, match=r"^m:3: field 'dst' is given twice$"):
        parse_json(
            b'{"dst": "a", "dst": "b"}',
            "m:3",
            error=ManifestError,
            on_duplicate=lambda k: f"field {k!r} is given twice",
        )
    assert parse_json(b'{"a": 1, "a": 2}', "where") == {"a": 2}  # without on_duplicate: the last, as json does


# --- shard headers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "phrase"),
    [
        (b'{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', "NaN is not a JSON value"),
        (b'{"__metadata__": {"format": Infinity}}', "Infinity is not a JSON value"),
        (b'{"w": ' + b"[" * 5000 + b"]" * 5000 + b"}", f"nested more than {MAX_DEPTH} levels deep"),
    ],
    ids=["nan", "infinity", "deep"],
)
def test_header_that_is_not_json_as_safetensors_reads_it(tmp_path, header, phrase):
    src = qwen_source(tmp_path)
    (src / SHARD_2).write_bytes(shard_bytes(header, bytes(8)))
    assert refuse(tmp_path, src, tmp_path / "dst") == f"{src / SHARD_2}: header is not valid UTF-8 JSON: {phrase}"
    with pytest.raises(Exception, match="invalid JSON|overflow|recursion"):
        safe_open(src / SHARD_2, "np")


# (shape, whether safetensors accepts it): its check multiplies dimensions in order, from 1, in a usize.
SHAPES = [
    ([0, 2**64], False),
    ([2**32, 2**32, 0], False),
    ([2**61, 8, 0], False),  # 2**64 elements before the 0
    ([0, 2**32, 2**32], True),
    ([0, 2**63], True),
    ([2**61, 0], True),  # 2**61 elements of 4 bytes are 2**66 bits, but there are none
    ([2**64 - 1, 0], True),
]


@pytest.mark.parametrize(("shape", "accepted"), SHAPES, ids=[str(s) for s, _ in SHAPES])
def test_shapes_are_checked_as_safetensors_checks_them(tmp_path, shape, accepted):
    """A zero-size tensor whose dimensions overflow used to be accepted, and written into a shard
    safetensors cannot open."""
    path = tmp_path / "x.safetensors"
    path.write_bytes(shard_bytes({"w": entry(0, 0, shape=tuple(shape))}))
    try:
        with safe_open(path, "np") as f:
            assert list(f.get_slice("w").get_shape()) == shape
        theirs = True
    except Exception:  # noqa: BLE001 - safetensors' own error types
        theirs = False
    assert theirs == accepted
    if accepted:
        assert read_header(path).tensors["w"].shape == tuple(shape)
    else:
        with pytest.raises(CheckpointError) as caught:
            read_header(path)
        assert str(caught.value) == (
            f"{path}: tensor 'w': shape {shape} overflows a 64-bit size (safetensors refuses it too)"
        )


def test_a_source_with_an_overflowing_shape_is_refused(tmp_path):
    src = qwen_source(tmp_path)
    (src / SHARD_2).write_bytes(shard_bytes({"w": entry(0, 0, shape=(0, 2**64))}))
    assert refuse(tmp_path, src, tmp_path / "dst") == (
        f"{src / SHARD_2}: tensor 'w': shape [0, 18446744073709551616] overflows a 64-bit size "
        "(safetensors refuses it too)"
    )


# --- the index and config.json ----------------------------------------------------------------------


@pytest.mark.parametrize("name", [INDEX, "config.json"])
@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ('{"weight_map": {}, "x": NaN}', "not valid JSON: NaN is not a JSON value"),
        (f'{{"weight_map": {{}}, "x": {DEEP}}}', f"not valid JSON: nested more than {MAX_DEPTH} levels deep"),
    ],
    ids=["nan", "deep"],
)
def test_index_and_config_that_are_not_json(tmp_path, name, text, phrase):
    """A deeply nested index or config.json used to end in a bare RecursionError."""
    src = qwen_source(tmp_path)
    (src / name).write_text(text)
    assert refuse(tmp_path, src, tmp_path / "dst") == f"{src / name}: {phrase}"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"model_type": ["qwen3_moe"]}, "model_type is ['qwen3_moe'], not a string"),
        ({"architectures": 5}, "architectures is 5, not a list of class names"),
        ({"architectures": [5]}, "architectures is [5], not a list of class names"),
        ({"num_experts": "4"}, "num_experts is '4', not a whole number"),
        ({"num_experts": True}, "num_experts is True, not a whole number"),
        ({"text_config": {"hidden_size": 4.0}}, "text_config.hidden_size is 4.0, not a whole number"),
        ({"text_config": []}, "text_config is [], not a JSON object"),
        ({"torch_dtype": ["bfloat16"]}, "torch_dtype is ['bfloat16'], not a dtype name"),
        ({"quantization_config": "fp8"}, "quantization_config is 'fp8', not a JSON object"),
    ],
    ids=[
        "model_type-list",
        "architectures-number",
        "architectures-of-numbers",
        "count-string",
        "count-bool",
        "text_config-float",
        "text_config-list",
        "dtype-list",
        "quantization-string",
    ],
)
def test_config_fields_of_the_wrong_type_are_named(tmp_path, config, message):
    """model_type as a list or architectures as a number used to reach the user as a bare TypeError."""
    src = qwen_source(tmp_path, config=QWEN3_CONFIG | config)
    assert refuse(tmp_path, src, tmp_path / "dst") == f"{src / 'config.json'}: {message}"


def test_a_long_wrong_value_is_cut_short_in_the_message(tmp_path):
    src = qwen_source(tmp_path, config=QWEN3_CONFIG | {"architectures": list(range(1000))})
    message = refuse(tmp_path, src, tmp_path / "dst")
    cut = "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16..."
    assert message == f"{src / 'config.json'}: architectures is {cut}, not a list of class names"


def test_index_metadata_that_is_not_an_object(tmp_path):
    src = qwen_source(tmp_path)
    index = json.loads((src / INDEX).read_text())
    (src / INDEX).write_text(json.dumps(index | {"metadata": [1]}))
    assert refuse(tmp_path, src, tmp_path / "dst") == f"{src / INDEX}: metadata is [1], not a JSON object"


# --- tensor names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("digit", ["١", "²", "𝟙", "1\u200b"], ids=["arabic-indic", "superscript", "math", "zero-width"])
def test_expert_ids_are_ascii_digits(tmp_path, digit):
    """'²' used to end in `ValueError: invalid literal for int()`, and '١' was read as expert 1."""
    tensors = expert_tensors(layers=1, experts=2)
    renamed = {k.replace(".experts.1.", f".experts.{digit}."): v for k, v in tensors.items()}
    src = qwen_source(tmp_path, renamed)
    message = refuse(tmp_path, src, tmp_path / "dst")
    key = next(k for k in sorted(renamed) if f".experts.{digit}." in k)
    # The CLI escapes what is not printable (the zero-width space), so the key cannot hide it.
    assert message == printable(f"{key}: expert index {digit!r} is not a number")


def test_a_tensor_named_by_a_lone_superscript_digit_sorts(tmp_path):
    """Natural order compares ASCII numbers as numbers and everything else as text: a key '²' is text."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(shard_bytes({"²": entry(0, 8), "1": entry(8, 16)}, bytes(16)))
    (src / "config.json").write_text(json.dumps(QWEN3_CONFIG))
    result = CliRunner().invoke(cli, ["convert", "-q", str(src), str(tmp_path / "dst")])
    assert (result.exit_code, result.output) == (0, "")


# --- the manifest and the journal -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"src": "a", "dst": "b", "workers": NaN}', "{m}:1: not valid JSON: NaN is not a JSON value"),
        (
            '{"src": "a", "dst": "b", "x": ' + DEEP + "}",
            f"{{m}}:1: not valid JSON: nested more than {MAX_DEPTH} levels deep",
        ),
        ('{"src": "a", "dst": "b", "dst": "c"}', "{m}:1: field 'dst' is given twice"),
    ],
    ids=["nan", "deep", "duplicate"],
)
def test_manifest_lines_that_are_not_json(tmp_path, line, message):
    manifest = tmp_path / "zoo.jsonl"
    manifest.write_text(line + "\n")
    result = CliRunner().invoke(cli, ["batch", str(manifest)])
    assert one_line_error(result, exit_code=2) == message.format(m=manifest)


def test_a_manifest_that_is_a_fifo_is_refused_without_blocking(tmp_path, no_hang):  # noqa: F811
    manifest = tmp_path / "zoo.jsonl"
    os.mkfifo(manifest)
    result = CliRunner().invoke(cli, ["batch", str(manifest)])
    assert one_line_error(result, exit_code=2) == f"{manifest}: not a regular file"


def test_a_journal_line_that_is_not_json_ends_what_resume_keeps(tmp_path):
    """A journal is ours, but read after a crash: a line with NaN or deep nesting is where it was cut."""
    from fusemoe_ckpt.write.journal import JOURNAL_NAME

    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    partial = tmp_path / ".dst.fusemoe-partial"
    partial.mkdir()
    header = {"fusemoe_journal": 1, "fingerprint": "x", "durable": True}
    (partial / JOURNAL_NAME).write_text(json.dumps(header) + "\n" + DEEP + "\n")
    result = CliRunner().invoke(cli, ["convert", "-q", "--resume", str(src), str(dst)])
    assert one_line_error(result).startswith(f"{partial}: was written from a different source")


def test_dst_index_of_the_wrong_type_makes_resume_start_over(tmp_path):
    """`convert --resume` into a DST whose index has tampered provenance: not this conversion."""
    src = qwen_source(tmp_path)
    dst = tmp_path / "dst"
    assert CliRunner().invoke(cli, ["convert", "-q", str(src), str(dst)]).exit_code == 0
    index = json.loads((dst / INDEX).read_text())
    index["metadata"]["fusemoe_ckpt_dtype"] = {"x": 1}
    (dst / INDEX).write_text(json.dumps(index))
    result = CliRunner().invoke(cli, ["convert", "-q", "--resume", str(src), str(dst)])
    assert one_line_error(result) == f"{dst}: exists and is not empty; pass --overwrite to replace it"
