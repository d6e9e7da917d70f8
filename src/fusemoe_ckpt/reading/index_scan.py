"""A safetensors index read chunk by chunk: its weight map's entries in order, never the whole map at once.

The index of a frontier model names every tensor: 300k entries are 27 MB of text and, parsed whole,
about 60 MB of Python objects. The scan here reads 1 MiB at a time, hands the entries on in batches
(runs of plain entries are matched by compiled regexes, a name with escapes goes through the `json`
module's own string decoder) and keeps only the rest of the document: metadata and any other field.

It accepts and refuses exactly what `read_index` does. Whenever the scan would refuse, `read_index`
reads the whole document and raises its own one-line message: the messages cannot drift apart, and the
whole document is held only on the way to an error.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from array import array
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from itertools import chain, groupby
from operator import itemgetter
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import CheckpointError
from .files import open_regular
from .json_document import MAX_DEPTH, MAX_DOCUMENT_BYTES, expect, nesting_depth, read_json

CHUNK_SIZE = 1 << 20
DIGEST_MASK = (1 << 64) - 1

_WS = "[ \t\n\r]*"  # JSON's whitespace; `\s` would also take \f and \v


@cache
def _pairs(content: str) -> tuple[re.Pattern, re.Pattern]:
    """A pattern for one entry whose strings hold `content`, and its comma, capturing name and file;
    and one for a run of them. Compiled on first use: an index of plain names needs only `_LOOSE`'s."""
    one = f'{_WS}"({content})"{_WS}:{_WS}"({content})"{_WS},'
    run = f'(?:{_WS}"(?:{content})"{_WS}:{_WS}"(?:{content})"{_WS},)*'
    return re.compile(one), re.compile(run)


# A string with no escape and no control character, as JSON has it.
_STRICT = '[^"\\\\\x00-\x1f]*'
# Any characters but a quote: about twice as fast, and exact once no string it took holds a backslash
# or a control character (between the strings, the patterns take only whitespace, colons and commas).
_LOOSE = '[^"]*'
# Strings with escapes, decoded by `json` a batch at a time (an escape it refuses is left to `_member`).
_ESCAPED = '[^"\\\\\x00-\x1f]*(?:\\\\.[^"\\\\\x00-\x1f]*)*'
# What a plain string cannot hold; in UTF-8, no byte of another character is one of these.
_UNSAFE = bytes(range(0x20)) + b"\\"
_SPACE = re.compile(_WS)
# From just after an opening quote to just after the quote that closes it.
_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*"', re.DOTALL)
_DUPLICATE_BUCKETS = 64
# Text matched into one batch of entries: a few hundred, so the parsed batch stays small beside the chunk.
_BATCH_CHARS = 1 << 14


