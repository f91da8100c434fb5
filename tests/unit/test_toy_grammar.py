"""The toy prompt grammar: text <-> Scene round trips, clear parse errors, sampling and perturbation."""

import dataclasses

import numpy as np
import pytest

from imgalign.toy.grammar import (
    MAX_OBJECTS,
    PROMPT_KINDS,
    ObjectSpec,
    Scene,
    parse,
    perturb_scene,
    sample_prompt,
    sample_scene,
)


def test_examples_parse_to_the_expected_scene():
    assert parse("two small blue triangles on a gray background") == Scene(
        objects=(ObjectSpec("blue", "triangle", count=2, size="small"),), background="gray"
    )
    assert parse("a red circle left of a large yellow square") == Scene(
        objects=(ObjectSpec("red", "circle"), ObjectSpec("yellow", "square", size="large")),
        relation="left of",
    )
    assert parse("a green square and three red circles") == Scene(
        objects=(ObjectSpec("green", "square"), ObjectSpec("red", "circle", count=3))
    )


def test_synonyms_and_case_are_accepted_but_text_is_canonical():
    scene = parse("One Red Circle to the right of an  blue square.")
    assert scene.relation == "right of"
    assert scene.to_text() == "a red circle right of a blue square"
    assert parse("a red circle to the left of a blue square").relation == "left of"


@pytest.mark.parametrize("kind", [*PROMPT_KINDS, None])
def test_round_trip_text_and_scene(kind):
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng, kind)
        text = scene.to_text()
        assert parse(text) == scene, text
        assert parse(text).to_text() == text
        if kind is not None:
            assert scene.kind == kind


@pytest.mark.parametrize(
    ("prompt", "word"),
    [
        ("a purple circle", "purple"),  # unknown colour
        ("a red hexagon", "hexagon"),  # unknown shape
        ("two red circle", "circle"),  # singular noun after a plural count
        ("a red circles", "circles"),  # plural noun after "a"
        ("five red circles", "five"),  # count out of range
        ("a red circle near a blue square", "near"),  # unknown relation
        ("a red circle on a pink background", "pink"),  # unknown background
        ("a red circle on a white backdrop", "backdrop"),
        ("a red circle please", "please"),  # trailing words
    ],
)
def test_parse_error_names_the_prompt_and_the_word(prompt, word):
    with pytest.raises(ValueError) as error:
        parse(prompt)
    message = str(error.value)
    assert repr(prompt) in message
    assert repr(word) in message


@pytest.mark.parametrize(
    ("prompt", "reason"),
    [
        ("", "empty"),
        ("a red", "ends too early"),
        ("two red circles left of a blue square", "count 1"),  # relations are between single objects
        ("a red circle and a red circle", "differ"),  # indistinguishable groups
        ("three red circles and two blue squares", f"at most {MAX_OBJECTS}"),
    ],
)
def test_parse_error_for_well_formed_but_invalid_prompts(prompt, reason):
    with pytest.raises(ValueError, match=reason) as error:
        parse(prompt)
    assert repr(prompt) in str(error.value)


def test_scene_validation_names_bad_values():
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        ObjectSpec("pink", "circle")
    with pytest.raises(ValueError, match="count must be in 1..4"):
        ObjectSpec("red", "circle", count=0)
    with pytest.raises(ValueError, match="relation needs exactly two"):
        Scene(objects=(ObjectSpec("red", "circle"),), relation="above")


def test_sampling_is_deterministic_and_the_mixture_covers_every_kind():
    first = [sample_prompt(np.random.default_rng(7)) for _ in range(3)]
    assert len(set(first)) == 1  # same seed, same prompt
    rng = np.random.default_rng(1)
    kinds = [sample_scene(rng).kind for _ in range(2000)]
    for kind, weight in PROMPT_KINDS.items():
        share = kinds.count(kind) / len(kinds)
        assert abs(share - weight) < 0.04, (kind, share)
    with pytest.raises(ValueError, match="unknown prompt kind 'weird'"):
        sample_scene(rng, "weird")


def test_canonical_key_identifies_equivalent_scenes():
    key = parse("a red circle right of a blue square").canonical_key()
    assert key == parse("a blue square left of a red circle").canonical_key()
    assert (
        parse("a red circle below a blue square").canonical_key()
        == parse("a blue square above a red circle").canonical_key()
    )
    assert (
        parse("a red circle and a blue square").canonical_key()
        == parse("a blue square and a red circle").canonical_key()
    )
    assert key != parse("a red circle left of a blue square").canonical_key()


def _differences(scene: Scene, other: Scene) -> int:
    """Number of stated attributes that differ (group fields, relation, background)."""
    count = int(scene.relation != other.relation) + int(scene.background != other.background)
    for group, other_group in zip(scene.objects, other.objects):
        for field in dataclasses.fields(ObjectSpec):
            count += getattr(group, field.name) != getattr(other_group, field.name)
    return count


def test_perturb_changes_exactly_one_stated_attribute():
    rng = np.random.default_rng(3)
    for _ in range(500):
        scene = sample_scene(rng)
        other = perturb_scene(scene, rng)
        assert len(other.objects) == len(scene.objects)
        assert _differences(scene, other) == 1, (scene.to_text(), other.to_text())
        # An attribute the prompt leaves open is never what changes: unstated stays unstated.
        assert (other.background is None) == (scene.background is None)
        for group, other_group in zip(scene.objects, other.objects):
            assert (group.size is None) == (other_group.size is None)
