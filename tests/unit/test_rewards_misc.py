"""JPEG (in)compressibility, the toy evaluator reward, RPO's lambda-Harmonic reward and `imgalign score`."""

from __future__ import annotations

import argparse
import csv
import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imgalign.rewards import build_reward
from imgalign.rewards import testing as tiny


def test_jpeg_compressibility_matches_pil_and_ranks_noise_last():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    incompressibility = build_reward("incompressibility").score(images)
    compressibility = build_reward("compressibility").score(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        assert incompressibility[i].item() == pytest.approx(buffer.tell() / 1000)  # kilobytes
    assert torch.equal(compressibility, -incompressibility)
    assert compressibility[0] > compressibility[1]  # a flat image compresses better than noise
    assert not build_reward("compressibility").differentiable


def test_toy_evaluator_reward():
    toy = pytest.importorskip("imgalign.toy", reason="the toy world (imgalign.toy) is not available")
    if not hasattr(toy, "evaluate") or not hasattr(toy, "render"):
        pytest.skip("imgalign.toy has no evaluate/render yet")
    prompt = "two red circles on a white background"
    image, _ = toy.render(prompt, np.random.default_rng(0))
    reward = build_reward("toy")
    assert reward.score([image], prompt).tolist() == [1.0]
    assert build_reward("toy", criterion="overall").score([image], prompt).tolist() == [1.0]
    wrong = reward.score([image], "three blue squares on a black background").item()
    expected = toy.evaluate(image, "three blue squares on a black background").score
    assert wrong == pytest.approx(expected) and wrong < 1.0
    # tensors in [0, 1] and uint8 give the same verdict as the PIL image
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]
    assert reward.score(pixels, prompt).item() == 1.0
    assert reward.score(pixels.float() / 255, prompt).item() == 1.0
    assert np.isnan(build_reward("toy", criterion="relation").score([image], prompt).item())  # no relation asked
    # the toy rater's preference: fidelity + taste (white where no background is stated)
    on_white, _ = toy.render("two red circles on a white background", np.random.default_rng(0))
    on_black, _ = toy.render("two red circles on a black background", np.random.default_rng(0))
    preference = build_reward("toy_preference")
    assert preference.name == "toy_preference"
    assert preference.score([on_white, on_black], "two red circles").tolist() == [1.0, pytest.approx(4 / 5)]  # 4 fidelity criteria + taste


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    return tiny.save_tiny_hf_clip(tmp_path_factory.mktemp("harmonic") / "clip")


def test_lambda_harmonic_formula(hf_clip):
    refs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prompts = ["a photo of sks dog on the moon", "a dog", "a cat"]
    reward = build_reward("lambda_harmonic", model=str(hf_clip), references=refs, lam=0.3, remove_tokens=["sks"])
    score = reward.score(images, prompts)

    emb, ref_emb = reward.embed(images), reward.embed(refs)
    text = reward.encoder.encode_texts(["a photo of dog on the moon", "a dog", "a cat"])  # identifier removed
    s_image = (emb @ ref_emb.T).mean(1)
    s_text = (emb * text).sum(-1)
    i01, t01 = (s_image + 1) / 2, (s_text + 1) / 2
    assert torch.allclose(score, 1 / (0.3 / i01 + 0.7 / t01), atol=1e-5)
    # lambda = 1 -> image similarity only; lambda = 0 -> text alignment only (both mapped to [0, 1])
    reward.lam = 1.0
    assert torch.allclose(reward.score(images, prompts), i01, atol=1e-5)
    reward.lam = 0.0
    assert torch.allclose(reward.score(images, prompts), t01, atol=1e-5)
    reward._references = None  # lambda = 0 needs no references at all
    assert torch.allclose(reward.score(images, prompts), t01, atol=1e-5)
    reward.lam = 0.3
    reward.set_references(refs)
    # a harmonic mean never exceeds the weighted arithmetic mean
    assert (score <= 0.3 * i01 + 0.7 * t01 + 1e-6).all()
    # RPO's preference label probability: sigmoid(R(a) - R(b))
    p = reward.compare(images[:1], images[1:2], prompts[0])
    assert torch.allclose(p, torch.sigmoid(score[0] - reward.score(images[1:2], prompts[0])), atol=1e-6)
    # a per-call lambda (RPO labels at 0 and validates at 0.5 on one backbone) and parts() from one embedding pass
    assert torch.allclose(reward.score(images, prompts, lam=1.0), i01, atol=1e-5)
    assert torch.allclose(reward.score(images, prompts, lam=0.0), t01, atol=1e-5)
    parts = reward.parts(images, prompts, lam=0.5)
    assert torch.allclose(parts["reward"], 1 / (0.5 / i01 + 0.5 / t01), atol=1e-5)
    assert torch.allclose(parts["s_image"], s_image, atol=1e-5) and torch.allclose(parts["s_text"], s_text, atol=1e-5)
    assert reward.lam == 0.3  # the override changed nothing
    with pytest.raises(ValueError, match="lambda"):
        build_reward("lambda_harmonic", model=str(hf_clip), lam=1.5)
    with pytest.raises(ValueError, match="lambda"):
        reward.score(images, prompts, lam=-0.1)


