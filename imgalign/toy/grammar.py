"""The toy world's prompt grammar: scenes of coloured shapes, as data and as text.

A toy prompt describes at most two *groups* of identical objects, an optional spatial relation between
the two groups and an optional background::

    a red circle
    three small blue triangles on a gray background
    a red circle and a large yellow square
    a green triangle left of a blue circle on a white background

The grammar, in the order the words appear::

    scene    := group [("and" | relation) group] ["on" "a" BACKGROUND "background"]
    group    := COUNT [SIZE] COLOUR SHAPE          # SHAPE is plural when COUNT > 1
    relation := "left of" | "right of" | "above" | "below"     # "to the left of" is also accepted
    COUNT    := "a" | "an" | "one" | "two" | "three" | "four"

`Scene` is the structured form; `Scene.to_text()` and `parse()` convert between the two and round-trip
exactly. `sample_scene()` draws random scenes from a fixed mixture of prompt kinds, and `perturb_scene()`
changes exactly one attribute, which gives "wrong prompt" negatives for tests and preference data.

The palette is chosen for tiny generators at 32 px: the four object colours and the two extreme
backgrounds are corners of the RGB cube (pairwise distance >= 255) and gray is its centre (distance 221 to
every corner), so a blurry, noisy sample still has an unambiguous nearest palette colour.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# --- vocabulary -------------------------------------------------------------------------------------

#: Object colours as RGB. Corners of the RGB cube: any two are at least 255 apart (Euclidean).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}

#: Background colours as RGB. White and black are the two remaining cube corners; gray is the centre.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: A scene may hold at most this many objects in total (the renderer lays them out on a 2 x 2 grid).
MAX_OBJECTS = 4
MAX_COUNT = 4

_COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
_WORD_COUNTS: dict[str, int] = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}
_SINGULARS: dict[str, str] = {plural: shape for shape, plural in _PLURALS.items()}

#: Prompt kinds understood by `sample_scene`, with the weights of the default mixture.
PROMPT_KINDS: dict[str, float] = {"single": 0.25, "count": 0.25, "pair": 0.2, "relation": 0.3}


# --- structured scenes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One group of identical objects: ``count`` copies of a ``size`` ``colour`` ``shape``.

    ``size`` is None when the prompt does not mention a size (the renderer then picks one at random and
    the evaluator does not check it).
    """

    colour: str
    shape: str
    count: int = 1
    size: str | None = None

    def __post_init__(self) -> None:
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {sorted(COLOURS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {list(SHAPES)}")
        if not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be in 1..{MAX_COUNT}, got {self.count}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {list(SIZES)} or None")

    def to_text(self) -> str:
        """The group as words, e.g. ``"a red circle"`` or ``"two small blue squares"``."""
        noun = self.shape if self.count == 1 else _PLURALS[self.shape]
        words = [_COUNT_WORDS[self.count], self.size, self.colour, noun]
        return " ".join(word for word in words if word is not None)


@dataclass(frozen=True)
class Scene:
    """A parsed toy prompt: one or two object groups, an optional relation and an optional background.

    ``relation`` relates ``objects[0]`` (the subject) to ``objects[1]`` (the reference): "A left of B"
    means A's centre is to the left of B's centre. Both groups of a relation hold exactly one object, so
    the relation is unambiguous. The groups must differ in colour or shape, otherwise neither a reader
    nor the evaluator could tell which object is which.
    """

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        # Accept any sequence for convenience but store a tuple, so scenes stay hashable.
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two object groups, got {len(self.objects)}")
        if self.total_objects > MAX_OBJECTS:
            raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects, got {self.total_objects}")
        if len(self.objects) == 2:
            first, second = self.objects
            if (first.colour, first.shape) == (second.colour, second.shape):
                raise ValueError(
                    f"the two groups must differ in colour or shape, both are {first.colour} {first.shape}"
                )
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; expected one of {list(RELATIONS)}")
            if len(self.objects) != 2:
                raise ValueError("a relation needs exactly two object groups")
            if any(group.count != 1 for group in self.objects):
                raise ValueError("both objects of a relation must have count 1")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {sorted(BACKGROUNDS)}")

    @property
    def total_objects(self) -> int:
        return sum(group.count for group in self.objects)

    @property
    def kind(self) -> str:
        """The prompt kind this scene belongs to: single, count, pair or relation."""
        if self.relation is not None:
            return "relation"
        if len(self.objects) == 2:
            return "pair"
        return "count" if self.objects[0].count > 1 else "single"

    def to_text(self) -> str:
        """The canonical prompt text; ``parse(scene.to_text()) == scene`` for every valid scene."""
        text = self.objects[0].to_text()
        if len(self.objects) == 2:
            joiner = self.relation if self.relation is not None else "and"
            text = f"{text} {joiner} {self.objects[1].to_text()}"
        if self.background is not None:
            text = f"{text} on a {self.background} background"
        return text

    def canonical_key(self) -> tuple:
        """A key equal for scenes that mean the same thing, used to keep prompt splits disjoint.

        "A and B" means "B and A", "A right of B" means "B left of A" and "A below B" means "B above A".
        """
        objects, relation = self.objects, self.relation
        if relation in ("right of", "below"):
            objects, relation = objects[::-1], {"right of": "left of", "below": "above"}[relation]
        elif relation is None:
            objects = tuple(sorted(objects, key=lambda g: (g.colour, g.shape, g.count, g.size or "")))
        return (tuple(dataclasses.astuple(group) for group in objects), relation, self.background)


# --- parsing ----------------------------------------------------------------------------------------


class _Tokens:
    """A cursor over the words of one prompt that raises errors naming the prompt and the word."""

    def __init__(self, text: str):
        self.text = text
        self.words = text.strip().rstrip(".").lower().split()
        self.position = 0

    def peek(self, offset: int = 0) -> str | None:
        index = self.position + offset
        return self.words[index] if index < len(self.words) else None

    def take(self) -> str:
        word = self.peek()
        if word is None:
            raise ValueError(f"cannot parse toy prompt {self.text!r}: it ends too early")
        self.position += 1
        return word

    def error(self, word: str, expected: Sequence[str]) -> ValueError:
        return ValueError(
            f"cannot parse toy prompt {self.text!r}: unrecognised word {word!r} "
            f"(word {self.position} of {len(self.words)}); expected one of {list(expected)}"
        )

    def expect(self, *choices: str) -> str:
        word = self.take()
        if word not in choices:
            self.position -= 1
            raise self.error(word, choices)
        return word


def _parse_group(tokens: _Tokens) -> ObjectSpec:
    count_word = tokens.take()
    if count_word not in _WORD_COUNTS:
        tokens.position -= 1
        raise tokens.error(count_word, list(_WORD_COUNTS))
    count = _WORD_COUNTS[count_word]
    size = tokens.take() if tokens.peek() in SIZES else None
    colour = tokens.expect(*COLOURS)
    noun = tokens.take()
    expected_nouns = SHAPES if count == 1 else tuple(_PLURALS.values())
    if noun not in expected_nouns:
        tokens.position -= 1
        raise tokens.error(noun, expected_nouns)
    shape = noun if count == 1 else _SINGULARS[noun]
    return ObjectSpec(colour=colour, shape=shape, count=count, size=size)


def _parse_relation(tokens: _Tokens) -> str | None:
    """Consume a relation phrase if one starts here; return its canonical name, else None."""
    word = tokens.peek()
    if word in ("above", "below"):
        tokens.take()
        return word
    if word == "to" and tokens.peek(1) == "the":  # "to the left of" is a synonym of "left of"
        tokens.take()
        tokens.take()
        word = tokens.peek()
        if word not in ("left", "right"):
            raise tokens.error(str(word), ["left", "right"])
    if word in ("left", "right"):
        tokens.take()
        tokens.expect("of")
        return f"{word} of"
    return None


def parse(text: str) -> Scene:
    """Parse a toy prompt into a `Scene`.

    Raises:
        ValueError: naming the prompt and the first word that does not fit the grammar, or the rule a
            well-formed prompt breaks (e.g. a relation between groups of more than one object).
    """
    tokens = _Tokens(text)
    if not tokens.words:
        raise ValueError(f"cannot parse toy prompt {text!r}: it is empty")
    objects = [_parse_group(tokens)]
    relation = None
    if tokens.peek() == "and":
        tokens.take()
        objects.append(_parse_group(tokens))
    else:
        relation = _parse_relation(tokens)
        if relation is not None:
            objects.append(_parse_group(tokens))
    background = None
    if tokens.peek() is not None:
        tokens.expect("on")
        tokens.expect("a")
        background = tokens.expect(*BACKGROUNDS)
        tokens.expect("background")
    if tokens.peek() is not None:
        raise tokens.error(tokens.peek(), ["<end of prompt>"])
    try:
        return Scene(objects=tuple(objects), relation=relation, background=background)
    except ValueError as error:
        raise ValueError(f"invalid toy prompt {text!r}: {error}") from None


# --- sampling ---------------------------------------------------------------------------------------


def _choice(rng: np.random.Generator, options: Sequence):
    """rng.choice for a sequence of arbitrary objects (np.choice would turn None into an array item)."""
    return options[int(rng.integers(len(options)))]


def _sample_size(rng: np.random.Generator) -> str | None:
    # Sizes are mentioned in 40% of groups so that most prompts stay short.
    return _choice(rng, SIZES) if rng.random() < 0.4 else None


def _sample_background(rng: np.random.Generator) -> str | None:
    return _choice(rng, tuple(BACKGROUNDS)) if rng.random() < 0.6 else None


def _sample_distinct_pair(rng: np.random.Generator) -> tuple[tuple[str, str], tuple[str, str]]:
    """Two (colour, shape) pairs that differ in colour or shape, uniformly among such ordered pairs."""
    kinds = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    first = int(rng.integers(len(kinds)))
    second = int(rng.integers(len(kinds) - 1))
    second += second >= first  # skip the first pick without rejection sampling
    return kinds[first], kinds[second]


def sample_scene(rng: np.random.Generator, kind: str | None = None) -> Scene:
    """Draw a random scene.

    Args:
        rng: the source of randomness; the same generator state gives the same scene.
        kind: "single" (one object), "count" (2 to 4 identical objects), "pair" (two different objects,
            "A and B"), "relation" ("A left of B" etc.) or None for the default mixture `PROMPT_KINDS`.
    """
    if kind is None:
        names, weights = list(PROMPT_KINDS), np.array(list(PROMPT_KINDS.values()))
        kind = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    if kind in ("single", "count"):
        count = 1 if kind == "single" else int(rng.integers(2, MAX_COUNT + 1))
        group = ObjectSpec(_choice(rng, tuple(COLOURS)), _choice(rng, SHAPES), count, _sample_size(rng))
        return Scene(objects=(group,), background=_sample_background(rng))
    if kind in ("pair", "relation"):
        (colour_a, shape_a), (colour_b, shape_b) = _sample_distinct_pair(rng)
        groups = (
            ObjectSpec(colour_a, shape_a, 1, _sample_size(rng)),
            ObjectSpec(colour_b, shape_b, 1, _sample_size(rng)),
        )
        relation = _choice(rng, RELATIONS) if kind == "relation" else None
        return Scene(objects=groups, relation=relation, background=_sample_background(rng))
    raise ValueError(f"unknown prompt kind {kind!r}; expected one of {list(PROMPT_KINDS)} or None")


def sample_prompt(rng: np.random.Generator, kind: str | None = None) -> str:
    """Draw a random prompt text; see `sample_scene` for the kinds."""
    return sample_scene(rng, kind).to_text()


def perturb_scene(scene: Scene, rng: np.random.Generator, max_tries: int = 100) -> Scene:
    """Return a scene that contradicts ``scene`` in exactly one of the attributes ``scene`` states.

    The changed attribute is one of: a group's colour, shape or count, a stated size (small <-> large),
    the relation, or a stated background. Attributes the prompt leaves open (an unstated size or
    background) are never "changed", because any value satisfies the original prompt. A render of the
    result is therefore a true negative for ``scene``: the evaluator should reject it.
    """
    for _ in range(max_tries):
        attribute = _choice(rng, ("colour", "shape", "count", "size", "relation", "background"))
        index = int(rng.integers(len(scene.objects)))
        group = scene.objects[index]
        new_group, relation, background = group, scene.relation, scene.background
        if attribute == "colour":
            new_group = dataclasses.replace(
                group, colour=_choice(rng, [c for c in COLOURS if c != group.colour])
            )
        elif attribute == "shape":
            new_group = dataclasses.replace(
                group, shape=_choice(rng, [s for s in SHAPES if s != group.shape])
            )
        elif attribute == "count" and scene.relation is None:
            new_group = dataclasses.replace(
                group, count=_choice(rng, [n for n in range(1, MAX_COUNT + 1) if n != group.count])
            )
        elif attribute == "size" and group.size is not None:
            new_group = dataclasses.replace(group, size="large" if group.size == "small" else "small")
        elif attribute == "relation" and scene.relation is not None:
            relation = _choice(rng, [r for r in RELATIONS if r != scene.relation])
        elif attribute == "background" and scene.background is not None:
            background = _choice(rng, [b for b in BACKGROUNDS if b != scene.background])
        else:
            continue  # the attribute is not stated in this scene; pick another
        objects = list(scene.objects)
        objects[index] = new_group
        try:
            return Scene(objects=tuple(objects), relation=relation, background=background)
        except ValueError:
            continue  # e.g. both groups became "red circle", or more than MAX_OBJECTS objects
    raise RuntimeError(f"could not perturb {scene.to_text()!r} in {max_tries} tries")
