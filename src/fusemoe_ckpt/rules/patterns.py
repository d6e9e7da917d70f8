"""Key patterns with the exact matching semantics of transformers 5's conversion mapping.

transformers renames a checkpoint key by applying every `WeightRenaming` in order, then at most one
`WeightConverter`, then decides by looking at the model whether to add its base-model prefix or to
take a rename back. A pattern is a regular expression searched anywhere in the key, where `*.` stands
for any run of characters followed by a dot and a pattern that ends in a letter or digit must end on
a name boundary. The first match is replaced by the target. We compile the same patterns the same way,
so a rule copied from `conversion_mapping.py` renames keys exactly as `from_pretrained` does; what
transformers decides from the model is decided here from `ModelKeys`, static facts of its model class.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from .model_keys import ModelKeys

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


# Called at each replacement with (the key, the match, the key as replaced); it may raise. Mapping by
# template (key_templates.py) checks there what it must know of every key renamed on the way.
Check = Callable[[str, re.Match[str], str], None]


def _replace(
    key: str, match: re.Match[str], target: str, regex: re.Pattern[str], branch: str, check: Check | None = None
) -> str:
    if r"\1" in target:
        # `\1` is the first group inside the branch that matched, as in transformers.
        target = target.replace(r"\1", match.group(regex.groupindex[branch] + 1))
    # transformers replaces the first occurrence of the matched text, wherever that is.
    replaced = key.replace(match.group(0), target, 1)
    if check is not None:
        check(key, match, replaced)
    return replaced


def _matched_branch(match: re.Match[str]) -> int:
    return next(int(name[1:]) for name, value in match.groupdict().items() if name[0] == "s" and value)


@dataclass(frozen=True)
class Scope:
    """Where a sub-model's rule applies inside a whole model (transformers' `scope_prefix`): only to keys
    under `prefix` (the sub-model's module path without the base-model prefix), with or without
    `base` (the whole model's base-model prefix) before it. The rule sees the key without that
    prefix, and the prefix is put back on what it makes. `config` names the sub-model's sub-config
    in config.json (`vision_config`), where its expert count is."""

    prefix: str
    base: str = ""
    # The sub-config of config.json that describes the sub-model (its expert count), if any.
    config: str = ""

    def split(self, key: str) -> tuple[str, str] | None:
        """(the prefix consumed, the rest of `key`) when `key` is under the scope, else None."""
        scope = f"{self.prefix}." if self.prefix else ""
        base = f"{self.base}." if self.base else ""
        for prefix in (base + scope, scope):
            if key.startswith(prefix):
                return prefix, key.removeprefix(prefix)
        return None


def _scoped(scope: Scope | None, key: str) -> tuple[str, str] | None:
    return ("", key) if scope is None else scope.split(key)


def _search_scoped(regex: re.Pattern[str], scope: Scope | None, key: str) -> re.Match[str] | None:
    """`regex` searched in `key` after the scope's prefix; the match's positions are in `key`."""
    scoped = _scoped(scope, key)
    return None if scoped is None else regex.search(key, len(scoped[0]))


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
    scope: Scope | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))

    # The regexes of the family table are compiled on first use: a run uses one family of dozens.
    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return _alternation(self.sources, expert_groups=False)

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
        return Rename((pattern,), target.replace(r"\.", "."), scope=self.scope)

    def apply(self, key: str, check: Check | None = None) -> str:
        scoped = _scoped(self.scope, key)
        if scoped is None:
            return key
        prefix, rest = scoped
        match = self._regex.search(rest)
        if match is None:
            return key
        branch = f"s{_matched_branch(match)}"
        return prefix + _replace(rest, match, _target_text(self.target), self._regex, branch, check)


@dataclass(frozen=True)
class Converter:
    """A transformers `WeightConverter`: keys matching `sources` become `target` through an operation."""

    sources: tuple[str, ...]
    target: str
    scope: Scope | None = None

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            object.__setattr__(self, "sources", (self.sources,))

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return _alternation(self.sources, expert_groups=True)

    @cached_property
    def _target_regex(self) -> re.Pattern[str]:
        return re.compile(_source_regex(self.target) + "$")

    def match_output(self, key: str) -> re.Match[str] | None:
        """Where `key` is one of this converter's outputs: its target searched as a pattern, as
        transformers' reverse mapping does when it saves the original format, at the end of the key
        (and under the scope of a scoped converter)."""
        return _search_scoped(self._target_regex, self.scope, key)

    def source_texts(self, expert: int | None = None) -> tuple[str, ...]:
        """The source patterns as key text (for the reverse mapping), with `expert` in place of `*`."""
        texts = tuple(_target_text(source) for source in self.sources)
        return texts if expert is None else tuple(text.replace("*", str(expert), 1) for text in texts)

    def match(self, key: str, check: Check | None = None) -> tuple[str, int, str | None] | None:
        """(target key, source slot, expert id text or None) when `key` matches one of the sources."""
        scoped = _scoped(self.scope, key)
        if scoped is None:
            return None
        prefix, rest = scoped
        match = self._regex.search(rest)
        if match is None:
            return None
        slot = _matched_branch(match)
        target = prefix + _replace(rest, match, _target_text(self.target), self._regex, f"s{slot}", check)
        return target, slot, match.groupdict().get(f"x{slot}")


class ExpertMerge(Converter):
    """Stack per-expert tensors into one fused tensor: `MergeModulelist(dim=0)`, then
    `Concatenate(dim=1)` when there are two sources (gate then up). Each source has `*` for the expert."""


class Concatenate(Converter):
    """Concatenate one tensor per source along dim 0, in source order (`Concatenate(dim=0)`)."""


@dataclass(frozen=True)
class ConcatenateShards(Converter):
    """Concatenate the shards of one tensor, `*` = 0..N-1, along dim 0 (`Concatenate(dim=0,
    num_shards_attribute=...)` over a wildcard): N is config.json's `count_field`, or
    `default_count` (transformers' config default) where absent."""

    count_field: str = ""
    default_count: int = 0


class TransposeExperts(Converter):
    """Swap dims 1 and 2 of a fused expert tensor stored in the other orientation
    (`Transpose(1, 2, check_dims=True)`: only when the stored shape is not the in-memory one)."""


class Transpose(Converter):
    """Swap dims 1 and 2 of a fused [experts, a, b] tensor, always (`Transpose(1, 2)`): the
    checkpoint stores every expert as (in_features, out_features)."""


@dataclass(frozen=True)
class ChunkForRope(Converter):
    """Split one tensor along dim 0 into equal parts, one per target, in order (`Chunk(dim=0)`),
    then reorder the rows of the targets whose name contains one of `rope` from interleaved to
    halved rotary pairs, head by head (`PermuteForRope`): a row permutation, so each output row is
    one run of source bytes. The head count is `num_attention_heads` of config.json's
    `rope_config` sub-config, or `default_heads` (transformers' config class default) where absent.
    `target` is the first of `targets`, the name transformers gives the source key."""

    targets: tuple[str, ...] = ()
    rope: tuple[str, ...] = ()
    rope_config: str = ""
    default_heads: int = 1

    @cached_property
    def _outputs(self) -> re.Pattern[str]:
        return _alternation(self.targets, expert_groups=False)

    def match_output(self, key: str) -> re.Match[str] | None:
        """Where `key` is one of the outputs: any target, searched anywhere in the key, as transformers'
        reverse converter (whose sources the targets are) searches it."""
        return _search_scoped(self._outputs, self.scope, key)

    def output_slot(self, match: re.Match[str]) -> int:
        return _matched_branch(match)

    def output_names(self, first: str) -> tuple[str, ...]:
        """Every output key, from the key of the first target (as transformers expands them: the
        text before and after the first occurrence of the first target, around each target)."""
        before, _, after = first.partition(_target_text(self.targets[0]))
        return tuple(before + _target_text(target) + after for target in self.targets)

    def permuted(self, name: str) -> bool:
        return any(layer in name for layer in self.rope)


class Chunk(ChunkForRope):
    """Split one tensor along dim 0 into equal parts, one per target, in order (`Chunk(dim=0)` alone):
    a ChunkForRope with no rotary target."""


@dataclass(frozen=True)
class SplitBySize(ChunkForRope):
    """Split one tensor along dim 0 into one part per target, each as many rows as that target's
    parameter has (`Split(dim=0)`, which reads the model's parameters): here from config.json, the
    head count field of each target (`heads`, with transformers' config default) times `head_dim`
    (`default_head_dim` where absent). Each part is one run of source bytes."""

    heads: tuple[tuple[str, int], ...] = ()
    default_head_dim: int = 0


@dataclass(frozen=True)
class GroupRename:
    """Paired renames active only in a checkpoint that holds the first source, the guard (a
    transformers `GroupWeightRename`): `norm0 -> norm1` with `norm1 -> norm2` must not rename a
    checkpoint that already says `norm1` and `norm2`. A key matching the guard is always renamed; a
    key matching another source only when the group is active (see `active_groups`)."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.targets):
            raise ValueError(f"GroupRename needs one target per source: {self.sources} -> {self.targets}")

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        return _alternation(self.sources, expert_groups=False)

    @property
    def target(self) -> str:
        return self.targets[0]

    def match(self, key: str) -> tuple[int, re.Match[str]] | None:
        """(source slot, match) of `key`, or None."""
        match = self._regex.search(key)
        return None if match is None else (_matched_branch(match), match)

    def groups(self, match: re.Match[str], slot: int) -> tuple[str, ...]:
        """The capture groups of source `slot` in `match` (the block number, say)."""
        start = self._regex.groupindex[f"s{slot}"]
        count = re.compile(_source_regex(self.sources[slot])).groups
        return tuple(match.group(start + 1 + i) for i in range(count))

    def source_text(self, slot: int, groups: tuple[str, ...]) -> str:
        """Source pattern `slot` as key text, its capture groups filled with `groups`."""
        text = self.sources[slot]
        for value in groups:
            text = re.sub(r"\((?:[^()\\]|\\.)*\)", lambda _: value, text, count=1)  # noqa: B023
        return _target_text(text)

    def apply(self, key: str, active: bool, check: Check | None = None) -> str:
        found = self.match(key)
        if found is None:
            return key
        slot, match = found
        if slot and not active:
            return key
        target = _target_text(self.targets[slot])
        start = self._regex.groupindex[f"s{slot}"]
        target = re.sub(r"\\(\d+)", lambda m: match.group(start + int(m.group(1))), target)
        replaced = key.replace(match.group(0), target, 1)
        if check is not None:
            check(key, match, replaced)
        return replaced

    def reversed(self) -> GroupRename:
        """The group transformers applies when it saves the original format: each pair swapped, the
        capture group moved to the other side, and the pairs ordered so the guard comes first."""
        pairs = []
        for source, target in zip(self.sources, self.targets, strict=True):
            group = re.search(r"\(.+?\)", source)
            new_source = target.replace(r"\1", group.group(0), 1) if group else target
            new_target = source.replace(group.group(0), r"\1", 1) if group else source
            pairs.append((target, new_source, new_target))
        pairs.sort()
        return GroupRename(tuple(p[1] for p in pairs), tuple(p[2] for p in pairs))


Renaming = Rename | GroupRename


class KeyMapping(NamedTuple):
    """Where a source key goes: a plain (possibly renamed) key, or one slot (and expert) of a converter.

    A named tuple: planning makes one for each of up to 300k keys, three times faster than a frozen
    dataclass."""

    target: str
    converter: Converter | None = None
    slot: int = 0
    expert: str | None = None


def map_key(
    key: str,
    renames: tuple[Renaming, ...],
    converters: tuple[Converter, ...],
    model: ModelKeys | None = None,
    active: frozenset[GroupRename] = frozenset(),
    check: Check | None = None,
) -> KeyMapping:
    """Every rename in order, then the first converter that matches, then the base-model prefix:
    transformers' order of operations. A key `model` keeps is only given the prefix (the renames
    taken back); a group rename renames dependent keys only when it is in `active`. `check` is
    called at each replacement."""
    model = model or ModelKeys()
    if model.keeps(key):
        return KeyMapping(target=model.with_prefix(key))
    key = rename_all(key, renames, active, check)
    for converter in converters:
        found = converter.match(key, check)
        if found is not None:
            target, slot, expert = found
            # The experts of a group share their target and each expert id recurs in every group:
            # one string each, not one per key (a checkpoint of 300k keys holds every mapping at once).
            target = sys.intern(model.with_prefix(target))
            return KeyMapping(target=target, converter=converter, slot=slot, expert=expert and sys.intern(expert))
    return KeyMapping(target=model.with_prefix(key))


def rename_all(
    key: str, renames: tuple[Renaming, ...], active: frozenset[GroupRename] = frozenset(), check: Check | None = None
) -> str:
    """`key` through every rename in order; a group rename renames dependent keys only when in `active`."""
    for rename in renames:
        if isinstance(rename, GroupRename):
            key = rename.apply(key, rename in active, check)
        else:
            key = rename.apply(key, check)
    return key


def active_groups(
    keys, renames: tuple[Renaming, ...], model: ModelKeys | None = None
) -> tuple[frozenset[GroupRename], dict[str, str]]:
    """The group renames a checkpoint with `keys` activates (some key reaches its guard), and for
    each key a dependent source renames, the guard key it lacks (empty when none is missing).

    transformers activates a group at the first guard key in sorted key order and leaves dependent
    keys met before it unrenamed, so a checkpoint that has a guard key for some blocks and not for
    others loads half renamed; convert refuses it instead, naming the missing guard key.
    """
    model = model or ModelKeys()
    # Renames after the last group rename change nothing this returns: a family without one has nothing to do.
    groups = [i for i, rename in enumerate(renames) if isinstance(rename, GroupRename)]
    if not groups:
        return frozenset(), {}
    renames = renames[: groups[-1] + 1]
    # Each key as the renames before the current one leave it: a group matches keys at that point.
    partial = {key: key for key in keys if not model.keeps(key)}
    active: set[GroupRename] = set()
    missing: dict[str, str] = {}
    for rename in renames:
        if isinstance(rename, GroupRename):
            hits = {key: hit for key, text in partial.items() if (hit := rename.match(text)) is not None}
            # A block is named by the text before the match and the captured groups (the block number).
            block = {key: (partial[key][: m.start()], rename.groups(m, slot)) for key, (slot, m) in hits.items()}
            guarded = {block[key] for key, (slot, _) in hits.items() if slot == 0}
            if guarded:
                active.add(rename)
                for key, (slot, match) in hits.items():
                    if slot and block[key] not in guarded:
                        before, groups = block[key]
                        missing[key] = before + rename.source_text(0, groups) + partial[key][match.end() :]
            partial = {key: rename.apply(text, rename in active) for key, text in partial.items()}
        else:
            partial = {key: rename.apply(text) for key, text in partial.items()}
    return frozenset(active), missing