def read_index(index_path: Path) -> tuple[dict[str, str], dict]:
    """The weight map and the metadata (an empty dict where there is none) of a safetensors index,
    parsed whole. Holds every entry: where the shards and their names are all that is needed,
    `summarize_index` reads the same document in bounded memory.

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
    return weight_map, _metadata(index, index_path)


@dataclass(frozen=True)
class IndexSummary:
    """What a safetensors index says of each shard file, without the names themselves.

    Attributes:
        shards: shard file name -> (how many tensors the index maps to it, `name_digest` of them).
        metadata: the index's metadata (an empty dict where there is none).
        in_scan_order: each tensor is named once, so a scan's entries are the weight map, entry for
            entry; False for an index with a key given twice (`json` keeps its last value).
    """

    shards: dict[str, tuple[int, int]]
    metadata: dict
    in_scan_order: bool


def name_digest(names: Iterable[str]) -> int:
    """An order-independent 64-bit digest of tensor names: the sum of their `hash` modulo 2**64.

    Python's string hash is SipHash with a key drawn at random for each process (unless
    PYTHONHASHSEED fixes it), so an index cannot be written to collide with a header it does not
    match; it runs at C speed and is cached on each string, so a header whose dict already hashed its
    names costs one pass of additions.
    """
    return sum(map(hash, names)) & DIGEST_MASK


def summarize_index(index_path: Path, *, chunk_size: int = CHUNK_SIZE) -> IndexSummary:
    """Per shard file, the count and digest of the names the index maps to it, in bounded memory.

    An index whose names are not in sorted order is read a second time to prove no name repeats
    (8 bytes a name, in 64 buckets); one whose names do repeat is read whole, as `read_index` does.

    Raises:
        CheckpointError: as `read_index`, with its message.
    """
    scan = IndexScan(index_path, chunk_size=chunk_size)
    shards = _shard_stats(scan.batches())
    if scan.in_order or (scan.single_map and _names_distinct(IndexScan(index_path, chunk_size=chunk_size))):
        return IndexSummary(shards=shards, metadata=scan.metadata, in_scan_order=True)
    weight_map, metadata = read_index(index_path)
    return IndexSummary(shards=_shard_stats([weight_map.items()]), metadata=metadata, in_scan_order=False)


def read_index_metadata(index_path: Path, *, chunk_size: int = CHUNK_SIZE) -> dict:
    """The metadata of a safetensors index, its weight map checked as `read_index` checks it but not kept.

    Raises:
        CheckpointError: as `read_index`, with its message.
    """
    scan = IndexScan(index_path, chunk_size=chunk_size)
    deque(scan.batches(), maxlen=0)
    return scan.metadata


def weight_map_entries(index_path: Path, summary: IndexSummary) -> Iterable[tuple[str, str]]:
    """The entries of the index's weight map in its order, as `read_index(...)[0].items()` gives them:
    scanned where `summary` shows each name once, else read whole."""
    if summary.in_scan_order:
        return IndexScan(index_path)
    return read_index(index_path)[0].items()


class IndexScan:
    """One pass over a safetensors index file, `chunk_size` bytes at a time.

    Iterating yields the (tensor name, shard file name) entries of "weight_map" in the document's
    order (`batches()` yields them a list at a time). The entries are only the index's once the pass
    has ended without an error; then `metadata`, `rest` (the document without "weight_map"),
    `entries`, `single_map` and `in_order` are set.
    """

    def __init__(self, index_path: Path, *, chunk_size: int = CHUNK_SIZE) -> None:
        self.path = index_path
        self.chunk_size = chunk_size
        self.rest: dict[str, Any] = {}
        self.metadata: dict = {}
        self.entries = 0
        self.single_map = False
        self.in_order = False

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return chain.from_iterable(self.batches())

    def batches(self) -> Iterator[list[tuple[str, str]]]:
        fd, st = open_regular(self.path, what="file", error=CheckpointError)
        with os.fdopen(fd, "rb") as f:
            if st.st_size > MAX_DOCUMENT_BYTES:
                self._refuse()
            # As read_document: at most one byte past the size fstat saw, never past the limit.
            text = _Text(f, min(st.st_size, MAX_DOCUMENT_BYTES) + 1, self.chunk_size)
            try:
                yield from self._document(text)
            except _Invalid:
                self._refuse()

    def _refuse(self) -> None:
        read_index(self.path)
        raise CheckpointError(f"{self.path}: read differently twice; was it changed while it was read?")

    def _document(self, text: _Text) -> Iterator[list[tuple[str, str]]]:
        maps = 0
        # The last weight_map's entries and state: json keeps a repeated key's last value.
        entries = 0
        map_valid = False
        in_order = True
        if text.step(_open_object):
            while True:
                key, opener = text.step(_member_start)
                if key == "weight_map" and opener == "{":
                    text.pos += 1
                    maps += 1
                    entries, map_valid, in_order = 0, True, True
                    last = None
                    for batch, valid in _map_members(text):
                        map_valid = map_valid and valid
                        if not batch:
                            continue
                        names = list(map(itemgetter(0), batch))
                        if in_order:
                            in_order = (last is None or last < names[0]) and all(map(str.__lt__, names, names[1:]))
                        last = names[-1]
                        entries += len(batch)
                        yield batch
                else:
                    value = text.step(_value, 1)
                    if key == "weight_map":
                        maps += 1
                        entries, map_valid, in_order = 0, False, False
                    else:
                        self.rest[key] = value
                if text.step(_member_end) == "}":
                    break
        text.step_end()
        if not map_valid or entries == 0:
            raise _Invalid
        self.metadata = _metadata(self.rest, self.path)
        self.entries = entries
        self.single_map = maps == 1
        self.in_order = in_order and maps == 1


def _metadata(index: dict, index_path: Path) -> dict:
    return expect(index, "metadata", dict, "a JSON object", index_path) or {}


def _shard_stats(batches: Iterable[Iterable[tuple[str, str]]]) -> dict[str, tuple[int, int]]:
    counts: Counter[str] = Counter()
    sums: defaultdict[str, int] = defaultdict(int)
    for batch in batches:
        # Neighbouring entries mostly share a shard: one Python step a run, the sums at C speed.
        for shard, run in groupby(batch, itemgetter(1)):
            names = list(map(itemgetter(0), run))
            counts[shard] += len(names)
            sums[shard] += sum(map(hash, names))
    return {shard: (counts[shard], total & DIGEST_MASK) for shard, total in sums.items()}


def _names_distinct(scan: IndexScan) -> bool:
    """Whether no two entries of the scan share a name's hash (a shared hash is taken as a repeat)."""
    buckets = [array("q") for _ in range(_DUPLICATE_BUCKETS)]
    for name, _ in scan:
        h = hash(name)
        buckets[h % _DUPLICATE_BUCKETS].append(h)
    return all(len(set(bucket)) == len(bucket) for bucket in buckets)


