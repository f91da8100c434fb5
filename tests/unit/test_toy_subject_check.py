"""The toy subject check (imgalign.toy.subject_check): DreamBench's DINO and CLIP-T, exact in the toy world.

Measured at the time of writing (run with -s to see the printed rates):
* fidelity detects every subject on its renders at 32 and 64 px, clean and under blur radius 0.5 + noise
  sigma 8: 1.000 in every case;
* it detects none of the other four subjects (rate 0.000; mean score at most 0.24, max 0.38) and scores plain
  grammar objects of the subject's class and empty images 0.000;
* composed scenes (every subject x every template x 3 seeds, `render_subject_scene`) pass prompt fidelity
  1.000 at 32 and 64 px, clean and blurred;
* through the shipped toy SD's VAE, three subjects stay detected (see `test_through_the_toy_sd_vae`);
* on the shipped toy SD (which never saw a subject) fidelity is ~0 while stated backgrounds are met.
The asserted bounds leave room for harmless threshold changes, not for broken logic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from imgalign.toy.evaluator import detect_objects
from imgalign.toy.grammar import BACKGROUNDS, COLOURS
from imgalign.toy.render import render
from imgalign.toy.subject_check import (
    PromptFidelity,
    evaluate_subject,
    evaluate_subject_batch,
    main_part_colours,
    parse_subject_prompt,
    prompt_fidelity,
    recolour_subject,
    render_subject_scene,
    subject_fidelity,
)
from imgalign.toy.subjects import PROMPT_TEMPLATES, SUBJECTS, draw_subject, render_subject, subject_prompts

RECOLOURS = ("red", "green", "yellow")  # the colours PROMPT_TEMPLATES recolour subjects to


def _blur_and_noise(image: Image.Image, rng: np.random.Generator, radius=0.5, sigma=8.0) -> Image.Image:
    """What a small VAE does to a render, roughly (the evaluator's tests use the same)."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    noisy = blurred + rng.normal(0.0, sigma, blurred.shape)
    return Image.fromarray(np.clip(noisy + 0.5, 0, 255).astype(np.uint8))


def _subject_images(subject: str, size: int, rng: np.random.Generator, blurred: bool) -> list[Image.Image]:
    """Reference-style renders (35-60 % of the canvas, every background) and grammar-sized ones."""
    backgrounds = list(BACKGROUNDS)
    images = [render_subject(subject, rng, size, background=backgrounds[i % 3]) for i in range(24)]
    cls = SUBJECTS[subject]
    images += [
        render_subject_scene(f"a {word} sks {cls} on a {bg} background", subject, rng, size)[0]
        for word in ("small", "large")
        for bg in backgrounds
        for _ in range(2)
    ]
    return [_blur_and_noise(image, rng) if blurred else image for image in images]


def _canvas(background: str = "gray", size: int = 32) -> np.ndarray:
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = BACKGROUNDS[background]
    return canvas


def _paste(canvas: np.ndarray, rgb: np.ndarray, mask: np.ndarray, x: int, y: int) -> None:
    side = mask.shape[0]
    canvas[y : y + side, x : x + side][mask] = rgb[mask]


# --- subject fidelity -------------------------------------------------------------------------------


@pytest.mark.parametrize("blurred", [False, True], ids=["clean", "blurred"])
@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_fidelity_detects_every_subject(subject, size, blurred):
    rng = np.random.default_rng([size, blurred, list(SUBJECTS).index(subject)])
    results = [subject_fidelity(image, subject) for image in _subject_images(subject, size, rng, blurred)]
    rate = np.mean([r.detected for r in results])
    print(f"\n{subject} at {size} px ({'blurred' if blurred else 'clean'}): detected {rate:.3f}")
    assert rate >= 0.97  # measured 1.000
    assert np.mean([r.score for r in results]) >= 0.95
    assert all(r.part_colours == results[0].part_colours for r in results if r.detected)


@pytest.mark.parametrize("blurred", [False, True], ids=["clean", "blurred"])
@pytest.mark.parametrize("size", [32, 64])
def test_fidelity_rejects_the_other_subjects(size, blurred):
    rng = np.random.default_rng([size, blurred, 7])
    names = list(SUBJECTS)
    scores = np.zeros((5, 5))  # drawn subject x checked subject, mean score
    detected = np.zeros((5, 5))
    for i, drawn in enumerate(names):
        images = _subject_images(drawn, size, rng, blurred)[::2]
        for j, checked in enumerate(names):
            results = [subject_fidelity(image, checked) for image in images]
            scores[i, j] = np.mean([r.score for r in results])
            detected[i, j] = np.mean([r.detected for r in results])
    off = ~np.eye(5, dtype=bool)
    print(
        f"\nmean fidelity, drawn (rows) x checked (columns), {size} px, blurred={blurred}:\n{scores.round(2)}"
    )
    assert detected[off].max() <= 0.02  # measured 0.000
    assert scores[off].max() <= 0.35  # measured <= 0.24
    assert np.diag(detected).min() >= 0.97


@pytest.mark.parametrize("blurred", [False, True], ids=["clean", "blurred"])
@pytest.mark.parametrize("size", [32, 64])
def test_fidelity_is_zero_on_plain_objects_and_empty_images(size, blurred):
    rng = np.random.default_rng([size, blurred, 11])
    for subject, cls in SUBJECTS.items():
        for colour in COLOURS:
            for background in BACKGROUNDS:
                for word in ("small", "large"):
                    image, _ = render(f"a {word} {colour} {cls} on a {background} background", rng, size)
                    image = _blur_and_noise(image, rng) if blurred else image
                    result = subject_fidelity(image, subject)
                    assert not result.detected and result.score <= 0.05, (subject, colour, background, word)
    for background in BACKGROUNDS:
        result = subject_fidelity(_canvas(background, size), "striped_square")
        assert (result.score, result.detected, result.bbox) == (0.0, False, None)


def test_fidelity_by_hand():
    """Scores worked out on paper for hand-made images.

    The template's parts are judged on their *core*: pixels whose four neighbours lie in the same part and
    inside the template's box (blur and VAE decoding mix the others). Take a checker square of side 20
    (10 x 10 quadrants) and paint a 4 x 4 green blob inside its top-left (yellow) quadrant. The best
    registration is the template of side 22 placed one pixel up and left: its box's edge ring (not judged)
    lies on the background, so its 11 x 11 quadrants have 9 x 9 cores that cover the square's quadrants up
    to their edges, and each part (two quadrants) has a core of 162 pixels. The yellow part is then
    146/162 = 73/81 yellow and the blue part all blue: pattern = min(73/81, 1) = 73/81 (the dominant colours
    still differ), colours = mean(73/81, 1) = 77/81, score = 73/81 * 77/81 = 5621/6561 = 0.857 (detected).
    """
    canvas = _canvas("gray")
    rgb, mask = draw_subject("checker_square", 20)
    _paste(canvas, rgb, mask, 6, 6)
    result = subject_fidelity(canvas, "checker_square")
    assert (result.score, result.pattern, result.colours, result.detected) == (1.0, 1.0, 1.0, True)
    assert result.bbox == (6, 6, 26, 26) and result.centroid == (16.0, 16.0)
    assert result.part_colours == ("blue", "yellow")  # palette order of the parts
    canvas[9:13, 9:13] = COLOURS["green"]
    result = subject_fidelity(canvas, "checker_square")
    assert result.pattern == pytest.approx(73 / 81) and result.colours == pytest.approx(77 / 81)
    assert result.score == pytest.approx(5621 / 6561) and result.detected

    # A plain object has one colour in every part: pattern 0, whatever its colour.
    canvas = _canvas("black")
    canvas[8:24, 8:24] = COLOURS["red"]
    assert subject_fidelity(canvas, "striped_square").pattern == 0.0

    # On a white background the cross's white plus cuts it into four red quadrants: still the subject,
    # at the references' and the toy models' resolution, and touching the image border.
    for size, side, x, y in [(32, 12, 3, 5), (64, 31, 20, 10), (32, 12, 0, 20)]:
        canvas = _canvas("white", size)
        _paste(canvas, *draw_subject("cross_circle", side), x, y)
        result = subject_fidelity(canvas, "cross_circle")
        assert result.detected and result.score == 1.0, (size, side, x, y)


def test_main_part_colours_and_recolouring():
    """Main parts are the largest in the design; repainting one keeps the layout (pattern 1) and halves the
    colours (score 0.5) when the new colour is new to the subject, and swaps the two colours (score 0)
    when it is the subject's other colour."""
    assert {name: main_part_colours(name) for name in SUBJECTS} == {
        "striped_square": ("red",),
        "ringed_circle": ("yellow",),
        "two_tone_triangle": ("red", "green"),
        "checker_square": ("blue", "yellow"),
        "cross_circle": ("red",),
    }
    for subject in SUBJECTS:
        own = {c for c in COLOURS if (draw_subject(subject, 16)[0] == COLOURS[c]).all(axis=-1).any()}
        for colour in COLOURS:
            canvas = _canvas("black")
            _paste(canvas, *recolour_subject(subject, colour, 16), 8, 8)
            result = subject_fidelity(canvas, subject)
            expected = 1.0 if colour in main_part_colours(subject) else 0.0 if colour in own else 0.5
            assert result.pattern == 1.0 and result.score == pytest.approx(expected), (subject, colour)
    rgb, _ = recolour_subject("striped_square", "yellow", 10)  # yellow is the other colour: swap
    assert (rgb[0, 0] == COLOURS["yellow"]).all() and (rgb[2, 0] == COLOURS["red"]).all()
    with pytest.raises(ValueError, match="unknown colour"):
        recolour_subject("striped_square", "purple", 10)


# --- parsing ----------------------------------------------------------------------------------------


def test_parse_subject_prompt_reads_every_template():
    for subject, cls in SUBJECTS.items():
        for template, prompt in zip(PROMPT_TEMPLATES, subject_prompts(subject)):
            parsed = parse_subject_prompt(prompt)
            before = template.split(" {0}")[0].split()[-1]  # the word before the identifier
            words = template.split()
            assert parsed.subject_class == cls and parsed.subject_index == 0, prompt
            assert parsed.colour == (before if before in COLOURS else None)
            assert parsed.size == (before if before in ("small", "large") else None)
            assert parsed.background == (words[-2] if words[-1] == "background" else None)
            assert len(parsed.others) == (1 if "and" in words or parsed.relation else 0)
    parsed = parse_subject_prompt("a small sks square left of a red circle on a gray background")
    assert (parsed.size, parsed.colour, parsed.relation, parsed.background) == (
        "small",
        None,
        "left of",
        "gray",
    )
    assert [(g.colour, g.shape, g.count) for g in parsed.others] == [("red", "circle", 1)]
    parsed = parse_subject_prompt("a red sks square and a red square")  # legal: the subject is no red square
    assert parsed.colour == "red" and parsed.others[0].colour == "red" and parsed.relation is None
    parsed = parse_subject_prompt("a blue circle right of a large sks triangle")  # the subject second
    assert (parsed.subject_index, parsed.size, parsed.others[0].shape) == (1, "large", "circle")
    parsed = parse_subject_prompt("An zwx circle and two blue squares.", token="zwx")
    assert parsed.subject_class == "circle" and parsed.others[0].count == 2


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a red square", "must contain the identifier 'sks' exactly once"),
        ("a sks sks square", "exactly once"),
        ("a sks dog", "must be followed by a class"),
        ("two sks squares", "must be followed by a class"),
        ("red sks square", "must read 'a \\[small\\|large\\] \\[colour\\] sks square'"),
        ("a sks square left of a purple circle", "unrecognised word 'purple'"),
        ("a sks square left of two red circles", "count 1"),
    ],
)
def test_parse_subject_prompt_errors_name_the_prompt(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_subject_prompt(prompt)


# --- prompt fidelity --------------------------------------------------------------------------------


@pytest.mark.parametrize("blurred", [False, True], ids=["clean", "blurred"])
@pytest.mark.parametrize("size", [32, 64])
def test_composed_scenes_pass_prompt_fidelity(size, blurred):
    """Render every template of every subject (`render_subject_scene`): the prompt is met, and the subject is
    detected unless the prompt recolours it to a colour that is not its main one."""
    rng = np.random.default_rng([size, blurred, 13])
    passed, detected = [], []
    for subject in SUBJECTS:
        for prompt in subject_prompts(subject):
            recolour = prompt.split()[1] if prompt.split()[1] in RECOLOURS else None
            for _ in range(3):
                image, box = render_subject_scene(prompt, subject, rng, size)
                image = _blur_and_noise(image, rng) if blurred else image
                check = evaluate_subject(image, prompt, subject)
                passed.append(check.prompt.passed)
                if recolour is None or recolour in main_part_colours(subject):
                    detected.append(check.fidelity.detected)
                    assert check.prompt.subject_bbox is not None
                else:  # the layout is kept, the colours are not: pattern 1, fidelity 0.5 or 0, not detected
                    assert check.fidelity.pattern >= 0.7 and not check.fidelity.detected, (prompt, subject)
    print(
        f"\ncomposed scenes at {size} px, blurred={blurred}: prompt passed {np.mean(passed):.3f}, "
        f"subject detected {np.mean(detected):.3f}"
    )
    assert np.mean(passed) >= 0.98  # measured 1.000
    assert np.mean(detected) >= 0.98  # measured 1.000


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_each_violated_part_fails_its_criterion(subject, size):
    """Render a scene for one prompt, check it against a prompt that differs in one part: exactly the
    criterion of that part fails (and the others pass)."""
    cls = SUBJECTS[subject]
    other_shape = "triangle" if cls != "triangle" else "circle"
    new_colour = "blue" if subject == "two_tone_triangle" else "green"  # not a main colour of the subject
    cases = [  # (drawn, checked, the criteria that must fail)
        (f"a sks {cls} on a white background", f"a sks {cls} on a black background", {"background"}),
        (
            f"a sks {cls} left of a red {other_shape}",
            f"a sks {cls} right of a red {other_shape}",
            {"relation"},
        ),
        (f"a sks {cls} above a red {other_shape}", f"a sks {cls} below a red {other_shape}", {"relation"}),
        (
            f"a sks {cls} on a gray background",
            f"a sks {cls} and a blue {other_shape} on a gray background",
            {"presence", "count"},
        ),
        (f"a small sks {cls}", f"a large sks {cls}", {"size"}),
        (f"a sks {cls}", f"a {new_colour} sks {cls}", {"colour"}),
    ]
    rng = np.random.default_rng([size, list(SUBJECTS).index(subject)])
    for drawn, checked, failing in cases:
        for _ in range(4):
            image, _ = render_subject_scene(drawn, subject, rng, size)
            result = prompt_fidelity(image, checked, subject)
            failed = {name for name, value in result.criteria.items() if value < 1.0}
            assert failed == failing, (drawn, checked, result.criteria)
            assert result.score == pytest.approx(1 - len(failing) / len(result.criteria))
    # No subject at all: only the other object is drawn.
    for _ in range(4):
        image, _ = render(f"a red {other_shape}", rng, size)
        result = prompt_fidelity(image, f"a sks {cls} left of a red {other_shape}", subject)
        assert result.criteria == {"subject": 0.0, "presence": 1.0, "count": 1.0, "relation": 0.0}


def test_prompt_fidelity_by_hand():
    """Hand-made scenes on a gray 32 px canvas, with the values worked out on paper."""
    canvas = _canvas("gray")
    _paste(canvas, *draw_subject("striped_square", 10), 3, 10)  # box (3, 10, 13, 20), centre (8, 15)
    canvas[11:19, 20:28] = COLOURS["blue"]  # a blue square, centre (24, 15): 16 px right of the subject
    check = evaluate_subject(
        canvas, "a sks square left of a blue square on a gray background", "striped_square"
    )
    assert check.fidelity.detected and check.prompt.subject_bbox == (3, 10, 13, 20)
    assert not check.prompt.subject_stand_in
    assert check.prompt.criteria == {"subject": 1, "background": 1, "presence": 1, "count": 1, "relation": 1}
    assert check.prompt.passed and check.prompt.score == 1.0

    result = prompt_fidelity(
        canvas, "a sks square right of a blue square on a white background", "striped_square"
    )
    assert (result.relation, result.background, result.score, result.passed) == (0.0, 0.0, 3 / 5, False)
    result = prompt_fidelity(canvas, "a sks square above a blue square", "striped_square")  # same row
    assert result.relation == 0.0
    result = prompt_fidelity(canvas, "a large sks square left of a blue square", "striped_square")
    assert result.size == 1.0  # side 10 px > 0.30 * 32 = 9.6 px: large


def test_prompt_fidelity_subject_size_and_order_by_hand():
    canvas = _canvas("gray")
    _paste(canvas, *draw_subject("striped_square", 9), 3, 10)  # side 9 <= 0.30 * 32 = 9.6: small
    canvas[11:19, 20:28] = COLOURS["blue"]
    result = prompt_fidelity(canvas, "a blue square right of a small sks square", "striped_square")
    assert result.criteria == {"subject": 1, "size": 1, "presence": 1, "count": 1, "relation": 1}
    result = prompt_fidelity(canvas, "a blue square left of a large sks square", "striped_square")
    assert result.criteria == {"subject": 1, "size": 0, "presence": 1, "count": 1, "relation": 0}
    assert result.score == pytest.approx(3 / 5)


def test_the_subjects_own_quadrants_are_not_other_objects():
    """A checker square's blue quadrants are blue squares to `detect_objects`, but not "a blue square"."""
    canvas = _canvas("white")
    _paste(canvas, *draw_subject("checker_square", 14), 4, 4)
    assert any(d.colour == "blue" and d.shape == "square" for d in detect_objects(canvas))
    result = prompt_fidelity(canvas, "a sks square and a blue square", "checker_square")
    assert result.criteria == {"subject": 1.0, "presence": 0.0, "count": 0.0}
    canvas[20:28, 20:28] = COLOURS["blue"]
    assert prompt_fidelity(canvas, "a sks square and a blue square", "checker_square").passed


def test_a_plain_object_of_the_class_stands_in_for_the_subject():
    """As CLIP-T, prompt fidelity accepts any object of the class; fidelity tells them apart."""
    canvas = _canvas("black")
    canvas[8:20, 8:20] = COLOURS["red"]
    check = evaluate_subject(canvas, "a red sks square on a black background", "striped_square")
    assert check.fidelity.score == 0.0 and check.prompt.subject_stand_in
    assert check.prompt.criteria == {"subject": 1.0, "colour": 1.0, "background": 1.0}
    assert prompt_fidelity(canvas, "a yellow sks square", "striped_square").criteria == {
        "subject": 1,
        "colour": 0,
    }
    assert prompt_fidelity(canvas, "a sks circle", "ringed_circle").criteria == {"subject": 0.0}
    # One red square cannot be both the subject and "a red square".
    result = prompt_fidelity(canvas, "a sks square and a red square", "striped_square")
    assert result.criteria == {"subject": 1.0, "presence": 0.0, "count": 0.0}
    canvas[22:30, 22:30] = COLOURS["green"]  # a second square: it stands in, the red one is the other group
    assert prompt_fidelity(canvas, "a sks square and a red square", "striped_square").passed


def test_recolouring_trade_off_on_one_scene():
    """The unchanged subject fails "a green sks square" at fidelity 1; the recoloured one meets it at 0.5."""
    for recolour, fidelity, colour in [(False, 1.0, 0.0), (True, 0.5, 1.0)]:
        canvas = _canvas("gray")
        drawing = (
            recolour_subject("striped_square", "green", 12)
            if recolour
            else draw_subject("striped_square", 12)
        )
        _paste(canvas, *drawing, 10, 10)
        check = evaluate_subject(canvas, "a green sks square", "striped_square")
        assert (check.fidelity.score, check.prompt.colour) == (pytest.approx(fidelity), colour)


# --- batches and inputs -----------------------------------------------------------------------------


def test_batch_accepts_every_input_type_and_summarises():
    rng = np.random.default_rng(21)
    prompts = subject_prompts("ringed_circle")[:6]
    images = [render_subject_scene(p, "ringed_circle", rng)[0] for p in prompts]
    images[1] = Image.fromarray(_canvas("black"))  # an empty image for "a sks circle on a white background"
    arrays = np.stack([np.asarray(image) for image in images])  # (B, H, W, 3) uint8
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]
    results = [evaluate_subject_batch(batch, prompts, "ringed_circle") for batch in (images, arrays, tensor)]
    for result in results[1:]:
        assert [c.fidelity for c in result.per_image] == [c.fidelity for c in results[0].per_image]
        assert [c.prompt.criteria for c in result.per_image] == [
            c.prompt.criteria for c in results[0].per_image
        ]
    summary = results[0].summary
    assert summary["detected"] == (5 / 6, 6) and summary["prompt_passed"][1] == 6
    assert summary["prompt/background"] == (2 / 3, 3)  # white, black, gray stated; the empty image is black
    assert summary["prompt/subject"] == (5 / 6, 6) and summary["fidelity"][0] == pytest.approx(5 / 6)
    assert set(summary) >= {"fidelity", "pattern", "colours", "prompt_fidelity", "both"}
    assert "prompt/subject" in results[0].table()
    assert set(PromptFidelity.CRITERIA) >= set(results[0].per_image[0].prompt.criteria)

    with pytest.raises(ValueError, match="got 6 images but 5 prompts"):
        evaluate_subject_batch(images, prompts[:5], "ringed_circle")
    with pytest.raises(ValueError, match="names class 'square' but subject 'ringed_circle' is a circle"):
        evaluate_subject(images[0], "a sks square", "ringed_circle")
    with pytest.raises(ValueError, match="unknown toy subject"):
        subject_fidelity(images[0], "dog")


