"""The model card of a converted checkpoint: the source card kept, provenance and loading added."""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..errors import CheckpointError, DestinationError
from ..reading.json_document import read_document
from ..reading.source import CONFIG_NAME, read_config
from ..rules.consumers import LOADS, NEEDS_UNFUSE, UNKNOWN, WRONG, Support, by_status, engine_label
from ..write.no_follow import open_own_file

CARD_NAME = "README.md"
TAGS = ["fused-moe", "fusemoe-ckpt"]
START, END = "<!-- fusemoe-ckpt:start -->", "<!-- fusemoe-ckpt:end -->"
_SECTION = re.compile(re.escape(START) + r".*?" + re.escape(END) + r"\n*", re.DOTALL)


def write_model_card(root: Path, metadata: dict, *, repo_id: str, endpoint: str) -> Path:
    """Write `root/README.md`: the source card's text and YAML (license included) with `base_model`,
    the tags and a section on what was fused and how to load it. Running it again replaces the section.

    Args:
        metadata: the `metadata` of the converted index (family, source, fused counts).
        repo_id: the repo the card is for, used in the loading snippet.
        endpoint: the Hub the source repo is linked on.
    """
    path = root / CARD_NAME
    if os.path.lexists(path):
        # Read as any input is (a FIFO there must not hang the push); written below without
        # following a link, so a planted one cannot get its target overwritten.
        text = read_document(path, error=DestinationError, what=CARD_NAME, follow_links=False).decode("utf-8")
        card = ModelCard(_with_front_matter(text.removeprefix("\ufeff")), ignore_metadata_errors=True)
    else:
        card = ModelCard(f"---\n{ModelCardData(library_name='transformers').to_yaml()}\n---\n")
    base_model = metadata.get("fusemoe_ckpt_source") if "fusemoe_ckpt_source_revision" in metadata else None
    if base_model:
        card.data.base_model = base_model
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *TAGS]))
    if card.data.library_name is None:
        card.data.library_name = "transformers"
    body = _SECTION.sub("", card.text).lstrip("\n")
    section = _section(metadata, _config(root), repo_id=repo_id, endpoint=endpoint, base_model=base_model)
    card.text = f"\n{section}\n{body}" if body else f"\n{section}"
    fd = open_own_file(path, "the model card")
    os.ftruncate(fd, 0)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(str(card))  # what ModelCard.save writes
    return path


def _with_front_matter(text: str) -> str:
    """ModelCard warns on a card with no YAML block; give it an empty one instead."""
    return text if text.startswith("---") else f"---\n---\n{text}"


def _config(root: Path) -> dict:
    try:
        return read_config(root / CONFIG_NAME)
    except CheckpointError:
        return {}


def _section(metadata: dict, config: dict, *, repo_id: str, endpoint: str, base_model: str | None) -> str:
    family = metadata.get("fusemoe_ckpt_family", "?")
    layers, experts = metadata.get("fusemoe_ckpt_fused_layers"), metadata.get("fusemoe_ckpt_experts")
    tool = f"fusemoe-ckpt {metadata.get('fusemoe_ckpt_version', '')}".strip()
    if base_model:
        commit = metadata.get("fusemoe_ckpt_source_revision", "")
        origin = f"[{base_model}]({endpoint}/{base_model}) (commit `{commit[:12]}`)"
    else:
        origin = f"`{metadata.get('fusemoe_ckpt_source', 'a local checkpoint')}`"
    if layers:
        what = f"the routed experts of {layers} layers ({experts} experts in all) fused"
    else:
        what = "no per-expert tensors to fuse (copied through)"
    architecture = (config.get("architectures") or [None])[0]
    model_class = architecture or "AutoModelForCausalLM"
    build = f"{model_class}(config)" if architecture else "AutoModelForCausalLM.from_config(config)"
    return f"""{START}
## Fused-expert checkpoint

This is {origin} with {what} by {tool} (family rule `{family}`) into the layout
transformers 5 holds in memory: per layer one `experts.gate_up_proj` of shape `[E, 2·I, H]` and one
`experts.down_proj` of shape `[E, H, I]`. Every other tensor keeps its bytes (with the family's key
renames, as transformers applies them).

Load it with transformers >= 5 (`from_pretrained`), or with plain accelerate dispatch, which matches
keys exactly and so cannot load the per-expert original:

```python
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from huggingface_hub import snapshot_download
from transformers import AutoConfig, {model_class}

path = snapshot_download("{repo_id}")
config = AutoConfig.from_pretrained(path)
with init_empty_weights():
    model = {build}
model = load_checkpoint_and_dispatch(model, path, device_map="auto", strict=True)
```

{engines_section(config.get("model_type"))}
{END}
"""


def engines_section(model_type: str | None) -> str:
    """What other engines, at the versions tested, do with this fused checkpoint (rules/consumers.py)."""
    heading = "### Other engines"
    if not isinstance(model_type, str):
        return f"{heading}\n\nconfig.json names no `model_type`: which engines load this layout is unknown.\n"
    groups = by_status(model_type)
    parts = [heading, "", f"What each engine, at the version tested, does with a fused `{model_type}` checkpoint:", ""]
    if groups[WRONG]:
        parts.append("> **Warning:** these accept this repo without an error and load its experts wrong:")
        parts.append(">")
        parts += [f"> - **{_row(s)}**" for s in groups[WRONG]]
        parts.append(">")
        parts.append("> Give them the per-expert layout instead (`fusemoe-ckpt unfuse`, or the source repo).")
        parts.append("")
    for status, title in (
        (LOADS, "Load the fused layout:"),
        (NEEDS_UNFUSE, "Need the per-expert layout (run `fusemoe-ckpt unfuse` on this repo first, or use the source):"),
    ):
        if groups[status]:
            parts.append(f"- {title}")
            parts += [f"  - {_row(s)}" for s in groups[status]]
    if groups[UNKNOWN]:
        parts.append("- Not checked for this model type: " + ", ".join(engine_label(s.engine) for s in groups[UNKNOWN]))
    parts += [
        "",
        "Rows marked *reported* come from users who ran the engine; the others were checked in its "
        "source or by a run (`fusemoe-ckpt consumers --evidence` says how).",
    ]
    return "\n".join(parts) + "\n"


def _row(support: Support) -> str:
    mark = "" if support.confirmed else " (*reported*)"
    return f"{engine_label(support.engine)}{mark}: {support.detail}"
