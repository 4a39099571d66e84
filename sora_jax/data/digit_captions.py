"""The moving-digits caption grammar: the 8 motion directions, ``caption`` (a varied English sentence for 1-2
(digit, direction) objects) and its inverse ``parse_prompt`` (also used on user prompts at sampling and
evaluation time). ``sora_jax.data.moving_digits`` (the generator) re-exports all of it."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

MAX_OBJECTS = 2

DIRECTIONS = ("left", "right", "up", "down", "up-left", "up-right", "down-left", "down-right")
_R = 1.0 / math.sqrt(2.0)
# Unit (dy, dx) per direction id; image rows grow downwards, so "up" is -y.
DIRECTION_VECTORS = np.array(
    [(0, -1), (0, 1), (-1, 0), (1, 0), (-_R, -_R), (-_R, _R), (_R, -_R), (_R, _R)], np.float64
)
# (dy sign, dx sign) -> direction id.
_SIGNS_TO_DIRECTION = {
    (int(np.sign(dy)), int(np.sign(dx))): i for i, (dy, dx) in enumerate(DIRECTION_VECTORS.tolist())
}

# ----------------------------------------------------------------------------------------------------------
# Captions


NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_VERBS = (("moves", "moving"), ("drifts", "drifting"), ("slides", "sliding"), ("goes", "going"))
_VERBS += (("travels", "traveling"), ("glides", "gliding"))
# Verbs that carry the direction themselves (used without a direction phrase).
_VERTICAL_VERBS = {
    2: (("rises", "rising"), ("climbs", "climbing")),
    3: (("falls", "falling"), ("sinks", "sinking"), ("drops", "dropping")),
}
_DIRECTION_PHRASES = {
    0: ("left", "to the left", "leftward", "leftwards", "towards the left"),
    1: ("right", "to the right", "rightward", "rightwards", "towards the right"),
    2: ("up", "upward", "upwards", "towards the top"),
    3: ("down", "downward", "downwards", "towards the bottom"),
}
for _i, (_v, _h) in enumerate(
    (("up", "left"), ("up", "right"), ("down", "left"), ("down", "right")), start=4
):
    _vert = "upper" if _v == "up" else "lower"
    _side = "top" if _v == "up" else "bottom"
    _DIRECTION_PHRASES[_i] = (
        f"{_v}-{_h}",
        f"{_v} and to the {_h}",
        f"diagonally {_v}-{_h}",
        f"{_v} and {_h}",
        f"towards the {_vert} {_h}",
        f"towards the {_side} {_h}",
    )
_PREFIXES = ("", "", "a video of ", "a clip of ")


def _subject(rng: np.random.Generator, digit: int) -> str:
    x = str(digit) if rng.random() < 0.5 else NUMBER_WORDS[digit]
    form = int(rng.integers(3))
    if form == 0:
        return f"{'an' if digit == 8 else 'a'} {x}"
    return f"the digit {x}" if form == 1 else f"the number {x}"


def _clause(rng: np.random.Generator, digit: int, direction: int, participle: bool) -> str:
    form = int(participle)
    if direction in _VERTICAL_VERBS and rng.random() < 0.4:
        verbs = _VERTICAL_VERBS[direction]
        return f"{_subject(rng, digit)} {verbs[rng.integers(len(verbs))][form]}"
    verb = _VERBS[rng.integers(len(_VERBS))][form]
    phrases = _DIRECTION_PHRASES[direction]
    return f"{_subject(rng, digit)} {verb} {phrases[rng.integers(len(phrases))]}"


def caption(rng: np.random.Generator, objects: Sequence[tuple[int, int]]) -> str:
    """A varied English caption for 1-2 objects [(digit, direction id), ...]; inverted by ``parse_prompt``.

    rng: numpy Generator; objects: 1..2 pairs of (digit 0..9, direction id 0..7).
    """
    objects = [(int(d), int(k)) for d, k in objects]
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise ValueError(f"caption: expected 1..{MAX_OBJECTS} objects, got {len(objects)}")
    participle = bool(rng.random() < 0.4)
    clauses = [_clause(rng, d, k, participle) for d, k in objects]
    if participle:
        prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
        joiners = (" and ", " next to ", " beside ")
    else:
        prefix = ""
        joiners = (" while ", " and ", ", and ", " as ", "; meanwhile ")
    text = clauses[0]
    if len(clauses) == 2:
        text += joiners[rng.integers(len(joiners))] + clauses[1]
    return prefix + text


_DIGIT_TOKENS = {str(d): d for d in range(10)} | {w: d for d, w in enumerate(NUMBER_WORDS)}
_UP_WORDS = ("up", "upward", "upwards", "top", "upper", "north")
_UP_WORDS += ("rises", "rise", "rising", "climbs", "climb", "climbing", "ascends", "ascend", "ascending")
_DOWN_WORDS = ("down", "downward", "downwards", "bottom", "lower", "south")
_DOWN_WORDS += ("falls", "fall", "falling", "sinks", "sink", "sinking", "drops", "drop", "dropping")
_DOWN_WORDS += ("descends", "descend", "descending")
_VERTICAL_TOKENS = {**dict.fromkeys(_UP_WORDS, -1), **dict.fromkeys(_DOWN_WORDS, 1)}
_HORIZONTAL_TOKENS = {
    **dict.fromkeys(["left", "leftward", "leftwards", "west"], -1),
    **dict.fromkeys(["right", "rightward", "rightwards", "east"], 1),
}
# Plural nouns that make the number before them a count ("two digits: ..."), not a digit.
_COUNT_NOUNS = frozenset({"digits", "numbers", "numerals", "objects"})
_COMPASS = {"northwest": (-1, -1), "northeast": (-1, 1), "southwest": (1, -1), "southeast": (1, 1)}


def _direction_of(tokens: Sequence[str]) -> int | None:
    """Direction id named by a run of tokens (first vertical and first horizontal word), or None."""
    sy = sx = 0
    for tok in tokens:
        if tok in _COMPASS:
            cy, cx = _COMPASS[tok]
            sy, sx = sy or cy, sx or cx
        sy = sy or _VERTICAL_TOKENS.get(tok, 0)
        sx = sx or _HORIZONTAL_TOKENS.get(tok, 0)
    return _SIGNS_TO_DIRECTION.get((sy, sx))


def parse_prompt(text: str) -> list[tuple[int, int]]:
    """Recovers [(digit, direction id), ...] from a caption or a simple prompt; [] when nothing parses.

    A digit is a numeral 0-9 or a number word; its direction is read from the words after it (up to the
    next digit), else the words before it, else it is shared with the next object ("a 3 and a 7 moving
    left"). A count such as "two digits:" or "2 numbers" (followed by a plural noun) is not a digit.
    Digits without any direction are dropped.
    """
    tokens = re.findall(r"[a-z]+|\d+", text.lower())
    mentions = [
        i
        for i, t in enumerate(tokens)
        if t in _DIGIT_TOKENS and (i + 1 == len(tokens) or tokens[i + 1] not in _COUNT_NOUNS)
    ]
    bounds = [-1, *mentions, len(tokens)]
    dirs: list[int | None] = []
    for j, i in enumerate(mentions):
        after = _direction_of(tokens[i + 1 : bounds[j + 2]])
        dirs.append(after if after is not None else _direction_of(tokens[bounds[j] + 1 : i]))
    for j in range(len(dirs) - 2, -1, -1):
        if dirs[j] is None:
            dirs[j] = dirs[j + 1]
    return [(_DIGIT_TOKENS[tokens[i]], k) for i, k in zip(mentions, dirs) if k is not None]