@pytest.fixture(scope="module")
def tiny_align(tmp_path_factory):
    return tiny.save_tiny_align(tmp_path_factory.mktemp("harmonic") / "align")


def _pil(pixels):
    """uint8 [B, 3, H, W] -> list of RGB PIL images."""
    return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in pixels]


def test_lambda_harmonic_on_align_matches_align_model(tiny_align):
    """RPO's default backbone: a tiny ALIGN (BERT WordPiece + EfficientNet, AlignProcessor) loaded by path through
    AutoModel/AutoProcessor gives the lambda-Harmonic score computed by hand from AlignModel.get_*_features on the
    processor's own outputs (pixels divided by std twice - include_top -, text padded to 64 with token_type_ids)."""
    from transformers import AlignModel, AlignProcessor, EfficientNetImageProcessor

    from imgalign.rewards.encoders import preprocess_from_hf_processor

    generator = torch.Generator().manual_seed(6)
    refs = _pil(torch.randint(0, 256, (2, 3, 32, 32), generator=generator, dtype=torch.uint8))
    images = _pil(torch.randint(0, 256, (3, 3, 32, 32), generator=generator, dtype=torch.uint8))
    long_prompt = "a photo of sks dog " + "on a red square " * 20  # > 64 tokens: cut at ALIGN's 64
    prompts = ["a photo of sks dog on the moon", "a zebra", long_prompt]
    cleaned = ["a photo of dog on the moon", "a zebra", long_prompt.replace("sks ", "").strip()]
    reward = build_reward("lambda_harmonic", model=str(tiny_align), references=refs, lam=0.3, remove_tokens=["sks"])
    assert type(reward.encoder.model).__name__ == "AlignModel"
    assert reward.encoder.max_length == 64  # AlignProcessor's default, not CLIP's 77
    score = reward.score(images, prompts)

    model = AlignModel.from_pretrained(str(tiny_align)).eval()
    processor = AlignProcessor.from_pretrained(str(tiny_align))

    def features(output):  # a tensor (transformers 4) or an output object holding it in pooler_output (5)
        return F.normalize(output if isinstance(output, torch.Tensor) else output.pooler_output, dim=-1)

    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        ref_pixels = processor(images=refs, return_tensors="pt")["pixel_values"]
        text_inputs = processor(text=cleaned, truncation=True, return_tensors="pt")
        emb = features(model.get_image_features(pixel_values=pixels))
        ref_emb = features(model.get_image_features(pixel_values=ref_pixels))
        text = features(model.get_text_features(**text_inputs))
    assert text_inputs["input_ids"].shape == (3, 64)
    # the differentiable preprocessing equals the processor's (same size: no resampling involved), for the class
    # defaults saved here (include_top: a second division by std) and other EfficientNet settings (ALIGN-style x*2-1)
    unit = torch.stack([torch.from_numpy(np.array(i)) for i in images]).permute(0, 3, 1, 2) / 255
    assert torch.allclose(reward.encoder.preprocess(unit), pixels, atol=1e-5)
    for settings in ({"rescale_factor": 1 / 127.5, "rescale_offset": True, "do_normalize": False, "include_top": False},
                     {"do_normalize": False}, {"include_top": False}):
        other = EfficientNetImageProcessor(size={"height": 32, "width": 32}, **settings)
        assert torch.allclose(preprocess_from_hf_processor(other)(unit),
                              other(images=images, return_tensors="pt")["pixel_values"], atol=1e-5), settings
    s_image = (emb @ ref_emb.T).mean(1)
    s_text = (emb * text).sum(-1)
    i01, t01 = (s_image + 1) / 2, (s_text + 1) / 2
    assert torch.allclose(score, 1 / (0.3 / i01 + 0.7 / t01), atol=1e-5)
    assert torch.allclose(reward.parts(images, prompts)["s_text"], s_text, atol=1e-5)

    # the other dual-encoder rewards take the same directory: CLIP-I style image similarity and a CLIP-style score
    clip_i = build_reward("clip_image", model=str(tiny_align), references=refs)
    assert torch.allclose(clip_i.score(images), s_image, atol=1e-5)
    clip_t = build_reward("clip", model=str(tiny_align))
    assert torch.allclose(clip_t.score(images, cleaned), 100 * s_text, atol=1e-3)
    assert clip_t.encoder.logit_scale == pytest.approx(1 / model.temperature.item())  # ALIGN's temperature