class _Invalid(Exception):
    """The scan refuses the document; `read_index` says why."""


class _More(Exception):
    """A step reached the end of the text read so far: read on and take the step again."""


class _Text:
    """The document's text read so far, from the start of the step being taken."""

    def __init__(self, f: BinaryIO, budget: int, chunk_size: int) -> None:
        self.f = f
        self.left = budget
        self.chunk_size = chunk_size
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf = ""
        self.pos = 0
        self.eof = False
        # Plain entries are matched strictly before this position (see `_plain_run`).
        self.strict_until = 0

    def step(self, take, *args):
        """`take(self, *args)`, taken again from the same place with more text while it needs it."""
        start = self.pos
        while True:
            try:
                return take(self, *args)
            except _More:
                self._read_more(start)
                start = self.pos = 0

    def step_end(self) -> None:
        """Only whitespace up to the end of the document."""
        while True:
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                raise _Invalid
            if self.eof:
                return
            self._read_more(self.pos)
            self.pos = 0

    def _read_more(self, keep_from: int) -> None:
        if self.eof:
            raise _Invalid
        kept = self.buf[keep_from:]
        self.strict_until = 0
        # A step that needs more than a chunk doubles what it reads, so a long value costs linear time.
        raw = self.f.read(min(max(self.chunk_size, len(kept)), self.left))
        self.left -= len(raw)
        self.eof = not raw or self.left <= 0
        try:
            self.buf = kept + self.decoder.decode(raw, final=self.eof)
        except UnicodeDecodeError as e:
            raise _Invalid from e

    def need(self) -> str:
        """The next character after whitespace, not taken."""
        self.pos = _SPACE.match(self.buf, self.pos).end()
        if self.pos == len(self.buf):
            raise _Invalid if self.eof else _More
        return self.buf[self.pos]

    def take(self, char: str) -> None:
        if self.need() != char:
            raise _Invalid
        self.pos += 1

    def string(self) -> str:
        """The string at the next character, decoded as `json` decodes it."""
        self.take('"')
        if _STRING_REST.match(self.buf, self.pos) is None:
            raise _Invalid if self.eof else _More
        try:
            value, self.pos = json.decoder.scanstring(self.buf, self.pos, True)
        except json.JSONDecodeError as e:
            raise _Invalid from e
        return value


