"""The files beside the weights (config, tokenizer, chat template, card, license): copied as they are.

Weights in any format, and their indexes, are never side files: the converted shards replace them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError
from ..naming import natural_key
from .source import SourceCheckpoint

# Weight files of any format, and their indexes: never copied beside the converted shards.
WEIGHT_EXTENSIONS = ("safetensors", "bin", "pt", "pth", "ckpt", "h5", "msgpack", "gguf", "onnx", "onnx_data", "npz")
_WEIGHT_FILE = re.compile(rf"\.({'|'.join(WEIGHT_EXTENSIONS)})(\.index\.json)?$")


def side_files(source: SourceCheckpoint) -> list[str]:
    """Relative paths of the files to copy as they are: config, tokenizer, card... never weights.

    Subfolders are walked, symlinked ones too (a tokenizer folder shared between checkpoints): their
    files are copied as files, so DST holds no link out of itself.

    Raises:
        CheckpointError: a side file is a FIFO, a device or a dangling link; a symlinked subfolder
            leads back into a folder that holds it (a loop).
    """
    extras: list[str] = []
    _walk(source.root, Path(), {_identity(source.root)}, None, extras)
    return sorted(extras, key=natural_key)


def _walk(root: Path, relative: Path, ancestors: set[tuple[int, int]], link: Path | None, extras: list[str]) -> None:
    """Add the side files under `root / relative` to `extras`; `ancestors` are the real folders
    (device, inode) on the way down, for telling a loop, and `link` the last symlinked folder on it."""
    folder = root / relative
    try:
        with os.scandir(folder) as entries:
            listed = sorted(entries, key=lambda e: e.name)
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot list the folder: {e.strerror}") from e
    for entry in listed:
        if entry.name.startswith("."):
            continue
        path = relative / entry.name
        if entry.is_dir():  # follows a link, as a copy of the folder's files must
            here = folder / entry.name
            via = here if entry.is_symlink() else link
            identity = _identity(here)
            if identity in ancestors:
                raise CheckpointError(
                    f"{via or here}: a symbolic link to a folder that contains it (a loop); "
                    "remove it from the source or replace it with the files it should hold"
                )
            _walk(root, path, ancestors | {identity}, via, extras)
        elif not _WEIGHT_FILE.search(entry.name):
            if not entry.is_file():
                # A FIFO would block the copy and a device would never end; a dangling link has nothing.
                raise CheckpointError(
                    f"{folder / entry.name}: not a regular file; remove it from the source or replace it"
                )
            extras.append(str(path))


def _identity(folder: Path) -> tuple[int, int]:
    st = os.stat(folder)
    return st.st_dev, st.st_ino
