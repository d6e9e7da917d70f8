"""What transformers decides by looking at the model it loads into, as static facts of the model
class: fusemoe-ckpt plans from headers alone, so these are data of a family, each derived from
transformers' meta model by tests/test_model_keys.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelKeys:
    """What transformers decides by looking at the model it loads into.

    - `prefix`: the base-model prefix transformers adds to a key the base model holds (`model.`),
      i.e. to every key but those of `head` (top-level modules of the task model, `lm_head`).
    - `kept`: whole source keys (regexes) that are already the model's names but that the renames
      would take out of the model; transformers takes the rename back (`model.norm.weight`, which
      `\\.norm\\.` -> `.kv_norm.` also hits).
    - `ignored`: `_keys_to_ignore_on_load_unexpected`: keys (regexes, searched in the mapped key, with
      and without the prefix) transformers drops at load, such as multi-token-prediction layers.
    - `keep_in_fp32`: `_keep_in_fp32_modules_strict`: keys (searched) transformers holds in float32
      when it loads the model in a 16-bit dtype.
    """

    prefix: str = ""
    head: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()
    keep_in_fp32: tuple[str, ...] = ()

    # Asked of every key of a checkpoint (hundreds of thousands): most families have no such patterns.
    def keeps(self, key: str) -> bool:
        return bool(self.kept) and any(re.fullmatch(pattern, key) for pattern in self.kept)

    def ignores(self, key: str) -> bool:
        if not self.ignored:
            return False
        # transformers adds the prefix only to a key the model has, so it matches an ignored (unexpected)
        # key without it: `mtp.0.x` stays `mtp.0.x` for `^mtp.*`, where `with_prefix` gives `model.mtp.0.x`.
        bare = key.removeprefix(self.prefix + ".") if self.prefix else key
        return any(re.search(pattern, key) or re.search(pattern, bare) for pattern in self.ignored)

    def holds_in_fp32(self, key: str) -> bool:
        return any(re.search(pattern.replace("*", ".*"), key) for pattern in self.keep_in_fp32)

    def with_prefix(self, key: str) -> str:
        if not self.prefix or key.startswith(self.prefix + ".") or key.split(".")[0] in self.head:
            return key
        return f"{self.prefix}.{key}"
