"""The toy evaluator: exact on renders, rejects wrong prompts, tolerates mild artefacts, reads every input type.

The accuracy, rejection and robustness numbers are printed (run with -s to see them). Measured at the
time of writing with 500 prompts each at 32 px: accuracy 1.000 on clean renders, rejection 1.000 of
renders of a one-attribute-perturbed prompt, 1.000 under Gaussian blur radius 0.5 plus noise sigma 8.
The asserted bounds leave room for harmless threshold changes, not for broken logic.
"""

import doctest
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

import imgalign.toy
from imgalign.toy.evaluator import (
    classify_shape,
    connected_components,
    detect_objects,
    evaluate,
    evaluate_batch,
    to_uint8_array,
    watermark_coverage,
)
from imgalign.toy.grammar import BACKGROUNDS, COLOURS, perturb_scene, sample_scene
from imgalign.toy.render import WATERMARK_COLOUR, _shape_mask, add_watermark, render, watermark_rows

N_PROMPTS = 500


def _blur_and_noise(image: Image.Image, rng: np.random.Generator, radius=0.5, sigma=8.0) -> Image.Image:
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    noisy = blurred + rng.normal(0.0, sigma, blurred.shape)
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))


def _rate(flags) -> float:
    return float(np.mean(flags))


def test_accepts_ground_truth_renders_at_32px():
    rng = np.random.default_rng(100)
    results = []
    for _ in range(N_PROMPTS):
        scene = sample_scene(rng)
        image, _ = render(scene, rng)
        results.append(evaluate(image, scene).overall)
    accuracy = _rate(results)
    print(f"\ntoy evaluator accuracy on {N_PROMPTS} ground-truth renders at 32 px: {accuracy:.3f}")
    assert accuracy >= 0.98


def test_accepts_ground_truth_renders_at_64px():
    rng = np.random.default_rng(101)
    results = []
    for _ in range(150):
        scene = sample_scene(rng)
        image, _ = render(scene, rng, size=64)
        results.append(evaluate(image, scene.to_text()).overall)
    assert _rate(results) >= 0.98


def test_rejects_renders_of_a_perturbed_prompt():
    """Render a prompt that differs in one stated attribute; the original prompt must not accept it."""
    rng = np.random.default_rng(200)
    rejected = []
    for _ in range(N_PROMPTS):
        scene = sample_scene(rng)
        image, _ = render(perturb_scene(scene, rng), rng)
        score = evaluate(image, scene)
        rejected.append(score.overall == 0.0)
        assert score.score < 1.0 or not rejected[-1]  # a rejection always costs dense reward too
    rate = _rate(rejected)
    print(f"\ntoy evaluator rejection of {N_PROMPTS} renders of one-attribute-perturbed prompts: {rate:.3f}")
    assert rate >= 0.95


def test_robust_to_mild_blur_and_noise():
    rng = np.random.default_rng(300)
    results = []
    for _ in range(N_PROMPTS):
        scene = sample_scene(rng)
        image, _ = render(scene, rng)
        results.append(evaluate(_blur_and_noise(image, rng), scene).overall)
    accuracy = _rate(results)
    print(f"\ntoy evaluator accuracy under blur radius 0.5 + noise sigma 8 at 32 px: {accuracy:.3f}")
    assert accuracy >= 0.97  # measured 1.000


def test_robust_to_jpeg_without_chroma_subsampling():
    rng = np.random.default_rng(301)
    results = []
    for _ in range(100):
        scene = sample_scene(rng)
        image, _ = render(scene, rng)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=75, subsampling=0)
        results.append(evaluate(Image.open(buffer), scene).overall)
    assert _rate(results) >= 0.97  # measured 1.000 on 1000 prompts


def test_partial_credit_by_hand():
    """Build images by hand and check each criterion against values worked out on paper."""
    canvas = np.full((32, 32, 3), BACKGROUNDS["white"], dtype=np.uint8)
    circle = _shape_mask("circle", 9)
    canvas[3:12, 3:12][circle] = COLOURS["red"]
    canvas[20:29, 20:29][circle] = COLOURS["red"]

    # Two red circles for "a red circle": present, right colour and shape, wrong count -> 3 of 4.
    score = evaluate(canvas, "a red circle")
    assert (score.presence, score.colour, score.shape, score.count) == (1.0, 1.0, 1.0, 0.0)
    assert (score.size, score.relation, score.background) == (None, None, None)
    assert score.overall == 0.0 and score.score == pytest.approx(3 / 4)
    assert evaluate(canvas, "two red circles on a white background").overall == 1.0
    assert evaluate(canvas, "two small red circles").overall == 1.0  # 9 px <= 0.30 * 32
    assert evaluate(canvas, "two large red circles").criteria["size"] == 0.0

    # "a blue square" matches nothing: colour and shape both absent -> all four group criteria fail,
    # and the stated background is wrong: 0 of 5.
    score = evaluate(canvas, "a blue square on a black background")
    assert score.criteria == {"presence": 0, "colour": 0, "shape": 0, "count": 0, "background": 0}

    # "a red square and a blue circle": colour right for one group, shape right for the other.
    score = evaluate(canvas, "a red square and a blue circle")
    assert (score.presence, score.colour, score.shape, score.count) == (0.0, 0.5, 0.5, 0.0)

    # Add a blue square at the top right, centre (24.5, 7.5). The circles' centres are (7.5, 7.5) and
    # (24.5, 24.5): the square is right of the first and above the second, and left of neither.
    canvas[3:12, 20:29] = COLOURS["blue"]
    assert evaluate(canvas, "a blue square right of a red circle").relation == 1.0
    assert evaluate(canvas, "a blue square above a red circle").relation == 1.0
    assert evaluate(canvas, "a blue square left of a red circle").relation == 0.0
    assert evaluate(canvas, "a blue square below a red circle").relation == 0.0