def _open_object(text: _Text) -> bool:
    """Past the document's opening brace: whether a member follows."""
    text.take("{")
    if text.need() == "}":
        text.pos += 1
        return False
    return True


def _member_start(text: _Text) -> tuple[str, str]:
    """A member's key, past its colon, and the first character of its value (not taken)."""
    key = text.string()
    text.take(":")
    return key, text.need()


def _member_end(text: _Text) -> str:
    """Past the comma or brace after a member; which it was."""
    char = text.need()
    if char not in ",}":
        raise _Invalid
    text.pos += 1
    return char


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _value(text: _Text, depth: int) -> Any:
    """Any JSON value at the next character, nested `depth` levels inside the document."""
    text.need()
    try:
        value, end = _DECODER.raw_decode(text.buf, text.pos)
    except (ValueError, RecursionError) as e:
        raise (_Invalid if text.eof else _More) from e
    if end == len(text.buf) and not text.eof:
        raise _More  # a number may go on in the next chunk
    if depth + nesting_depth(text.buf[text.pos : end].encode()) > MAX_DEPTH:
        raise _Invalid
    text.pos = end
    return value


def _map_members(text: _Text) -> Iterator[tuple[list[tuple[str, str]], bool]]:
    """The weight map's members after its opening brace, a batch at a time, each with whether every
    value in it was a string."""
    if text.step(_empty_map):
        return
    while True:
        batch = _plain_run(text)
        if batch:
            yield batch, True
            continue
        name, shard, closer = text.step(_member)
        yield ([(name, shard)], True) if isinstance(shard, str) else ([], False)
        if closer == "}":
            return


def _plain_run(text: _Text) -> list[tuple[str, str]]:
    """The entries from where the text stands that regexes take, as far as they go (none where the
    next one is cut by the chunk's end, is the map's last, or holds what only `_member` decides)."""
    start = text.pos
    limit = start + _BATCH_CHARS
    if start >= text.strict_until:
        loose_pair, loose_run = _pairs(_LOOSE)
        end = loose_run.match(text.buf, start, limit).end()
        batch = loose_pair.findall(text.buf, start, end)
        taken = "".join(chain.from_iterable(batch)).encode()
        if len(taken.translate(None, _UNSAFE)) == len(taken):
            text.pos = end
            return batch
        # Strict up to where the loose run went: an escape in every name costs no loose pass each.
        text.strict_until = end
    pair, run = _pairs(_STRICT)
    end = run.match(text.buf, start, limit).end()
    if end > start:
        text.pos = end
        return pair.findall(text.buf, start, end)
    return _escaped_run(text, limit)


def _escaped_run(text: _Text, limit: int) -> list[tuple[str, str]]:
    """The entries from where the text stands whose strings may hold escapes, as far as they go."""
    start = text.pos
    pair, run = _pairs(_ESCAPED)
    end = run.match(text.buf, start, limit).end()
    if end == start:
        return []
    strings = chain.from_iterable(pair.findall(text.buf, start, end))
    try:
        # json's own string decoder, once for the batch: the strings as one array.
        decoded = _DECODER.raw_decode('["' + '","'.join(strings) + '"]')[0]
    except ValueError:
        return []
    text.pos = end
    return list(zip(decoded[::2], decoded[1::2], strict=True))


def _empty_map(text: _Text) -> bool:
    if text.need() == "}":
        text.pos += 1
        return True
    return False


def _member(text: _Text) -> tuple[str, Any, str]:
    """One member of the weight map the slow way (an escape, the last one, or one cut by a chunk)."""
    name, opener = _member_start(text)
    value = text.string() if opener == '"' else _value(text, 2)
    return name, value, _member_end(text)
