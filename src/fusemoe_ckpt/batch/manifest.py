"""The batch manifest: JSON Lines, one conversion per line (src, dst and convert's options).

JSON Lines rather than TOML: `tomllib` is not in Python 3.10, which the project supports, and a
new dependency is not worth it; a line per entry also gives every error a line number, and a zoo
grows by appending a line. Blank lines and lines starting with `#` are skipped.
"""

from __future__ import annotations

import difflib
import os
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import FusemoeError, ManifestError
from ..hub.repo_id import looks_like_repo_id
from ..plan.cast import OUTPUT_DTYPES
from ..reading.json_document import parse_json, read_document
from ..rules.families import FAMILIES_BY_NAME
from ..sizes import parse_size

# Each field with what it takes, as the error messages say it.
FIELDS: dict[str, str] = {
    "src": "a local directory or a Hub repo id (org/name)",
    "dst": "a local directory",
    "family": "a family name (fusemoe-ckpt families)",
    "max_shard_size": 'a size such as "5GB", or a number of bytes',
    "dtype": f"one of {', '.join(OUTPUT_DTYPES)}",
    "dequantize": "true or false",
    "revision": "a branch, tag or commit of a Hub repo id src",
    "stream": "true or false",
    "push_to_hub": "a Hub repo id (org/name) to push DST to",
    "private": "true or false",
    "workers": "a whole number of at least 1",
    "overwrite": "true or false",
}
# A src written like this is a local path even when it does not exist (yet), never a repo id.
_LOCAL_PREFIXES = ("/", "./", "../", "~")


@dataclass(frozen=True)
class Entry:
    """One conversion of the manifest, its paths resolved against the manifest's directory."""

    line: int
    src: str  # an absolute local path, or a Hub repo id when `hub`
    dst: Path  # absolute
    dst_text: str  # as the manifest writes it: what the report shows and what shards are drawn by
    hub: bool = False
    family: str | None = None
    max_shard_size: str | int = "5GB"
    dtype: str | None = None
    dequantize: bool = False
    revision: str | None = None
    stream: bool = False
    push_to_hub: str | None = None
    private: bool = False
    workers: int | None = None
    overwrite: bool = False

    def to_json(self) -> dict:
        return {**asdict(self), "dst": str(self.dst)}

    @classmethod
    def from_json(cls, data: dict) -> Entry:
        return cls(**{**data, "dst": Path(data["dst"])})


