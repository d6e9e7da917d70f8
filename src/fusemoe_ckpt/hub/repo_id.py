"""Whether a source names a Hub repo: spelled `org/name`, and no local path of that name exists.

Kept apart from the rest of hub/ so that telling a repo id from a path never imports huggingface_hub.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path


@cache
def _repo_id() -> re.Pattern[str]:
    """`org/name` as the Hub spells it: compiled on first use (a third of a millisecond), since it is
    tried only when no local path of that name exists."""
    return re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_hub_source(src: str | os.PathLike) -> bool:
    """True when `src` names no existing local path but reads as a Hub repo id (`org/name`)."""
    text = os.fspath(src)
    return not Path(text).exists() and looks_like_repo_id(text)


def looks_like_repo_id(text: str) -> bool:
    """True when `text` is spelled as the Hub spells a repo id (`org/name`)."""
    return _repo_id().fullmatch(text) is not None and ".." not in text and "--" not in text and not text.endswith(".")
