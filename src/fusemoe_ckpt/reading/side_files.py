"""The files beside the weights (config, tokenizer, chat template, card, license): copied as they are.

Weights in any format, and their indexes, are never side files: the converted shards replace them.
"""

from __future__ import annotations

import os
import re

from ..errors import CheckpointError
from ..naming import natural_key
from .source import SourceCheckpoint

# Weight files of any format, and their indexes: never copied beside the converted shards.
WEIGHT_EXTENSIONS = ("safetensors", "bin", "pt", "pth", "ckpt", "h5", "msgpack", "gguf", "onnx", "onnx_data", "npz")
_WEIGHT_FILE = re.compile(rf"\.({'|'.join(WEIGHT_EXTENSIONS)})(\.index\.json)?$")


def side_files(source: SourceCheckpoint) -> list[str]:
    """Relative paths of the files to copy as they are: config, tokenizer, card... never weights.

    Raises:
        CheckpointError: a side file is a FIFO, a device or a dangling link.
    """
    extras = []
    for folder, dirnames, filenames in os.walk(source.root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or _WEIGHT_FILE.search(name):
                continue
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                # A FIFO would block the copy and a device would never end; a dangling link has nothing.
                raise CheckpointError(f"{path}: not a regular file; remove it from the source or replace it")
            extras.append(os.path.relpath(path, source.root))
    return sorted(extras, key=natural_key)