def test_identifier_token_is_configurable():
    rng = np.random.default_rng(22)
    image, _ = render_subject_scene("a zwx square right of a blue square", "checker_square", rng, token="zwx")
    a = evaluate_subject(image, "a zwx square right of a blue square", "checker_square", token="zwx")
    b = evaluate_subject(image, "a sks square right of a blue square", "checker_square")
    assert a == b and a.prompt.passed and a.fidelity.detected


# --- the toy SD ----------------------------------------------------------------------------------------


def test_toy_sd_never_saw_the_subject():
    """Sanity check on the shipped toy SD: 15 template prompts of one subject, one image each (20 steps,
    CFG 5, seed 0). It never saw the subject, so fidelity is ~0; stated backgrounds are drawn."""
    from imgalign._paths import TOY_ASSETS
    from imgalign.eval.toy_bench import load_pipeline

    pipe = load_pipeline(str(TOY_ASSETS / "sd"))
    pipe.set_progress_bar_config(disable=True)
    prompts = subject_prompts("striped_square")
    with torch.no_grad():
        images = pipe(
            prompts,
            num_inference_steps=20,
            guidance_scale=5.0,
            height=32,
            width=32,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pt",
        ).images.float()
    result = evaluate_subject_batch(images, prompts, "striped_square")
    print("\n" + result.table())
    assert result.summary["detected"][0] <= 0.1
    assert result.summary["fidelity"][0] <= 0.2
    assert result.summary["prompt/background"][0] >= 0.6