def load_manifest(path: str | os.PathLike) -> list[Entry]:
    """Read and validate a whole manifest before anything runs.

    Raises:
        ManifestError: the file cannot be read, has no entries, or a line is not a valid entry
            (the message names `file:line` and the field); two entries share a dst, or one entry's
            dst is, holds or lies inside another's src or dst.
    """
    path = Path(path)
    text = read_document(path, error=ManifestError, what="manifest").decode("utf-8")
    base = path.absolute().parent
    entries: list[Entry] = []
    seen: dict[Path, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        entry = _parse_entry(stripped, base, f"{path}:{number}", number)
        key = entry.dst.resolve()
        if key in seen:
            raise ManifestError(
                f'{path}:{number}: field "dst": {entry.dst_text!r} is also the dst of line {seen[key]}; '
                "every entry needs its own dst"
            )
        seen[key] = number
        entries.append(entry)
    if not entries:
        raise ManifestError(f"{path}: no entries; write one JSON object per line with at least src and dst")
    _refuse_overlaps(path, entries)
    return entries


_READS = "no entry may write where another reads"
_WRITES = "no entry may write inside another's output"


def _refuse_overlaps(path: Path, entries: list[Entry]) -> None:
    """Refuse an entry whose dst is, holds or lies inside another entry's src, or lies inside another's
    dst: one conversion would write into (or, with overwrite, replace) what another reads or writes,
    and with --jobs above 1 the outcome would depend on timing. Paths are compared resolved; each
    path's folders are looked up, so a zoo of thousands of entries is checked at once."""
    sources: dict[Path, list[Entry]] = defaultdict(list)
    for entry in entries:
        if not entry.hub:
            sources[Path(entry.src).resolve()].append(entry)
    outputs = {entry.dst.resolve(): entry for entry in entries}

    def refuse(entry: Entry, detail: str) -> ManifestError:
        return ManifestError(f'{path}:{entry.line}: field "dst": {entry.dst_text!r} {detail}')

    for dst, entry in outputs.items():
        for folder in (dst, *dst.parents):
            for other in sources.get(folder, ()):
                if other is not entry:
                    relation = "is" if folder == dst else "lies inside"
                    raise refuse(entry, f"{relation} the src of line {other.line} ({other.src}); {_READS}")
            other = outputs.get(folder)
            if other is not None and other is not entry:
                raise refuse(entry, f"lies inside the dst of line {other.line}; {_WRITES}")
    for source, readers in sources.items():
        for folder in source.parents:
            other = outputs.get(folder)
            if other is not None and any(reader is not other for reader in readers):
                reader = next(reader for reader in readers if reader is not other)
                raise refuse(other, f"holds the src of line {reader.line} ({reader.src}); {_READS}")


def _parse_entry(line: str, base: Path, where: str, number: int) -> Entry:
    data = parse_json(
        line.encode("utf-8"), where, error=ManifestError, on_duplicate=lambda name: f"field {name!r} is given twice"
    )
    if not isinstance(data, dict):
        raise ManifestError(f'{where}: not a JSON object; write {{"src": ..., "dst": ...}}')
    for name in data:
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ManifestError(f"{where}: unknown field {name!r}; {hint}known fields: {', '.join(FIELDS)}")
    for name in ("src", "dst"):
        if name not in data:
            raise ManifestError(f'{where}: field "{name}" is missing ({FIELDS[name]})')

    def bad(name: str, detail: str | None = None) -> ManifestError:
        return ManifestError(f'{where}: field "{name}": {detail or f"{data[name]!r} is not {FIELDS[name]}"}')

    for name in ("src", "dst", "family", "dtype", "revision", "push_to_hub"):
        if name in data and not (isinstance(data[name], str) and data[name].strip()):
            raise bad(name)
    for name in ("private", "overwrite", "dequantize", "stream"):
        if name in data and not isinstance(data[name], bool):
            raise bad(name)
    if "workers" in data and (type(data["workers"]) is not int or data["workers"] < 1):
        raise bad("workers")
    if "max_shard_size" in data:
        value = data["max_shard_size"]
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise bad("max_shard_size")
        try:
            parse_size(value)
        except FusemoeError as e:
            raise bad("max_shard_size", str(e)) from None
    if "family" in data and data["family"] not in FAMILIES_BY_NAME:
        raise bad("family", f"unknown family {data['family']!r}; known families: {', '.join(sorted(FAMILIES_BY_NAME))}")
    if "dtype" in data and data["dtype"] not in OUTPUT_DTYPES:
        raise bad("dtype")
    if "push_to_hub" in data and not looks_like_repo_id(data["push_to_hub"]):
        raise bad("push_to_hub")
    if data.get("private") and "push_to_hub" not in data:
        raise bad("private", "applies to the repo push_to_hub creates; set push_to_hub too")

    src, hub = _resolve_source(data["src"], base)
    for name in ("revision", "stream"):  # stream: false says nothing a local src cannot take
        if data.get(name, False) is not False and not hub:
            raise bad(name, f"applies to a Hub repo id, and src {data['src']!r} is a local path")
    options = {name: data[name] for name in FIELDS if name in data and name not in ("src", "dst")}
    return Entry(line=number, src=src, dst=_resolve(data["dst"], base), dst_text=data["dst"], hub=hub, **options)


def _resolve(text: str, base: Path) -> Path:
    """`text` as an absolute path, a relative one taken from the manifest's directory."""
    return Path(os.path.normpath(base / Path(text).expanduser()))


def _resolve_source(text: str, base: Path) -> tuple[str, bool]:
    """(src, is a Hub repo id): a path that exists, or one written as a path, is local; else
    an `org/name` is a repo id, as convert decides for its SRC (the local path always wins)."""
    local = _resolve(text, base)
    if local.exists() or text.startswith(_LOCAL_PREFIXES) or not looks_like_repo_id(text):
        return str(local), False
    return text, True
