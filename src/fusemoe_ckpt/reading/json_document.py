"""The one JSON parser for every document fusemoe-ckpt reads: shard headers, indexes, config.json,
the batch manifest, journals and results.

Every document is untrusted input, and Python's `json` is lenient where the peers are not: it takes
`NaN` and `Infinity` (not JSON; safetensors refuses them) and recurses once per nesting level, so a
deep enough `[[[[...` raises RecursionError. Here those are refused in one line that names the
document, and the fields a caller uses are checked for type, naming the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, FusemoeError
from .files import open_regular

# Deeper than any document read here needs (a config.json nests a few levels, a header three), and far
# below the depth at which the parser's recursion could fail.
MAX_DEPTH = 64
# Largest index, config.json or manifest read into memory; a real one is a few megabytes at most.
MAX_DOCUMENT_BYTES = 100_000_000

_NOT_STRUCTURE = bytes(range(256)).translate(None, b'"[]{}')
# Objects nest as arrays do: one kind of bracket makes each pass below peel exactly one level.
_ONE_KIND = bytes.maketrans(b"{}", b"[]")


class _Refused(ValueError):
    """Raised inside the parser's hooks with the rest of the message; the document is named outside."""


def parse_json(
    raw: bytes,
    where: object,
    *,
    error: type[FusemoeError] = CheckpointError,
    subject: str = "not valid JSON",
    on_duplicate: Callable[[str], str] | None = None,
) -> Any:
    """The JSON value of the UTF-8 document `raw`, or `error` naming `where` in one line.

    Args:
        where: the document as messages name it (a path, or `path:line`).
        error: the class to raise: CheckpointError for a source, ManifestError for a manifest, ...
        subject: what the message says before the detail ("header is not valid UTF-8 JSON").
        on_duplicate: the message for a key that appears twice in one object; None keeps the last
            value, as `json` and transformers do.
    """
    if nesting_depth(raw) > MAX_DEPTH:
        raise error(f"{where}: {subject}: nested more than {MAX_DEPTH} levels deep")

    def refuse_constant(name: str) -> None:
        raise _Refused(f"{subject}: {name} is not a JSON value")

    def unique(pairs: list[tuple[str, object]]) -> dict:
        # A header has an object per tensor: build each at once, and look for the duplicate only if one is there.
        document = dict(pairs)
        if len(document) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise _Refused(on_duplicate(key))
                seen.add(key)
        return document

    try:
        return json.loads(
            raw.decode("utf-8"),
            parse_constant=refuse_constant,
            object_pairs_hook=unique if on_duplicate is not None else None,
        )
    except _Refused as e:
        raise error(f"{where}: {e}") from e
    except json.JSONDecodeError as e:
        at = f"line {e.lineno} column {e.colno}" if "\n" in e.doc.rstrip() else f"column {e.colno}"
        raise error(f"{where}: {subject}: {e.msg} at {at}") from e
    except (UnicodeDecodeError, RecursionError) as e:
        raise error(f"{where}: {subject}: {e}") from e


def read_json(
    path: Path,
    *,
    error: type[FusemoeError] = CheckpointError,
    what: str = "file",
    on_duplicate: Callable[[str], str] | None = None,
) -> Any:
    """The JSON document in the regular file at `path`: never blocking on a FIFO or a device, never
    reading more than MAX_DOCUMENT_BYTES, refused as `parse_json` refuses.

    Raises:
        error: missing, not a regular file, too large, not UTF-8, or not JSON; naming `path`.
    """
    return parse_json(read_document(path, error=error, what=what), path, error=error, on_duplicate=on_duplicate)


def read_document(
    path: Path, *, error: type[FusemoeError] = CheckpointError, what: str = "file", follow_links: bool = True
) -> bytes:
    """The bytes of the small regular file at `path`, checked to be UTF-8.

    Raises:
        error: missing, not a regular file (or a link, unless `follow_links`), larger than
            MAX_DOCUMENT_BYTES, or not UTF-8.
    """
    fd, st = open_regular(path, what=what, error=error, follow_links=follow_links)
    with os.fdopen(fd, "rb") as f:
        if st.st_size > MAX_DOCUMENT_BYTES:
            raise error(f"{path}: {st.st_size} bytes, more than the {MAX_DOCUMENT_BYTES}-byte limit")
        # At most one byte past the size fstat saw (and never past the limit): read() allocates
        # what it is asked for before it reads.
        raw = f.read(min(st.st_size, MAX_DOCUMENT_BYTES) + 1)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not valid UTF-8: {e}") from e
    return raw


def nesting_depth(raw: bytes) -> int:
    """How deeply the arrays and objects of the JSON text `raw` nest (brackets inside strings do not
    count); past MAX_DEPTH, or for unbalanced text, at least the depth the parser would recurse to.

    Runs at the speed of bytes methods, not of a Python loop: a header of 140,000 tensors takes a few
    percent of the time `json.loads` takes.
    """
    if b"\\" in raw:
        # Escaped backslashes and quotes cannot end a string; other escapes hold no quote.
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    structure = raw.translate(_ONE_KIND, _NOT_STRUCTURE)
    # Most strings hold no bracket, and reduce to "" here. A string that holds one leaves a quote
    # behind, and then the brackets inside strings are dropped string by string.
    bare = structure.replace(b'""', b"")
    if b'"' in bare:
        bare = b"".join(structure.split(b'"')[::2])
    depth = 0
    # Each pass removes the innermost pairs: one level.
    while bare and depth <= MAX_DEPTH:
        peeled = bare.replace(b"[]", b"")
        if len(peeled) == len(bare):
            break
        bare, depth = peeled, depth + 1
    # Left over: deeper than the bound, or unbalanced (not JSON), whose unclosed brackets would each
    # still cost the parser a level of recursion before it found the end.
    return depth + bare.count(b"[")


def expect(
    document: dict,
    key: str,
    kind: type | tuple[type, ...],
    expected: str,
    where: object,
    *,
    error: type[FusemoeError] = CheckpointError,
    prefix: str = "",
) -> Any:
    """`document[key]`, None when absent or null, else of `kind` (a bool is never an int here).

    Raises:
        error: the value has another type; the message names `where`, the key and what it must be.
    """
    value = document.get(key)
    if value is None:
        return None
    if isinstance(value, kind) and not (isinstance(value, bool) and bool not in _as_tuple(kind)):
        return value
    raise error(f"{where}: {prefix}{key} is {shorten(value)}, not {expected}")


def shorten(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: enough to recognise it in a one-line message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
