"""Keys with other numbers, and the check that mapping them by template gives what mapping each one does."""

from __future__ import annotations

import re

from fusemoe_ckpt.rules.key_templates import map_keys
from fusemoe_ckpt.rules.patterns import active_groups, map_key

# Short, long, leading zeros, and a count past any placeholder's first digits.
NUMBERS = ("1", "10", "007", "123456")
_NUMBER = re.compile(r"(?<![^.])[0-9]+(?![^.])")


def number_variants(keys) -> list[str]:
    """`keys`, and each with its numbers (whole dot-separated components of digits) replaced: all by
    the same one of NUMBERS, and by NUMBERS in turn from either end (equal and unequal numbers)."""
    out = dict.fromkeys(keys)
    for key in keys:
        count = len(_NUMBER.findall(key))
        if not count:
            continue
        choices = [[n] * count for n in NUMBERS]
        choices += [[NUMBERS[i % 4] for i in range(count)], [NUMBERS[-1 - i % 4] for i in range(count)]]
        for numbers in choices:
            values = iter(numbers)
            out[_NUMBER.sub(lambda _: next(values), key)] = None  # noqa: B023
    return list(out)


def assert_maps_alike(keys, family, *, renames=None) -> None:
    """map_keys (by template where the family allows it) equals map_key of each key."""
    renames = family.all_renames() if renames is None else renames
    active, _ = active_groups(keys, renames, family.model)
    templated = map_keys(keys, renames, family.converters, family.model, active)
    direct = {key: map_key(key, renames, family.converters, family.model, active) for key in keys}
    different = {key: (templated[key], direct[key]) for key in keys if templated[key] != direct[key]}
    assert not different, f"family {family.name}: {next(iter(different.items()))}"