def test_through_the_toy_sd_vae():
    """Round-trip 32 px reference-style renders through the shipped toy SD's VAE (encode, decode), the
    decoder every toy SD sample goes through. Measured (30 renders each): ringed circle 0.90, two-tone
    triangle 0.90, checker square 1.00 detected; the striped square (0.10) and the cross circle (0.33) are
    not: this VAE, trained on plain shapes only, decodes the stripes as orange and the white plus as
    background, so they are a ceiling on what a toy SD fine-tuned on these subjects can reach, not a check
    error. Plain objects and the other subjects are never detected after the round trip either."""
    from diffusers import AutoencoderKL

    from imgalign._paths import TOY_ASSETS

    vae = AutoencoderKL.from_pretrained(TOY_ASSETS / "sd" / "vae").eval()

    def round_trip(images: list[Image.Image]) -> np.ndarray:
        x = torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2)
        with torch.no_grad():
            decoded = vae.decode(vae.encode(x.float() / 127.5 - 1).latent_dist.mode()).sample  # (B, 3, H, W)
        return ((decoded.clamp(-1, 1) + 1) * 127.5 + 0.5).byte().permute(0, 2, 3, 1).numpy()

    rng = np.random.default_rng(5)
    names = list(SUBJECTS)
    detected = np.zeros((5, 5))
    for i, drawn in enumerate(names):
        images = round_trip([render_subject(drawn, rng, 32) for _ in range(30)])
        for j, checked in enumerate(names):
            detected[i, j] = np.mean([subject_fidelity(image, checked).detected for image in images])
    print(f"\ndetected after the toy VAE, drawn (rows) x checked (columns):\n{detected.round(2)}")
    assert detected[~np.eye(5, dtype=bool)].max() == 0.0
    for name in ("ringed_circle", "two_tone_triangle", "checker_square"):
        assert detected[names.index(name), names.index(name)] >= 0.7, name
    for subject, cls in SUBJECTS.items():
        plain = [render(f"a {word} {c} {cls}", rng)[0] for c in COLOURS for word in ("small", "large")]
        assert not any(subject_fidelity(image, subject).detected for image in round_trip(plain)), subject