def _score_args(**overrides):
    from imgalign.rewards.cli import add_score_arguments

    parser = add_score_arguments(argparse.ArgumentParser())
    argv = []
    for key, value in overrides.items():
        for item in value if isinstance(value, list) else [value]:
            argv += [f"--{key.replace('_', '-')}"] + ([] if item is True else [str(item)])
    return parser.parse_args(argv)


def test_score_command_writes_rows_and_summary(tmp_path, hf_clip):
    from imgalign.rewards.cli import run_score

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        array = (rng.random((32, 40, 3)) * 255).astype(np.uint8) if i % 2 else np.full((32, 40, 3), 128, np.uint8)
        Image.fromarray(array).save(folder / f"img_{i}.png")
    (tmp_path / "prompts.txt").write_text("\n".join(f"prompt number {i}" for i in range(5)) + "\n")

    out = tmp_path / "scores.csv"
    code = run_score(_score_args(reward=["clip", "compressibility:0.5"], reward_arg=f"clip.model={hf_clip}",
                                 images=folder, prompts=tmp_path / "prompts.txt", output=out, batch_size=2,
                                 no_progress=True))
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["file"] for r in rows] == [f"img_{i}.png" for i in range(5)]
    assert [r["prompt"] for r in rows] == [f"prompt number {i}" for i in range(5)]
    assert set(rows[0]) == {"file", "prompt", "clip", "compressibility", "total"}
    for row in rows:
        assert float(row["total"]) == pytest.approx(float(row["clip"]) + 0.5 * float(row["compressibility"]), abs=1e-4)
    # the per-image CLIP scores equal the reward called directly
    direct = build_reward("clip", model=str(hf_clip)).score(
        [Image.open(folder / f"img_{i}.png") for i in range(5)], [f"prompt number {i}" for i in range(5)])
    assert np.allclose([float(r["clip"]) for r in rows], direct.numpy(), atol=1e-3)
    summary = json.loads((tmp_path / "scores.csv.summary.json").read_text())
    assert summary["images"] == 5 and summary["columns"]["clip"]["count"] == 5
    assert summary["columns"]["compressibility"]["mean"] == pytest.approx(
        np.mean([float(r["compressibility"]) for r in rows]))

    # a JSONL manifest picks the images (and their order); output as JSONL
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"file": "img_3.png", "prompt": "x"}) + "\n" + json.dumps({"image": "img_0.png", "caption": "y"}) + "\n")
    code = run_score(_score_args(reward="incompressibility", images=folder, prompts=manifest,
                                 output=tmp_path / "s.jsonl", no_progress=True))
    assert code == 0
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"]) for r in lines] == [("img_3.png", "x"), ("img_0.png", "y")]


def test_score_command_errors_name_the_problem(tmp_path, capsys):
    from imgalign.rewards.cli import run_score

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(folder / f"{i}.png")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    assert run_score(_score_args(reward="compressibility", images=folder, prompts=tmp_path / "three.txt")) == 2
    assert "3 prompts for 2 images" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"file": "../secret.png", "prompt": "x"}) + "\n")
    assert run_score(_score_args(reward="compressibility", images=folder, prompts=bad)) == 2
    assert "outside the images folder" in capsys.readouterr().err
    assert run_score(_score_args(reward="pickscor", images=folder)) == 2
    assert "Did you mean 'pickscore'" in capsys.readouterr().err
    assert run_score(_score_args(reward="toy", images=folder)) == 2
    assert "needs prompts" in capsys.readouterr().err


def test_score_command_pairwise_reward_gives_group_win_rates(tmp_path):
    from imgalign.rewards import register_reward
    from imgalign.rewards.cli import run_score
    from imgalign.rewards.vlm_judge import VLMJudge

    def brighter(image_1, image_2, text):
        return "Image 1 is better." if np.asarray(image_1).mean() > np.asarray(image_2).mean() else "Image 2 is better."

    register_reward("brightness_judge", lambda **kw: VLMJudge(backend=brighter, **{k: v for k, v in kw.items() if k != "device"}))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, level in enumerate((10, 200, 100)):
        Image.new("RGB", (8, 8), (level,) * 3).save(folder / f"{i}.png")
    (tmp_path / "p.txt").write_text("one prompt for all\n")
    out = tmp_path / "judge.csv"
    assert run_score(_score_args(reward="brightness_judge", images=folder, prompts=tmp_path / "p.txt", output=out)) == 0
    assert [float(r["brightness_judge"]) for r in csv.DictReader(out.open())] == [0.0, 1.0, 0.5]


