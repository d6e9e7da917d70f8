"""Render the README's table of supported families from the family table itself.

    python scripts/families_table.py          # print the table
    python scripts/families_table.py --write  # replace it in README.md

tests/test_docs.py fails when README.md and this rendering disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fusemoe_ckpt.rules.families import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- families:start -->", "<!-- families:end -->"


def _code(items) -> str:
    # A bar inside a table cell must be escaped, even within backticks.
    return ", ".join(f"`{item}`".replace("|", "\\|") for item in items)


def render(tested: set[str]) -> str:
    """The markdown block: one row per family; a sub-model's scoped rule names where it applies."""
    lines = [
        START,
        "| family | model types (end-to-end tested in bold) | converters | renames |",
        "| --- | --- | --- | --- |",
    ]
    for family in FAMILIES:
        types = ", ".join(f"**{t}**" if t in tested else t for t in family.model_types)
        converters = "<br>".join(
            f"{type(c).__name__}{_under(c)}: {_code(c.sources)} → {_code(getattr(c, 'targets', None) or [c.target])}"
            for c in family.converters
        )
        renames = (
            "<br>".join(
                f"{'GroupRename: ' if hasattr(r, 'targets') else ''}{_under(r, ': ')}{_code(r.sources)} → "
                f"{_code(getattr(r, 'targets', None) or [r.target])}"
                for r in family.renames
            )
            or "—"
        )
        lines.append(f"| `{family.name}` | {types} | {converters} | {renames} |")
    lines.append(END)
    return "\n".join(lines)


def _under(transform, after: str = "") -> str:
    """Where a sub-model's scoped transform applies (`under model.vision_tower.`), or nothing."""
    scope = getattr(transform, "scope", None)
    if scope is None:
        return ""
    return f"{'' if after else ' '}under `{'.'.join(p for p in (scope.base, scope.prefix) if p)}.`{after}"


def tested_model_types() -> set[str]:
    sys.path.insert(0, str(ROOT))
    from tests.tiny_models import TESTED_ELSEWHERE, TINY_MODELS

    return set(TINY_MODELS) | set(TESTED_ELSEWHERE)


def replace_block(text: str, block: str) -> str:
    start, end = text.index(START), text.index(END) + len(END)
    return text[:start] + block + text[end:]


if __name__ == "__main__":
    table = render(tested_model_types())
    if "--write" in sys.argv:
        readme = ROOT / "README.md"
        readme.write_text(replace_block(readme.read_text(), table))
    else:
        print(table)
