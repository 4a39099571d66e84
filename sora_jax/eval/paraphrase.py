"""Paraphrased prompts for moving digits: wordings the training captions never use, same labels.

The captions of ``sora_jax/data/moving_digits.py`` say "a 3" / "the digit three" / "the number 3", with the
verbs moves, drifts, slides, goes, travels, glides, rises, climbs, falls, sinks, drops. These prompts name
the digits and motions with other words ("a handwritten 3 wanders off to the left", "the numeral seven
heads in the upward direction") so ``sora-jax eval --paraphrases`` measures whether a text encoder
generalises beyond the caption templates (a pretrained one should; a hashed bag of words cannot for unseen
words, though the digit and direction words it knows still carry it). Every prompt is checked to parse back
(``parse_prompt``) to the objects it was made from, so the evaluator scores it like any caption.
"""

from __future__ import annotations

import numpy as np

from sora_jax.data.moving_digits import NUMBER_WORDS, parse_prompt

_SUBJECTS = ("a handwritten {x}", "the numeral {x}", "a single {x}", "a little {x}", "a scribbled {x}")
_VERBS = ("wanders", "heads", "shifts", "scrolls", "floats", "makes its way")
_DIRECTIONS = {
    0: ("off to the left", "over to the left side", "leftwards across the frame"),
    1: ("off to the right", "over to the right side", "rightwards across the frame"),
    2: ("in the upward direction", "up the frame", "upwards across the frame"),
    3: ("in the downward direction", "down the frame", "downwards across the frame"),
    4: ("up and off to the left", "towards the upper left corner"),
    5: ("up and off to the right", "towards the upper right corner"),
    6: ("down and off to the left", "towards the lower left corner"),
    7: ("down and off to the right", "towards the lower right corner"),
}
_JOINERS = (" while at the same time ", ", whereas ", " and simultaneously ")


def paraphrase_prompts(num: int, seed: int = 0, max_objects: int = 2) -> list[str]:
    """``num`` prompts of 1..max_objects (distinct digit, direction) objects in unseen wordings."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < num:
        k = int(rng.integers(1, max_objects + 1))
        digits = rng.choice(10, size=k, replace=False)
        objects = [(int(d), int(rng.integers(8))) for d in digits]
        clauses = []
        for d, direction in objects:
            x = str(d) if rng.random() < 0.5 else NUMBER_WORDS[d]
            subject = _SUBJECTS[rng.integers(len(_SUBJECTS))].format(x=x)
            phrase = _DIRECTIONS[direction][rng.integers(len(_DIRECTIONS[direction]))]
            clauses.append(f"{subject} {_VERBS[rng.integers(len(_VERBS))]} {phrase}")
        text = _JOINERS[rng.integers(len(_JOINERS))].join(clauses)
        if parse_prompt(text) == objects:  # scored like any caption
            out.append(text)
    return out