def test_group_win_rates_use_g_encodings_for_embedding_rewards(hf_clip):
    reward = build_reward("clip", model=str(hf_clip))
    group = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    before = reward.encoder.image_encodings
    rates = reward.group_win_rates(group, "a red circle")
    assert reward.encoder.image_encodings - before == 6  # not 6 * 5 / 2 pairs
    scores = reward.score(group, "a red circle")
    diff = scores[:, None] - scores[None, :]
    p = torch.sigmoid(reward.compare_scale * diff)
    assert torch.allclose(rates, (p.sum(1) - 0.5) / 5, atol=1e-5)
    assert F.l1_loss(rates.mean(), torch.tensor(0.5)) < 1e-5


def test_score_command_refuses_symlinks_nan_weights_and_unknown_reward_args(tmp_path, capsys):
    from imgalign.rewards.cli import run_score

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "0.png")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(secret)
    (folder / "1.png").symlink_to(secret)
    assert run_score(_score_args(reward="compressibility", images=folder)) == 2
    err = capsys.readouterr().err
    assert "1.png leads through a symlink to" in err and "outside the folder" in err and "copy the image" in err
    (folder / "1.png").unlink()
    (folder / "2.png").symlink_to(folder / "0.png")  # a link that stays inside is fine
    assert run_score(_score_args(reward="compressibility", images=folder, no_progress=True)) == 0
    capsys.readouterr()

    assert run_score(_score_args(reward="compressibility:nan", images=folder)) == 2
    assert "the weight nan is not a finite number" in capsys.readouterr().err
    assert run_score(_score_args(reward=["compressibility:inf", "incompressibility"], images=folder)) == 2
    assert "not a finite number" in capsys.readouterr().err

    assert run_score(_score_args(reward="compressibility", reward_arg="compressibility.qualty=80", images=folder)) == 2
    err = capsys.readouterr().err
    assert ("--reward-arg compressibility.qualty: reward 'compressibility' has no argument 'qualty' (did you mean "
            "'quality'?); its arguments are: batch_size, compare_scale, device, dtype, quality") in err
    assert "Traceback" not in err


def test_score_command_reads_every_mode_and_names_bad_files(tmp_path, capsys):
    from imgalign.rewards.cli import run_score

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(folder / "a16.png")
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(folder / "b_alpha.png")
    Image.new("RGB", (8, 8), (128, 128, 128)).save(folder / "c_rgb.png")
    out = tmp_path / "s.csv"
    assert run_score(_score_args(reward="compressibility", images=folder, output=out, no_progress=True)) == 0
    assert "images: 1 image converted from I;16, 1 RGBA composited on white" in capsys.readouterr().out
    summary = json.loads((tmp_path / "s.csv.summary.json").read_text())
    assert summary["image_conversions"] == {"converted from I;16": 1, "RGBA composited on white": 1}
    scores = [float(r["compressibility"]) for r in csv.DictReader(out.open())]
    assert scores[0] == pytest.approx(scores[2], abs=1e-6)  # the 16-bit image is the same mid grey, not white

    Image.new("RGB", (1, 1)).save(folder / "d_dot.png")
    assert run_score(_score_args(reward="compressibility", images=folder)) == 2
    assert "d_dot.png: the image is 1x1 pixels, smaller than --min-image-size=8" in capsys.readouterr().err
    assert run_score(_score_args(reward="compressibility", images=folder, min_image_size=1, output=out,
                                 no_progress=True)) == 0
    assert run_score(_score_args(reward="compressibility", images=folder, min_image_size=1, max_image_pixels=32)) == 2
    assert "8x8 = 6.4e-05 MP is more than --max-image-pixels=32" in capsys.readouterr().err

    (tmp_path / "p.txt").write_bytes(b"one\ntwo\nthr\xe9e\nfour\n")
    assert run_score(_score_args(reward="compressibility", images=folder, min_image_size=1,
                                 prompts=tmp_path / "p.txt")) == 2
    assert "p.txt line 3: not UTF-8 (byte 0xe9" in capsys.readouterr().err
