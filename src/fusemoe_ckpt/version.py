"""The version of fusemoe-ckpt, from the installed distribution's metadata.

`importlib.metadata` would read the same METADATA file, but importing it costs about 40 ms (email,
zipfile, csv...), half of a small conversion's start-up. The file is found the way it does for an
ordinary install: the first `fusemoe_ckpt-*.dist-info` along sys.path. Anything else (an egg, a zip,
a custom finder) is left to importlib.metadata.
"""

from __future__ import annotations

import os
import sys
from functools import cache

DISTRIBUTION = "fusemoe-ckpt"
_DIST_INFO_PREFIX = "fusemoe_ckpt-"


@cache
def package_version() -> str:
    """The installed version (`Version:` of the distribution's METADATA).

    Raises:
        importlib.metadata.PackageNotFoundError: fusemoe-ckpt is not installed (a bare source tree
            on PYTHONPATH): `pip install .` gives it its metadata.
    """
    for entry in sys.path:
        directory = entry or os.getcwd()
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if name.lower().startswith(_DIST_INFO_PREFIX) and name.endswith(".dist-info"):
                found = _version_in(os.path.join(directory, name, "METADATA"))
                if found:
                    return found
    from importlib.metadata import version

    return version(DISTRIBUTION)


def _version_in(path: str) -> str | None:
    """The `Version:` header of a METADATA file (the headers end at the first blank line)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break
                field, _, value = line.partition(":")
                if field.lower() == "version":
                    return value.strip()
    except OSError:
        return None
    return None
