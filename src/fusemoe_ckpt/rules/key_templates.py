"""Map the keys of a checkpoint once per template: keys that differ only in their numbers map alike.

A frontier checkpoint has hundreds of thousands of keys and a few hundred shapes of key:
`model.layers.7.mlp.experts.311.gate_proj.weight` is `model.layers.#.mlp.experts.#.gate_proj.weight`
with 7 and 311. A *number* here is a whole dot-separated component of ASCII digits (`7`, `007`,
`311`; not the `1` of `w1`). Where no pattern of a family can tell one number from another, a key's
mapping is its template's mapping with the numbers put back, so each template is mapped once.

Whether the patterns can is decided per family, from the parsed regexes (`number_blind`); what a
replacement does to a key is checked as it is made (`_vouch`). The argument, for a key s and the
same key s' with other numbers (the placeholders), where every number stays a whole component:

- A number's digits ("N-characters") are bordered by dots or the ends of the key. So a character
  next to one that is neither an N-character nor a dot is no N-character either. A literal that is
  neither a digit nor a dot is *pinned* (matches no N-character, no dot); so is a one-character atom
  next to a pinned one that takes no dot. A one-character atom that can take a digit must be next
  to a pinned one (a bare `.` between letters: `mlp.experts`), so it never matches an N-character.
- Only a repeat can run over a number: its body is one character atom, taking every ASCII digit or
  none; one that takes digits is unbounded and needs at most one character, so it reaches the same
  positions around a number whatever the number's length.
- What can follow such a repeat fails inside a number (a pinned or digit-free atom, `^`, `$`,
  `(?!\\w)`), or is the end of the pattern after a greedy repeat (which stops only where its body
  fails, never inside a number). Nothing can start a searched pattern inside a number either.
  No backreference, lookbehind, word boundary, flag or atomic group is taken.

So every successful way through the pattern has its match, its groups and each repeat's end outside
the numbers, and the engine meets them in the same order in s and s': the matches correspond, and
what a replacement copies from the key carries whole numbers. transformers replaces the *first
occurrence* of the matched text: `_vouch` requires that text to start and end with no digit and,
with each run of digits read as one sign, to occur first where it was matched; an earlier
occurrence in s would be one of the signs in s', so there is none, whatever the numbers. It also
requires every placeholder of the result to be a whole component still, so the argument holds for
the next pattern. Scope prefixes, the model's prefix and head names hold no digit.

The numbers are put back without trusting any digit of the result: each template is mapped twice,
with placeholders of one length whose digits differ at every position between the two; where the
two results differ are exactly the copied placeholders. Anything else (results that do not line up,
a replacement not vouched for, an error) maps that key directly, as do all keys of a family that
fails the condition.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from functools import lru_cache, partial
from re import _constants as sre
from re import _parser as sre_parse

from .model_keys import ModelKeys
from .patterns import Converter, GroupRename, KeyMapping, Renaming, map_key

# A dot and a whole dot-separated component of ASCII digits after it; split() puts the numbers at the
# odd positions. (A key that starts with a number is mapped as it is.)
_NUMBER = re.compile(r"\.([0-9]+)(?![^.])")
_DIGITS = "0123456789"
_PLACEHOLDER_LENGTH = 8
# The second placeholder set differs from the first at every position: each digit d becomes d+5.
_SHIFTED = str.maketrans(_DIGITS, "5678901234")


class _NotBlind(Exception):
    """A construct that could tell numbers apart (the message says which)."""


def _placeholders(count: int) -> tuple[list[str], list[str]]:
    first = [str(10 ** (_PLACEHOLDER_LENGTH - 1) + i) for i in range(count)]
    return first, [p.translate(_SHIFTED) for p in first]


# Continuations, as seen from a position: GUARD fails wherever the next character is inside a number
# (past the start of the key); END is the end of the pattern with nothing in between; OTHER is anything else.
_GUARD, _END, _OTHER = "guard", "end", "other"


def _char_set(op, arg) -> tuple[bool, bool, bool]:
    """(takes some ASCII digit, takes every ASCII digit, takes a dot) of a one-character atom."""
    if op is sre.LITERAL:
        char = chr(arg)
        return char in _DIGITS, False, char == "."
    if op is sre.NOT_LITERAL:
        char = chr(arg)
        return True, char not in _DIGITS, char != "."
    if op is sre.ANY:
        return True, True, True
    if op is sre.IN:
        return _class_set(arg)
    raise _NotBlind(f"{op} is not a one-character atom")


_CATEGORIES = {
    # category: (takes digits, takes a dot)
    sre.CATEGORY_DIGIT: (True, False),
    sre.CATEGORY_NOT_DIGIT: (False, True),
    sre.CATEGORY_WORD: (True, False),
    sre.CATEGORY_NOT_WORD: (False, True),
    sre.CATEGORY_SPACE: (False, False),
    sre.CATEGORY_NOT_SPACE: (True, True),
}


def _class_set(items) -> tuple[bool, bool, bool]:
    digits: set[str] = set()
    dot = False
    negate = False
    for op, arg in items:
        if op is sre.NEGATE:
            negate = True
        elif op is sre.LITERAL:
            digits |= {chr(arg)} & set(_DIGITS)
            dot = dot or chr(arg) == "."
        elif op is sre.RANGE:
            low, high = arg
            digits |= {d for d in _DIGITS if low <= ord(d) <= high}
            dot = dot or low <= ord(".") <= high
        elif op is sre.CATEGORY and arg in _CATEGORIES:
            takes_digits, takes_dot = _CATEGORIES[arg]
            digits |= set(_DIGITS) if takes_digits else set()
            dot = dot or takes_dot
        else:
            raise _NotBlind(f"character class item {op} {arg}")
    if negate:
        digits, dot = set(_DIGITS) - digits, not dot
    return bool(digits), len(digits) == len(_DIGITS), dot


_ONE_CHARACTER = (sre.LITERAL, sre.NOT_LITERAL, sre.ANY, sre.IN)


def _pinned(items) -> list[bool]:
    """Which items of a sequence are one-character atoms that match neither an N-character nor a dot."""
    atoms = [op in _ONE_CHARACTER for op, _ in items]
    sets = [_char_set(op, arg) if atom else None for (op, arg), atom in zip(items, atoms, strict=True)]
    pinned = [
        atom and op is sre.LITERAL and chr(arg) not in _DIGITS and chr(arg) != "."
        for (op, arg), atom in zip(items, atoms, strict=True)
    ]
    changed = True
    while changed:
        changed = False
        for i, atom in enumerate(atoms):
            if atom and not pinned[i] and not sets[i][2] and _next_to_pinned(pinned, i):
                pinned[i] = changed = True
    return pinned


def _next_to_pinned(pinned: list[bool], i: int) -> bool:
    return (i > 0 and pinned[i - 1]) or (i + 1 < len(pinned) and pinned[i + 1])


def _sequence(items, after: str) -> str:
    """Check `items` followed by the continuation `after`; the continuation seen at their start."""
    items = list(items)
    pinned = _pinned(items)
    for i in reversed(range(len(items))):
        after = _item(items[i], after, next_to_pinned=_next_to_pinned(pinned, i))
    return after


def _item(item, after: str, *, next_to_pinned: bool) -> str:
    op, arg = item
    if op in _ONE_CHARACTER:
        some_digit, _, _ = _char_set(op, arg)
        if some_digit and not next_to_pinned:
            raise _NotBlind("a one-character atom that can match a digit, with no letter beside it")
        return _GUARD
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):
        low, high, body = arg
        body = list(body)
        if len(body) != 1 or body[0][0] not in _ONE_CHARACTER:
            # `(_scale_inv)?`: a repeat that takes no digit runs over template text only.
            if not _takes_no_digit(body):
                raise _NotBlind("a repeat of more than one character atom that can take a digit")
            first = _sequence(body, _GUARD if after == _GUARD else _OTHER)
            return _GUARD if first == _GUARD and (low > 0 or after == _GUARD) else _OTHER
        some_digit, every_digit, _ = _char_set(*body[0])
        if not some_digit:
            # Runs over template text only: before a number it matches nothing, or fails.
            return _GUARD if low > 0 or after == _GUARD else _OTHER
        if not every_digit or high != sre.MAXREPEAT or low > 1:
            raise _NotBlind("a repeat over some digits, or of bounded length")
        if after == _END and op is sre.MAX_REPEAT:
            return _OTHER  # greedy: it stops where its body fails, never inside a number
        if after != _GUARD:
            raise _NotBlind("a repeat over digits that could stop inside a number")
        return _OTHER
    if op is sre.SUBPATTERN:
        _group, add_flags, del_flags, body = arg
        if add_flags or del_flags:
            raise _NotBlind("an inline flag")
        return _sequence(body, after)
    if op is sre.BRANCH:
        kinds = {_sequence(branch, after) for branch in arg[1]}
        return kinds.pop() if len(kinds) == 1 else _OTHER
    if op is sre.AT:
        if arg in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING, sre.AT_END, sre.AT_END_STRING):
            return _GUARD
        raise _NotBlind(f"the assertion {arg}")
    if op in (sre.ASSERT, sre.ASSERT_NOT):
        direction, body = arg
        if direction != 1:
            raise _NotBlind("a lookbehind")
        body = list(body)
        if len(body) == 1 and body[0][0] in _ONE_CHARACTER:
            some_digit, every_digit, _ = _char_set(*body[0])
            # One character looked at outside a number: the same one, or a digit of both numbers.
            if every_digit and op is sre.ASSERT_NOT:
                return _GUARD  # `(?!\w)`: fails wherever a digit comes next
            if every_digit or not some_digit:
                return _GUARD if after == _GUARD else _OTHER
        _sequence(body, _END)
        return _GUARD if after == _GUARD else _OTHER
    raise _NotBlind(f"{op}")


def _takes_no_digit(items) -> bool:
    """Whether `items` consume nothing but non-digits (groups, alternatives and anchors of such)."""
    for op, arg in items:
        if op in _ONE_CHARACTER:
            if _char_set(op, arg)[0]:
                return False
        elif op is sre.SUBPATTERN:
            if not _takes_no_digit(arg[3]):
                return False
        elif op is sre.BRANCH:
            if not all(_takes_no_digit(branch) for branch in arg[1]):
                return False
        elif op is not sre.AT:
            return False
    return True


def check_pattern(pattern: str, *, searched: bool = True) -> None:
    """Raise _NotBlind unless `pattern` cannot tell numbers apart (see the module's docstring).

    `searched`: found anywhere (re.search), so nothing may start it inside a number.
    """
    parsed = sre_parse.parse(pattern)
    if parsed.state.flags & ~sre.SRE_FLAG_UNICODE:
        raise _NotBlind("a flag")
    if _sequence(parsed, _END) != _GUARD and searched:
        raise _NotBlind("a match could start inside a number")


def _digit_free(text: str) -> bool:
    return not any(char in _DIGITS for char in text)


@lru_cache(maxsize=64)
def number_blind(renames: tuple[Renaming, ...], converters: tuple[Converter, ...], model: ModelKeys) -> str | None:
    """None when mapping keys through these renames, converters and model keys cannot tell numbers
    apart (the module's docstring says why that suffices); else what could, naming the pattern."""
    checks: list[tuple[str, bool]] = []
    for transform in (*renames, *converters):
        scope = getattr(transform, "scope", None)
        if scope is not None and not (_digit_free(scope.prefix) and _digit_free(scope.base)):
            return f"scope {scope.base}.{scope.prefix} holds a digit"
        checks.append((transform._regex.pattern, True))
    checks += [(pattern, False) for pattern in model.kept]
    if not _digit_free(model.prefix) or not all(_digit_free(head) for head in model.head):
        return f"model prefix {model.prefix!r} or head {model.head} holds a digit"
    for pattern, searched in checks:
        try:
            check_pattern(pattern, searched=searched)
        except _NotBlind as e:
            return f"{pattern!r}: {e}"
        except re.error as e:
            return f"{pattern!r}: {e}"
    return None


def key_mapper(
    renames: tuple[Renaming, ...],
    converters: tuple[Converter, ...],
    model: ModelKeys | None = None,
    active: frozenset[GroupRename] = frozenset(),
) -> Callable[[str], KeyMapping]:
    """`map_key` with these arguments, as a function of the key: by template where the family allows it."""
    model = model or ModelKeys()
    if number_blind(renames, converters, model) is not None:
        return partial(map_key, renames=renames, converters=converters, model=model, active=active)
    return _TemplateMapper((renames, converters, model, active))


def map_keys(
    keys,
    renames: tuple[Renaming, ...],
    converters: tuple[Converter, ...],
    model: ModelKeys | None = None,
    active: frozenset[GroupRename] = frozenset(),
) -> dict[str, KeyMapping]:
    """`map_key` of every key of `keys`, each template mapped once where the family allows it."""
    mapping_of = key_mapper(renames, converters, model, active)
    return {key: mapping_of(key) for key in keys}


class _TemplateMapper:
    """map_key by template, for a family `number_blind` accepts: a few hundred templates remembered."""

    def __init__(self, args: tuple) -> None:
        self._args = args
        # template -> (format of the target, converter, slot, format of the expert or None), or None: map directly
        self._recipes: dict[tuple[str, ...], tuple | None] = {}

    def __call__(self, key: str) -> KeyMapping:
        parts = _NUMBER.split(key)
        numbers = parts[1::2]
        if not numbers or "0" <= key[0] <= "9":  # _NUMBER does not take a number that starts the key
            return map_key(key, *self._args)
        template = tuple(parts[0::2])
        recipe = self._recipes.get(template, 0)
        if recipe == 0:
            recipe = self._recipes[template] = _recipe(template, len(numbers), self._args)
        if recipe is None:
            return map_key(key, *self._args)
        target, converter, slot, expert = recipe
        if converter is None:
            return KeyMapping(target=target.format(*numbers))
        return KeyMapping(
            target=sys.intern(target.format(*numbers)),
            converter=converter,
            slot=slot,
            expert=None if expert is None else sys.intern(expert.format(*numbers)),
        )


def _recipe(texts: tuple[str, ...], count: int, args: tuple) -> tuple | None:
    """How the keys of one template map: formats that put the numbers back, or None where that
    cannot be vouched for (the keys are mapped directly)."""
    first, second = _placeholders(count)
    try:
        a = map_key(_fill(texts, first), *args, check=_vouch)
        b = map_key(_fill(texts, second), *args, check=_vouch)
    except Exception:  # noqa: BLE001 - the key is mapped directly, which raises what it raises
        return None
    if a.converter is not b.converter or a.slot != b.slot or (a.expert is None) != (b.expert is None):
        return None
    index = {placeholder: i for i, placeholder in enumerate(first)}
    target = _format(a.target, b.target, index, first, second)
    expert = None if a.expert is None else _format(a.expert, b.expert, index, first, second)
    if target is None or (a.expert is not None and expert is None):
        return None
    return target, a.converter, a.slot, expert


class _Unvouched(Exception):
    """A replacement whose outcome for other numbers the template's cannot vouch for."""


_RUN = re.compile("[0-9]+")


def _vouch(key: str, match: re.Match[str], replaced: str) -> None:
    """Raise _Unvouched unless this replacement, made in a key of placeholders, is the one made in
    every key of the template (the module's docstring says why these suffice):

    - the matched text starts and ends with no digit, and with every run of digits taken as one
      sign it first occurs where it was matched: transformers' replace of the first occurrence then
      replaces there whatever the numbers, equal or not;
    - in the result, each placeholder is still a whole dot-separated component: every run of
      placeholder length or more is one placeholder between dots (or the ends).
    """
    text = match.group(0)
    if text:
        if text[0] in _DIGITS or text[-1] in _DIGITS:
            raise _Unvouched(text)
        sign = _RUN.sub("#", key)
        if sign.find(_RUN.sub("#", text)) != len(_RUN.sub("#", key[: match.start()])):
            raise _Unvouched(text)
    for run in _RUN.finditer(replaced):
        if run.end() - run.start() < _PLACEHOLDER_LENGTH:
            continue
        start, end = run.span()
        if (
            end - start != _PLACEHOLDER_LENGTH
            or replaced[start - 1 : start] not in ("", ".")
            or (replaced[end : end + 1] not in ("", "."))
        ):
            raise _Unvouched(replaced)


def _fill(texts: list[str], numbers: list[str]) -> str:
    """The key whose text between its numbers is `texts` (as _NUMBER.split leaves it: without the
    dot before each number)."""
    return texts[0] + "".join(f".{number}{text}" for number, text in zip(numbers, texts[1:], strict=True))


def _format(a: str, b: str, index: dict[str, int], first: list[str], second: list[str]) -> str | None:
    """A str.format template of `a` with each placeholder (where `a` and `b` differ) as its number's
    index, or None where the two do not differ by whole placeholders."""
    if len(a) != len(b):
        return None
    out, start, i = [], 0, 0
    while i < len(a):
        if a[i] == b[i]:
            i += 1
            continue
        chunk = a[i : i + _PLACEHOLDER_LENGTH]
        if chunk not in index or b[i : i + _PLACEHOLDER_LENGTH] != second[first.index(chunk)]:
            return None
        out += [_escape(a[start:i]), "{", str(index[chunk]), "}"]
        i = start = i + _PLACEHOLDER_LENGTH
    out.append(_escape(a[start:]))
    return "".join(out)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")
