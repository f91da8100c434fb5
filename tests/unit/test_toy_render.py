"""The toy renderer: determinism, exact ground truth and the layout rules the evaluator relies on."""

import dataclasses
import itertools

import numpy as np
import pytest

from imgalign.toy.evaluator import relation_holds
from imgalign.toy.grammar import BACKGROUNDS, COLOURS, RELATIONS, parse, sample_scene
from imgalign.toy.render import SIZE_RANGES, SIZE_THRESHOLD, _inset, render


def test_same_seed_gives_the_same_image_and_ground_truth():
    scene = parse("three yellow triangles")
    image_a, truth_a = render(scene, np.random.default_rng(11))
    image_b, truth_b = render(scene, np.random.default_rng(11))
    assert image_a.tobytes() == image_b.tobytes()
    assert truth_a == truth_b
    # ...and other seeds give other layouts.
    layouts = {render(scene, np.random.default_rng(seed))[0].tobytes() for seed in range(10)}
    assert len(layouts) == 10


def test_prompt_text_is_accepted_and_tiny_canvases_are_refused():
    image, truth = render("a red circle on a black background", np.random.default_rng(0), size=48)
    assert image.size == (48, 48) and image.mode == "RGB"
    assert truth.background == "black"
    with pytest.raises(ValueError, match="at least 32 px"):
        render("a red circle", np.random.default_rng(0), size=16)


@pytest.mark.parametrize("size", [32, 64])
def test_layout_rules_and_exact_ground_truth(size):
    """Every object: inside the canvas, its pixels as recorded, sized per its size word, apart from the rest."""
    rng = np.random.default_rng(size)
    inset = _inset(size)
    for _ in range(200):
        scene = sample_scene(rng)
        image, truth = render(scene, rng, size)
        pixels = np.asarray(image)  # (H, W, 3)
        if scene.background is not None:
            assert truth.background == scene.background
        # Only palette colours are used, and everything not covered by an object is background.
        covered = np.zeros((size, size), dtype=bool)
        for obj in truth.objects:
            x0, y0, x1, y1 = obj.bbox
            assert inset <= x0 < x1 <= size - inset and inset <= y0 < y1 <= size - inset
            in_box = np.all(pixels[y0:y1, x0:x1] == COLOURS[obj.colour], axis=-1)  # (h, w)
            assert in_box.sum() == obj.area
            ys, xs = np.nonzero(in_box)
            assert obj.centroid == pytest.approx((x0 + xs.mean() + 0.5, y0 + ys.mean() + 0.5))
            covered[y0:y1, x0:x1] |= in_box
            low, high = SIZE_RANGES[obj.size]
            assert round(low * size) <= obj.side <= round(high * size)
            assert (max(x1 - x0, y1 - y0) > SIZE_THRESHOLD * size) == (obj.size == "large")
            group = scene.objects[obj.group]
            assert (obj.colour, obj.shape) == (group.colour, group.shape)
            assert group.size in (None, obj.size)
        assert np.all(pixels[~covered] == BACKGROUNDS[truth.background])
        # Counts per group, and a gap of at least 2 * inset between any two boxes on some axis.
        for index, group in enumerate(scene.objects):
            assert sum(obj.group == index for obj in truth.objects) == group.count
        for a, b in itertools.combinations(truth.objects, 2):
            gap_x = max(b.bbox[0] - a.bbox[2], a.bbox[0] - b.bbox[2])
            gap_y = max(b.bbox[1] - a.bbox[3], a.bbox[1] - b.bbox[3])
            assert max(gap_x, gap_y) >= 2 * inset


def _box_centre(obj):
    x0, y0, x1, y1 = obj.bbox
    return ((x0 + x1) / 2, (y0 + y1) / 2)


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("size", [32, 64])
def test_relations_are_drawn_purely_with_a_clear_margin(relation, size):
    """'A left of B': A's box ends before B's starts, and the cross offset is at most half the main one."""
    rng = np.random.default_rng(0)
    horizontal = relation in ("left of", "right of")
    for _ in range(60):
        scene = dataclasses.replace(sample_scene(rng, "relation"), relation=relation)
        _, truth = render(scene, rng, size)
        subject, reference = sorted(truth.objects, key=lambda obj: obj.group)
        first, second = (subject, reference) if relation in ("left of", "above") else (reference, subject)
        axis = 0 if horizontal else 1
        assert first.bbox[axis + 2] < second.bbox[axis]  # boxes disjoint along the main axis
        # The layout rule is stated on the boxes the shapes are drawn in (a triangle's centroid sits below
        # its box centre). The drawn boxes can be a pixel shorter (an even-sided triangle has no apex
        # pixel), which moves their centres by up to half a pixel each: hence the 1 px slack.
        main = _box_centre(second)[axis] - _box_centre(first)[axis]
        cross = abs(_box_centre(second)[1 - axis] - _box_centre(first)[1 - axis])
        assert cross <= 0.5 * main + 1.0
        assert main >= 0.25 * size  # far above the evaluator's 0.1 margin
        # ...and the evaluator, which works on centroids, reads exactly the drawn relation.
        assert relation_holds(subject.centroid, reference.centroid, relation, size)
        for other in set(RELATIONS) - {relation}:
            assert not relation_holds(subject.centroid, reference.centroid, other, size)


def test_relation_holds_by_hand():
    # Image 32 px, margin 0.1 -> the centres must be at least 3.2 px apart along the relation's axis.
    assert relation_holds((5, 10), (20, 12), "left of", 32)  # dx = 15 > |dy| = 2
    assert relation_holds((20, 12), (5, 10), "right of", 32)
    assert not relation_holds((5, 10), (8, 10), "left of", 32)  # dx = 3 < 3.2: too close to call
    assert not relation_holds((5, 5), (15, 20), "left of", 32)  # dy = 15 > dx = 10: that is "above"
    assert relation_holds((5, 5), (15, 20), "above", 32)
    assert relation_holds((15, 20), (5, 5), "below", 32)


def test_watermark_band_and_watermarked_datasets():
    """add_watermark paints the bottom band (2 rows at 32 px, 4 at 64 px) magenta and nothing else;
    render_dataset(watermark_fraction=f) marks about f of the images, prompt-independently, and leaves the rest
    exactly as the clean dataset."""
    from imgalign.toy.models import render_dataset
    from imgalign.toy.render import WATERMARK_COLOUR, add_watermark, watermark_rows

    for size in (32, 64):
        image = np.asarray(render("a red circle", np.random.default_rng(0), size=size)[0])
        marked = add_watermark(image)
        rows = watermark_rows(size)
        assert (marked[size - rows:] == WATERMARK_COLOUR).all() and (marked[: size - rows] == image[: size - rows]).all()
        assert not (image == marked).all() and (add_watermark(image[None])[0] == marked).all()

    prompts = ["a red circle", "two blue squares on a black background"]
    clean, index = render_dataset(prompts, 100, seed=3)
    again, _ = render_dataset(prompts, 100, seed=3, watermark_fraction=0.0)
    mixed, _ = render_dataset(prompts, 100, seed=3, watermark_fraction=0.4)
    assert (clean == again).all()
    flagged = (mixed[:, -2:] == WATERMARK_COLOUR).all(axis=(1, 2, 3))
    assert 0.3 < flagged.mean() < 0.5
    assert all(0.25 < flagged[index == i].mean() < 0.55 for i in range(2))  # both prompts get it
    assert (mixed[~flagged] == clean[~flagged]).all() and (mixed[flagged, :-2] == clean[flagged, :-2]).all()