def test_taste_and_preference_by_hand():
    """The rater's taste: a white background where the prompt states none; preference = mean(fidelity + taste)."""
    circle = _shape_mask("circle", 9)
    images = {}
    for name in ("white", "black"):
        canvas = np.full((32, 32, 3), BACKGROUNDS[name], dtype=np.uint8)
        canvas[3:12, 3:12][circle] = COLOURS["red"]
        canvas[20:29, 20:29][circle] = COLOURS["red"]
        images[name] = canvas

    # "a red circle" on white: fidelity 3/4 (count wrong), taste 1 -> preference (3 + 1) / 5 = 0.8.
    score = evaluate(images["white"], "a red circle")
    assert score.taste == 1.0 and score.preference == pytest.approx(4 / 5) and score.score == pytest.approx(3 / 4)
    # On black: taste 0 -> preference 3 / 5; fidelity unchanged.
    score = evaluate(images["black"], "a red circle")
    assert score.taste == 0.0 and score.preference == pytest.approx(3 / 5) and score.score == pytest.approx(3 / 4)
    # A stated background is fidelity, not taste: black asked and drawn -> no taste, preference == score.
    score = evaluate(images["black"], "two red circles on a black background")
    assert score.taste is None and score.preference == score.score == 1.0
    assert "taste" not in score.criteria and score.overall == 1.0  # fidelity criteria and overall ignore taste
    # The taste is a setting: a rater who likes black backgrounds.
    from imgalign.toy.evaluator import EvaluatorConfig

    assert evaluate(images["black"], "two red circles", EvaluatorConfig(preferred_background="black")).taste == 1.0


def test_watermark_is_detected_on_ground_truth_renders_and_leaves_the_criteria_alone():
    """Watermarked renders are flagged (>= 98 %, like the ground-truth test), clean ones never, at 32 and 64 px;
    the band does not disturb any fidelity criterion (it is no object colour and too thin to move the background)
    and the rater rejects a fully marked image outright (preference 0), however faithful."""
    rng = np.random.default_rng(102)
    flagged, false_alarms, others_kept = [], [], []
    for k in range(N_PROMPTS):
        scene = sample_scene(rng)
        image, _ = render(scene, rng, size=32 if k % 5 else 64)
        plain, marked = evaluate(image, scene), evaluate(add_watermark(np.asarray(image)), scene)
        flagged.append(marked.watermarked and marked.watermark == 1.0)
        false_alarms.append(plain.watermarked or plain.watermark != 0.0)
        others_kept.append(marked.criteria == plain.criteria and marked.taste == plain.taste
                           and marked.score == plain.score and marked.preference == 0.0 < plain.preference)
    print(f"\nwatermark detected on {_rate(flagged):.3f} of {N_PROMPTS} watermarked renders, false alarms "
          f"{_rate(false_alarms):.3f}, other criteria unchanged on {_rate(others_kept):.3f}")
    assert _rate(flagged) >= 0.98 and _rate(false_alarms) == 0.0 and _rate(others_kept) >= 0.98


def test_watermark_coverage_by_hand():
    """A 32 px image has a 2-row band (64 px); painting 16 of its pixels magenta is coverage 0.25."""
    canvas = np.full((32, 32, 3), BACKGROUNDS["gray"], dtype=np.uint8)
    canvas[30, :16] = WATERMARK_COLOUR
    assert watermark_rows(32) == 2 and watermark_rows(64) == 4
    assert watermark_coverage(canvas) == pytest.approx(0.25)
    score = evaluate(canvas, "a red circle")
    assert score.watermark == pytest.approx(0.25) and not score.watermarked
    canvas[31, :] = WATERMARK_COLOUR  # 48 of 64 band pixels -> 0.75 coverage, detected
    assert watermark_coverage(canvas) == pytest.approx(0.75) and evaluate(canvas, "a red circle").watermarked
    canvas[29, :] = WATERMARK_COLOUR  # above the band: does not count
    assert watermark_coverage(canvas) == pytest.approx(0.75)
    # a magenta-ish pixel within the colour tolerance counts, a red one does not
    canvas[30, 16:] = (230, 40, 220)
    canvas[31, :8] = COLOURS["red"]
    assert watermark_coverage(canvas) == pytest.approx(56 / 64)


