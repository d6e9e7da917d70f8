"""Key patterns with the exact matching semantics of transformers 5's conversion mapping.

transformers renames a checkpoint key by applying every `WeightRenaming` in order, then at most one
`WeightConverter`. A pattern is a regular expression searched anywhere in the key, where `*.` stands
for any run of characters followed by a dot and a pattern that ends in a letter or digit must end on
a name boundary. The first match is replaced by the target. We compile the same patterns the same way,
so a rule copied from `conversion_mapping.py` renames keys exactly as `from_pretrained` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# transformers appends this so `weight` matches `q_proj.weight` but not `q_proj.weight_scale_inv`.
_NAME_END = r"(?!\w)"


def _source_regex(pattern: str, expert_group: str | None = None) -> str:
    """The regex transformers builds for one source pattern.

    With `expert_group`, the `*` wildcard is captured under that name; a capture group changes
    nothing about what matches.
    """
    star = rf"(?P<{expert_group}>.*)\." if expert_group else r".*\."
    regex = pattern.replace("*.", star)
    if re.search(r"[a-zA-Z0-9]$", regex):
        regex += _NAME_END
    return regex


def _target_text(pattern: str) -> str:
    """The replacement text transformers derives from a target pattern."""
    return pattern.removeprefix("^").replace(r"\.", ".")


def _alternation(sources: tuple[str, ...], expert_groups: bool) -> re.Pattern[str]:
    # Longest source first, as in transformers: a key is claimed by the first branch that matches.
    branches = []
    for i, source in sorted(enumerate(sources), key=lambda item: -len(item[1])):
        regex = _source_regex(source, f"x{i}" if expert_groups else None)
        branches.append(f"(?P<s{i}>{regex})")
    return re.compile("|".join(branches))


def _replace(key: str, match: re.Match[str], target: str, regex: re.Pattern[str], branch: str) -> str:
    if r"\1" in target:
        # `\1` is the first group inside the branch that matched, as in transformers.
        target = target.replace(r"\1", match.group(regex.groupindex[branch] + 1))
    return key.replace(match.group(0), target, 1)


def _matched_branch(match: re.Match[str]) -> int:
    return next(int(name[1:]) for name, value in match.groupdict().items() if name[0] == "s" and value)


@dataclass(frozen=True)
class Rename:
    """Rename every key that matches one of `sources` (a transformers `WeightRenaming`).

    `prefix_change` marks a transformers `PrefixChange`: it drops a prefix that a key may or may not
    have had, so it cannot be undone; transformers does not undo it when it saves a model it did
    not load, and neither does unfuse.
    """

    sources: tuple[str, ...]
    target: str
    prefix_change: bool = False
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        object.__setattr__(self, "_regex", _alternation(self.sources, expert_groups=False))

    def reversed(self) -> Rename:
        """The rename transformers applies when it saves the original format: target and source
        swapped, a capture group of the source moved to where the target had `\\1`, and a source
        anchored with `^` giving an anchored reverse pattern (transformers' `reverse_transform`)."""
        source = self.sources[0]
        unanchored = re.sub(r"\(\?.+?\)?\)", "", source.removeprefix("^"))
        group = re.search(r"\(.+?\)", unanchored)
        target = unanchored.replace(group.group(0), r"\1", 1) if group else unanchored
        pattern = self.target.replace(r"\1", group.group(0), 1) if group else self.target
        if source.startswith("^") and not pattern.startswith("^"):
            pattern = "^" + pattern
        return Rename((pattern,), target.replace(r"\.", "."))

    def apply(self, key: str) -> str:
        match = self._regex.search(key)
        if match is None:
            return key
        branch = f"s{_matched_branch(match)}"
        return _replace(key, match, _target_text(self.target), self._regex, branch)


@dataclass(frozen=True)
class Converter:
    """A transformers `WeightConverter`: keys matching `sources` become `target` through an operation."""

    sources: tuple[str, ...]
    target: str
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)
    _target_regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))
        object.__setattr__(self, "_regex", _alternation(self.sources, expert_groups=True))
        object.__setattr__(self, "_target_regex", re.compile(_source_regex(self.target) + "$"))

    def match_output(self, key: str) -> re.Match[str] | None:
        """Where `key` is one of this converter's outputs: its target searched as a pattern, as
        transformers' reverse mapping does when it saves the original format, at the end of the key."""
        return self._target_regex.search(key)

    def source_texts(self, expert: int | None = None) -> tuple[str, ...]:
        """The source patterns as key text (for the reverse mapping), with `expert` in place of `*`."""
        texts = tuple(_target_text(source) for source in self.sources)
        return texts if expert is None else tuple(text.replace("*", str(expert), 1) for text in texts)

    def match(self, key: str) -> tuple[str, int, str | None] | None:
        """(target key, source slot, expert id text or None) when `key` matches one of the sources."""
        match = self._regex.search(key)
        if match is None:
            return None
        slot = _matched_branch(match)
        target = _replace(key, match, _target_text(self.target), self._regex, f"s{slot}")
        return target, slot, match.groupdict().get(f"x{slot}")


class ExpertMerge(Converter):
    """Stack per-expert tensors into one fused tensor: `MergeModulelist(dim=0)`, then
    `Concatenate(dim=1)` when there are two sources (gate then up). Each source has `*` for the expert."""


class Concatenate(Converter):
    """Concatenate one tensor per source along dim 0, in source order (`Concatenate(dim=0)`)."""


class TransposeExperts(Converter):
    """Swap dims 1 and 2 of a fused expert tensor stored in the other orientation
    (`Transpose(1, 2, check_dims=True)`: only when the stored shape is not the in-memory one)."""


@dataclass(frozen=True)
class KeyMapping:
    """Where a source key goes: a plain (possibly renamed) key, or one slot (and expert) of a converter."""

    target: str
    converter: Converter | None = None
    slot: int = 0
    expert: str | None = None


def map_key(key: str, renames: tuple[Rename, ...], converters: tuple[Converter, ...]) -> KeyMapping:
    """Every rename in order, then the first converter that matches: transformers' order of operations."""
    for rename in renames:
        key = rename.apply(key)
    for converter in converters:
        found = converter.match(key)
        if found is not None:
            target, slot, expert = found
            return KeyMapping(target=target, converter=converter, slot=slot, expert=expert)
    return KeyMapping(target=key)