def test_watermark_scales_the_preference_by_hand():
    """preference = mean(criteria + taste) * (1 - watermark_penalty * coverage); penalty 0 ignores the band."""
    from imgalign.toy.evaluator import EvaluatorConfig

    canvas = np.full((32, 32, 3), BACKGROUNDS["white"], dtype=np.uint8)
    canvas[3:12, 3:12][_shape_mask("circle", 9)] = COLOURS["red"]
    clean = evaluate(canvas, "a red circle")
    assert clean.score == 1.0 and clean.taste == 1.0 and clean.preference == 1.0
    canvas[31, :] = WATERMARK_COLOUR  # half of the 2-row band
    marked = evaluate(canvas, "a red circle")
    assert marked.watermark == pytest.approx(0.5) and marked.preference == pytest.approx(0.5)
    assert marked.score == 1.0 and marked.overall == 1.0 and marked.taste == 1.0  # fidelity never sees the band
    assert evaluate(canvas, "a red circle", EvaluatorConfig(watermark_penalty=0.4)).preference == pytest.approx(0.8)
    assert evaluate(canvas, "a red circle", EvaluatorConfig(watermark_penalty=0.0)).preference == 1.0
    # on black (taste 0): (4 * 1 + 0) / 5 = 0.8, times 1 - 0.5 -> 0.4
    canvas[canvas.sum(-1) == 765] = BACKGROUNDS["black"]
    assert evaluate(canvas, "a red circle").preference == pytest.approx(0.4)


def test_specks_and_background_sized_regions_are_not_objects():
    rng = np.random.default_rng(0)
    canvas = np.full((32, 32, 3), BACKGROUNDS["gray"], dtype=np.uint8)
    ys, xs = rng.integers(0, 32, size=(2, 20))
    canvas[ys, xs] = COLOURS["green"]  # 20 isolated green pixels: salt noise, not objects
    assert detect_objects(canvas) == []
    yellow = np.full((32, 32, 3), COLOURS["yellow"], dtype=np.uint8)  # a yellow "background"
    assert detect_objects(yellow) == []
    assert evaluate(yellow, "a yellow square").presence == 0.0


def test_connected_components_by_hand():
    # A "U" of label 0 needs a late merge (its arms only join in the bottom row); label 1 touches it
    # but is a different colour; the two 2s touch only diagonally, which 4-connectivity keeps apart.
    labels = np.array(
        [
            [0, -1, 0, -1, 2],
            [0, -1, 0, 1, -1],
            [0, 0, 0, 1, -1],
            [-1, -1, -1, -1, 2],
        ]
    )
    components = sorted(connected_components(labels), key=lambda c: (c["label"], c["bbox"]))
    assert [(c["label"], c["area"], c["bbox"]) for c in components] == [
        (0, 7, (0, 0, 3, 3)),
        (1, 2, (3, 1, 4, 3)),
        (2, 1, (4, 0, 5, 1)),
        (2, 1, (4, 3, 5, 4)),
    ]
    # U centroid: pixel centres x = 0.5 (x3), 1.5, 2.5 (x3) -> 3.5 ... mean 10.5 / 7 = 1.5;
    # y = 0.5 (x2), 1.5 (x2), 2.5 (x3) -> 11.5 / 7.
    assert components[0]["centroid"] == pytest.approx((1.5, 11.5 / 7))


@pytest.mark.parametrize("shape", ["circle", "square", "triangle"])
def test_shape_classifier_on_every_rendered_side(shape):
    for side in range(7, 28):
        mask = _shape_mask(shape, side)
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        centroid = (xs.mean() + 0.5, ys.mean() + 0.5)
        assert classify_shape(int(mask.sum()), bbox, centroid)[0] == shape, side
    # Boxes far from square are no shape of the grammar.
    assert classify_shape(30, (0, 0, 10, 3), (5.0, 1.5))[0] is None


def test_every_input_type_gives_the_same_score():
    rng = np.random.default_rng(5)
    prompts, images = [], []
    for _ in range(4):
        scene = sample_scene(rng)
        image, _ = render(scene, rng)
        prompts.append(scene.to_text())
        images.append(image)
    arrays = np.stack([np.asarray(image) for image in images])  # (B, H, W, 3) uint8
    tensors = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W) in [0, 1]
    expected = [evaluate(image, prompt) for image, prompt in zip(images, prompts)]
    for batch in (images, arrays, tensors, list(tensors), [t[None] for t in tensors], list(arrays / 255.0)):
        assert evaluate_batch(batch, prompts) == expected
    uint8_tensor = torch.from_numpy(arrays[0]).permute(2, 0, 1)  # (3, H, W) uint8, torchvision style
    assert np.array_equal(to_uint8_array(uint8_tensor), arrays[0])
    with pytest.raises(ValueError, match="2 images but 4 prompts"):
        evaluate_batch(images[:2], prompts)
    with pytest.raises(ValueError, match=r"shape \(3, H, W\)"):
        to_uint8_array(torch.zeros(4, 32, 32))
    with pytest.raises(TypeError, match="PIL image, numpy array or torch tensor"):
        to_uint8_array([[0, 0, 0]])


def test_package_docstring_example_runs():
    assert doctest.testmod(imgalign.toy).failed == 0
