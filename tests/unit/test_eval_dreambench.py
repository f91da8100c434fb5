"""imgalign.eval.dreambench: the prompts_and_classes.txt parser (real file and toy), dataset checks and their errors,
seeds, resumable generation (stub and toy pipelines, per-subject LoRA), metrics against a hand computation with
tiny encoders, the outputs and the `imgalign eval dreambench` command."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imgalign._paths import TOY_ASSETS
from imgalign.cli import build_parser, main
from imgalign.eval import dreambench as db
from imgalign.rewards import testing as tiny
from imgalign.toy.subjects import SUBJECT_DIR

TOY_SD = TOY_ASSETS / "sd"
TOY_CLIP = TOY_ASSETS / "clip"


def _shared_dreambench() -> Path | None:
    """$IMGALIGN_DREAMBENCH_DIR, else a sibling shared/data/dreambench/dataset folder of an ancestor of this file."""
    env = os.environ.get("IMGALIGN_DREAMBENCH_DIR")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / "dreambench" / "dataset"
        if candidate.is_dir():
            return candidate
    return None


DATA = _shared_dreambench()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / db.PROMPTS_FILE).is_file(),
                                reason="DreamBench dataset not found (set IMGALIGN_DREAMBENCH_DIR)")
LIVE = {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}  # the README's 9 live subjects


def _toy_dataset(root: Path, subjects=("striped_square", "ringed_circle")) -> Path:
    """A copy of some toy subjects (and the toy prompts file) that a test may break."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(SUBJECT_DIR / db.PROMPTS_FILE, root / db.PROMPTS_FILE)
    for name in subjects:
        shutil.copytree(SUBJECT_DIR / name, root / name)
    lines = (root / db.PROMPTS_FILE).read_text().splitlines()
    keep = [ln for ln in lines if "," not in ln or ".format" in ln or ln.split(",")[0] in (*subjects, "subject_name")]
    (root / db.PROMPTS_FILE).write_text("\n".join(keep) + "\n")
    return root


def _write_generated(bench: db.DreamBench, images: Path, k: int, seed: int = 0, size: int = 32) -> None:
    rng = np.random.default_rng(seed)
    for subject in bench.subjects:
        for i in range(len(subject.templates)):
            for j in range(k):
                path = db.image_path(images, subject.name, i, j)
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models: one thread is fastest, and avoids oversubscribing the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    return tiny.save_tiny_dino(tmp_path_factory.mktemp("dino") / "dino")


@pytest.fixture(scope="module")
def backbones(dino_dir) -> db.Backbones:
    return db.load_backbones(str(dino_dir), "toy")


# ---------------------------------------------------------------------------------------------- parser ---


@needs_data
def test_real_prompts_file_has_30_subjects_25_object_and_25_live_prompts():
    spec = db.parse_prompts_and_classes(DATA / db.PROMPTS_FILE)
    assert len(spec.classes) == 30 and "dog4" not in spec.classes
    assert spec.classes["bear_plushie"] == "stuffed animal" and spec.classes["dog8"] == "dog"
    assert len(spec.object_templates) == len(spec.live_templates) == 25
    assert spec.object_templates[0] == spec.live_templates[0] == "a {0} {1} in the jungle"
    assert spec.object_templates[-1] == spec.live_templates[-1] == "a cube shaped {0} {1}"
    assert "a {0} {1} wearing a santa hat" in spec.live_templates
    assert "a {0} {1} floating in an ocean of milk" in spec.object_templates
    assert {s for s, c in spec.classes.items() if c in db.LIVE_CLASSES} == LIVE


@needs_data
def test_real_dataset_with_absent_subjects_needs_an_explicit_subject_choice():
    order = list(db.parse_prompts_and_classes(DATA / db.PROMPTS_FILE).classes)
    present = [name for name in order if (DATA / name).is_dir()]
    with pytest.raises(db.DreamBenchError) as err:
        db.load_dreambench(DATA)
    message = str(err.value)
    assert str(DATA / "backpack") in message and f"--subjects {','.join(present)} " in message
    bench = db.load_dreambench(DATA, subjects=present, token="[V]")
    assert [s.name for s in bench.subjects] == present
    by_name = {s.name: s for s in bench.subjects}
    assert {n for n, s in by_name.items() if s.live} == LIVE & set(present)
    assert len(by_name["red_cartoon"].references) == 4 and len(by_name["vase"].references) == 6
    dog, vase = by_name["dog"], by_name["vase"]
    assert bench.prompts(dog)[10] == "a [V] dog wearing a red hat"
    assert bench.text_prompts(dog)[10] == "a dog wearing a red hat"
    assert bench.prompts(vase)[14] == "a [V] vase floating in an ocean of milk"


def test_toy_prompts_file_gives_every_subject_the_object_prompts():
    spec = db.parse_prompts_and_classes(SUBJECT_DIR / db.PROMPTS_FILE)
    assert list(spec.classes) == ["striped_square", "ringed_circle", "two_tone_triangle", "checker_square",
                                  "cross_circle"]
    assert len(spec.object_templates) == 15 and spec.live_templates == ()
    bench = db.load_dreambench(SUBJECT_DIR, live_classes=("square",))  # no live list: live subjects use object prompts
    square = bench.subjects[0]
    assert square.live and square.templates == spec.object_templates
    assert bench.prompts(square)[2] == "a sks square on a black background"
    assert bench.text_prompts(square)[2] == "a square on a black background"
    assert db.load_dreambench(SUBJECT_DIR.parent).root == SUBJECT_DIR  # the folder above dataset/ works too


def test_parser_accepts_crlf_double_quotes_other_argument_orders_and_headings(tmp_path):
    text = ("Classes:\r\n\r\nsubject_name,class\r\nmy_dog , dog\r\nmug,cup\r\n\r\nPrompts\r\n\r\nobject prompts\r\n"
            "prompt_list = [\r\n\"a {0} {1} on a table\".format(unique_token, class_token),\r\n"
            "'a {1} {0} upside down'.format(class_token, unique_token),\r\n"
            "'one {1} {0}'.format(unique_token, class_token),\r\n"
            "'a {} {} in the rain'.format( unique_token , class_token ),\r\n"
            "'it\\'s a {0} {1}'.format(unique_token, class_token)]\r\n\r\nLIVE SUBJECT PROMPTS\r\n"
            "prompt_list = ['a {0} {1} running'.format(unique_token, class_token)]\r\n")
    path = tmp_path / db.PROMPTS_FILE
    path.write_bytes(text.encode())
    spec = db.parse_prompts_and_classes(path)
    assert spec.classes == {"my_dog": "dog", "mug": "cup"}
    assert spec.object_templates == ("a {0} {1} on a table", "a {0} {1} upside down", "one {1} {0}",
                                     "a {0} {1} in the rain", "it's a {0} {1}")
    assert [db.render(t, "[V]", "cup") for t in spec.object_templates[1:3]] == ["a [V] cup upside down", "one cup [V]"]
    assert spec.live_templates == ("a {0} {1} running",)


@pytest.mark.parametrize("bad, fragment", [
    ("Classes\na,cup\nObject Prompts\n'a {0} {1}'.format(unique_token)\n", "must take unique_token and class_token"),
    ("Classes\na,cup\nObject Prompts\n'a {0.__class__} {1}'.format(unique_token, class_token)\n", "only {0} and {1}"),
    ("Classes\na,cup\nObject Prompts\n'a photo of a {1}'.format(unique_token, class_token)\n", "unique token"),
    ("Classes\na,cup\na,mug\nObject Prompts\n'a {0} {1}'.format(unique_token, class_token)\n", "listed twice"),
    ("Object Prompts\n'a {0} {1}'.format(unique_token, class_token)\n", "no `subject_name,class` rows"),
    ("Classes\na,cup\n", "no prompt templates"),
])
def test_parser_errors_name_the_file_and_line(tmp_path, bad, fragment):
    path = tmp_path / db.PROMPTS_FILE
    path.write_text(bad)
    with pytest.raises(db.DreamBenchError) as err:
        db.parse_prompts_and_classes(path)
    assert str(path) in str(err.value) and fragment in str(err.value)


def test_unknown_subject_names_the_closest_one():
    with pytest.raises(db.DreamBenchError, match="did you mean 'striped_square'"):
        db.load_dreambench(SUBJECT_DIR, subjects=["striped_squares"])


# ---------------------------------------------------------------------------------------------- errors ---


def test_missing_prompts_file_names_the_path(tmp_path):
    root = _toy_dataset(tmp_path / "data")
    (root / db.PROMPTS_FILE).unlink()
    with pytest.raises(db.DreamBenchError) as err:
        db.load_dreambench(root)
    assert str(root / db.PROMPTS_FILE) in str(err.value) and "--data" in str(err.value)


def test_subject_folder_without_images_names_the_folder(tmp_path):
    root = _toy_dataset(tmp_path / "data")
    for p in (root / "ringed_circle").iterdir():
        p.unlink()
    (root / "ringed_circle" / "notes.txt").write_text("no images here")
    with pytest.raises(db.DreamBenchError) as err:
        db.load_dreambench(root)
    assert f"{root / 'ringed_circle'} holds no reference images" in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_reference_names_the_file(tmp_path, damage):
    root = _toy_dataset(tmp_path / "data")
    bad = root / "striped_square" / "01.jpg"
    (root / "striped_square" / "01.png").unlink()
    if damage == "garbage":
        bad.write_bytes(b"this is not an image")
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(bad, quality=95)
        bad.write_bytes(bad.read_bytes()[:3000])
    with pytest.raises(db.DreamBenchError) as err:
        db.load_dreambench(root)
    assert str(bad) in str(err.value) and "cannot read the image" in str(err.value)


def test_subject_in_class_table_without_folder_names_the_path_and_the_fix(tmp_path):
    root = _toy_dataset(tmp_path / "data")
    shutil.rmtree(root / "ringed_circle")
    with pytest.raises(db.DreamBenchError) as err:
        db.load_dreambench(root)
    assert str(root / "ringed_circle") in str(err.value) and "--subjects striped_square" in str(err.value)
    assert [s.name for s in db.load_dreambench(root, subjects=["striped_square"]).subjects] == ["striped_square"]


def test_missing_or_unreadable_generated_image_names_the_file(tmp_path):
    bench = db.load_dreambench(SUBJECT_DIR, subjects=["cross_circle"], limit_prompts=2)
    _write_generated(bench, tmp_path, k=2)
    broken = db.image_path(tmp_path, "cross_circle", 1, 0)
    broken.write_bytes(b"not a png")
    with pytest.raises(db.DreamBenchError, match="cannot read the image") as err:
        db.check_generated(bench, tmp_path, images_per_prompt=2)
    assert str(broken) in str(err.value)
    broken.unlink()
    with pytest.raises(db.DreamBenchError, match="1 generated image") as err:
        db.check_generated(bench, tmp_path, images_per_prompt=2)
    assert str(broken) in str(err.value)


def test_cli_errors_come_before_anything_slow(tmp_path, monkeypatch, capsys):
    def slow(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(db, "load_backbones", slow)
    monkeypatch.setattr("imgalign.models.adapters.load_adapter", slow)
    root = _toy_dataset(tmp_path / "data")
    shutil.rmtree(root / "ringed_circle")
    rc = main(["eval", "dreambench", "--data", str(root), "--model", str(TOY_SD), "--out", str(tmp_path / "o")])
    assert rc == 2 and "error:" in capsys.readouterr().err
    # generated images missing and no --model: refused before the encoders load
    rc = main(["eval", "dreambench", "--data", str(root), "--subjects", "striped_square", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and str(tmp_path / "o" / "images") in err and "missing" in err
    rc = main(["eval", "dreambench", "--data", str(root), "--subjects", "striped_square", "--lora-dir", "x",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "need --model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- seeds, generation ---


def test_seeds_are_fixed_distinct_and_independent_of_the_subject_choice():
    seeds = {db.image_seed(0, s, i, k) for s in ("dog", "dog2", "vase") for i in range(25) for k in range(4)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    assert db.image_seed(0, "dog", 3, 1) == db.image_seed(0, "dog", 3, 1) != db.image_seed(1, "dog", 3, 1)


class StubPipe:
    """Counts calls; image k is a function of its generator's seed only. Raises after `fail_after` calls (a kill)."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[tuple[str, int]] = []
        self.events: list[tuple] = []
        self.fail_after = fail_after

    def __call__(self, prompt, num_images_per_prompt, generator, **kwargs):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append((prompt, num_images_per_prompt))
        images = [Image.fromarray(np.random.default_rng(g.initial_seed() % 2**32).integers(0, 256, (8, 8, 3),
                                                                                            dtype=np.uint8))
                  for g in generator]
        return SimpleNamespace(images=images)

    def load_lora_weights(self, path):
        self.events.append(("load", Path(path).name))

    def unload_lora_weights(self):
        self.events.append(("unload",))


def test_killed_generation_resumes_without_regenerating_finished_images(tmp_path):
    bench = db.load_dreambench(SUBJECT_DIR, subjects=["striped_square", "cross_circle"], limit_prompts=3)
    full = tmp_path / "full"
    stats = db.generate_images(StubPipe(), bench, full, images_per_prompt=2, progress=False)
    assert (stats.written, stats.kept) == (12, 0)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        db.generate_images(StubPipe(fail_after=4), bench, part, images_per_prompt=2, progress=False)
    finished = {p: p.stat().st_mtime_ns for p in part.rglob("*.png")}
    assert len(finished) == 8
    lost = part / "cross_circle" / "00_1.png"  # one image of a finished prompt lost too
    lost.unlink()
    finished.pop(lost)
    pipe = StubPipe()
    stats = db.generate_images(pipe, bench, part, images_per_prompt=2, progress=False)
    assert (stats.written, stats.kept) == (5, 7)
    assert pipe.calls == [("a sks circle", 1), ("a sks circle on a white background", 2),
                          ("a sks circle on a black background", 2)]
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())  # kept, not rewritten
    for p in full.rglob("*.png"):  # the resumed run equals the uninterrupted one
        assert (part / p.relative_to(full)).read_bytes() == p.read_bytes()
    assert not list(part.rglob(".*tmp*"))


def test_per_subject_lora_is_loaded_only_for_subjects_with_work_and_unloaded_after(tmp_path):
    bench = db.load_dreambench(SUBJECT_DIR, subjects=["striped_square", "cross_circle"], limit_prompts=1)
    loras = tmp_path / "loras"
    with pytest.raises(db.DreamBenchError, match=str(loras / "striped_square" / "pytorch_lora_weights.safetensors")):
        db.lora_dirs(loras, bench.subjects)
    for s in bench.subjects:
        (loras / s.name).mkdir(parents=True)
        (loras / s.name / "pytorch_lora_weights.safetensors").write_bytes(b"")
    _write_generated(db.load_dreambench(SUBJECT_DIR, subjects=["striped_square"], limit_prompts=1), tmp_path / "img", 2)
    pipe = StubPipe()
    db.generate_images(pipe, bench, tmp_path / "img", images_per_prompt=2, loras=db.lora_dirs(loras, bench.subjects),
                       progress=False)
    assert pipe.events == [("load", "cross_circle"), ("unload",)] and len(pipe.calls) == 1


@pytest.fixture(scope="module")
def toy_pipe():
    from imgalign.models.adapters import load_adapter

    return load_adapter(str(TOY_SD)).pipe


def test_toy_pipeline_resume_and_per_subject_lora(tmp_path, toy_pipe):
    """1 subject x 2 prompts x 2 images at 2 steps; a lost image is regenerated alone and equals the original. A
    per-subject LoRA changes only its subject's images and is gone afterwards."""
    from imgalign.models.adapters import load_adapter

    bench = db.load_dreambench(SUBJECT_DIR, subjects=["striped_square"], limit_prompts=2)
    kw = {"images_per_prompt": 2, "num_inference_steps": 2, "guidance_scale": 5.0, "progress": False}
    first = db.generate_images(toy_pipe, bench, tmp_path / "a", **kw)
    assert first.written == 4
    lost = db.image_path(tmp_path / "a", "striped_square", 1, 0)
    original = np.asarray(Image.open(lost)).copy()
    lost.unlink()
    requested = []

    def counting(**call):
        requested.append(call["num_images_per_prompt"])
        return toy_pipe(**call)

    again = db.generate_images(counting, bench, tmp_path / "a", **kw)
    assert (again.written, again.kept, requested) == (1, 3, [1])
    assert np.abs(np.asarray(Image.open(lost)).astype(int) - original).max() <= 1

    two = db.load_dreambench(SUBJECT_DIR, subjects=["striped_square", "cross_circle"], limit_prompts=1)
    lora_root = tmp_path / "loras"
    maker = load_adapter(str(TOY_SD))
    maker.add_lora(rank=4)
    maker.save_lora(lora_root / "cross_circle")  # B = 0 at init: the identity
    with torch.no_grad():
        for p in maker.lora_parameters():
            p.normal_(0, 0.5)
    maker.save_lora(lora_root / "striped_square")
    kw["images_per_prompt"] = 1
    db.generate_images(toy_pipe, two, tmp_path / "base", **kw)
    db.generate_images(toy_pipe, two, tmp_path / "lora", loras=db.lora_dirs(lora_root, two.subjects), **kw)
    db.generate_images(toy_pipe, two, tmp_path / "after", **kw)

    def pixels(folder, subject):
        return np.asarray(Image.open(db.image_path(tmp_path / folder, subject, 0, 0))).astype(int)

    assert np.abs(pixels("lora", "striped_square") - pixels("base", "striped_square")).max() > 10
    assert np.abs(pixels("lora", "cross_circle") - pixels("base", "cross_circle")).max() <= 1
    assert np.abs(pixels("after", "striped_square") - pixels("base", "striped_square")).max() <= 1


def test_prompts_record_refuses_another_token_or_other_settings(tmp_path):
    bench = db.load_dreambench(SUBJECT_DIR, subjects=["striped_square"], limit_prompts=2)
    settings = {"model": "m", "seed": 0}
    db.write_record(bench, tmp_path, settings, db.check_record(bench, tmp_path, settings))
    record = json.loads((tmp_path / db.RECORD_FILE).read_text())
    assert record["token"] == "sks" and record["subjects"]["striped_square"]["prompts"] == bench.prompts(bench.subjects[0])
    other = db.load_dreambench(SUBJECT_DIR, subjects=["striped_square"], limit_prompts=2, token="[V]")
    with pytest.raises(db.DreamBenchError, match="--token") as err:
        db.check_record(other, tmp_path)
    assert str(tmp_path / db.RECORD_FILE) in str(err.value)
    with pytest.raises(db.DreamBenchError, match="seed 0 -> 1"):
        db.check_record(bench, tmp_path, {"model": "m", "seed": 1})
    longer = db.load_dreambench(SUBJECT_DIR, subjects=["striped_square"], limit_prompts=4)
    db.check_record(longer, tmp_path, settings)  # more prompts than before: the same settings resume


# ---------------------------------------------------------------------------------------------- metrics ---


def test_prompt_means_by_hand():
    """One prompt, K = 2 images, R = 2 references, 2-d embeddings:
    generated g1 = (1, 0), g2 = (0, 1); references r1 = (1, 0), r2 = (0.6, 0.8); text t = (-0.6, 0.8).
    DINO = mean(g.r) = (1 + 0.6 + 0 + 0.8) / 4 = 0.6 (the same vectors serve as CLIP: CLIP-I = 0.6).
    CLIP-T raw = mean(-0.6, 0.8) = 0.1; clamped = mean(0, 0.8) = 0.4."""
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = torch.tensor([[-0.6, 0.8]])
    raw = db.prompt_means(g, r, g, r, t)
    assert raw["dino"] == pytest.approx([0.6]) and raw["clip_i"] == pytest.approx([0.6])
    assert raw["clip_t"] == pytest.approx([0.1])
    assert db.prompt_means(g, r, g, r, t, clip_t="clamped")["clip_t"] == pytest.approx([0.4])


@pytest.fixture(scope="module")
def hf_models(dino_dir):
    from transformers import CLIPModel, CLIPTokenizer, ViTModel

    return (ViTModel.from_pretrained(dino_dir, add_pooling_layer=False).eval(),
            CLIPModel.from_pretrained(TOY_CLIP).eval(), CLIPTokenizer.from_pretrained(TOY_CLIP))


def _hand_scores(bench, images, hf_models, backbones, k, clamp=False):
    """The metrics image by image with the transformers models themselves, and plain Python means."""
    from functools import cache

    from imgalign.rewards.encoders import model_features
    from imgalign.rewards.images import to_unit_range

    vit, clip, tok = hf_models

    @cache
    @torch.no_grad()
    def dino(path):
        x = backbones.dino.preprocess(to_unit_range([Image.open(path).convert("RGB")]))
        return F.normalize(vit(pixel_values=x).last_hidden_state[0, 0], dim=-1)

    @cache
    @torch.no_grad()
    def clip_image(path):
        x = backbones.clip.preprocess(to_unit_range([Image.open(path).convert("RGB")]))
        return F.normalize(model_features(clip.get_image_features(pixel_values=x))[0], dim=-1)

    @cache
    @torch.no_grad()
    def clip_text(text):
        ids = tok([text], padding=True, return_tensors="pt")
        return F.normalize(model_features(clip.get_text_features(**ids))[0], dim=-1)

    subjects = {}
    for s in bench.subjects:
        prompts = []
        for i, text in enumerate(bench.text_prompts(s)):
            gens = [db.image_path(images, s.name, i, j) for j in range(k)]
            d = [float(dino(g) @ dino(r)) for g in gens for r in s.references]
            c = [float(clip_image(g) @ clip_image(r)) for g in gens for r in s.references]
            t = [float(clip_image(g) @ clip_text(text)) for g in gens]
            t = [max(v, 0.0) for v in t] if clamp else t
            prompts.append((sum(d) / len(d), sum(c) / len(c), sum(t) / len(t)))
        subjects[s.name] = prompts
    return subjects


@pytest.mark.parametrize("clip_t", ["raw", "clamped"])
def test_scores_equal_a_hand_computation_and_embed_each_image_once(tmp_path, hf_models, backbones, clip_t):
    bench = db.load_dreambench(SUBJECT_DIR, subjects=["striped_square", "checker_square", "cross_circle"],
                               limit_prompts=3)
    _write_generated(bench, tmp_path / "img", k=2)
    backbones.clip._text_cache.clear()
    texts_encoded = []
    real_text = backbones.clip.model.get_text_features

    def counting(**kw):
        texts_encoded.append(kw["input_ids"].shape[0])
        return real_text(**kw)

    backbones.clip.model.get_text_features = counting
    before = backbones.dino.image_encodings, backbones.clip.image_encodings
    try:
        result = db.score_dreambench(bench, tmp_path / "img", backbones, images_per_prompt=2, clip_t=clip_t,
                                     batch_size=4, progress=False)
    finally:
        del backbones.clip.model.get_text_features
    n_images = sum(len(s.references) + 2 * 3 for s in bench.subjects)
    assert backbones.dino.image_encodings - before[0] == n_images
    assert backbones.clip.image_encodings - before[1] == n_images
    assert sum(texts_encoded) == 6  # two subjects are squares: their 3 texts are shared

    hand = _hand_scores(bench, tmp_path / "img", hf_models, backbones, 2, clamp=clip_t == "clamped")
    for row in result["prompts"]:
        assert [row[m] for m in db.METRICS] == pytest.approx(hand[row["subject"]][row["prompt_index"]], abs=1e-5)
    for row in result["subjects"]:
        means = np.mean(hand[row["subject"]], axis=0)
        assert [row[m] for m in db.METRICS] == pytest.approx(means, abs=1e-5)
    overall = np.mean([np.mean(v, axis=0) for v in hand.values()], axis=0)
    assert [result["overall"]["all"][m] for m in db.METRICS] == pytest.approx(overall, abs=1e-5)
    assert set(result["overall"]) == {"all", "object"} and result["settings"]["clip_t"] == clip_t
    assert ("raw cosine" if clip_t == "raw" else "max(cos, 0)") in result["conventions"]["clip_t"]


@needs_data
def test_real_photos_and_live_prompts_score(tmp_path, backbones):
    bench = db.load_dreambench(DATA, subjects=["dog", "teapot"], limit_prompts=12)
    _write_generated(bench, tmp_path / "img", k=1)
    result = db.score_dreambench(bench, tmp_path / "img", backbones, images_per_prompt=1, progress=False)
    assert [r["prompt"] for r in result["prompts"] if r["prompt_index"] == 11] == [
        "a sks dog wearing a santa hat", "a sks teapot with a tree and autumn leaves in the background"]
    assert {k: v["subjects"] for k, v in result["overall"].items()} == {"all": 2, "object": 1, "live": 1}
    assert all(-1 <= r[m] <= 1 for r in result["prompts"] for m in db.METRICS)


# ------------------------------------------------------------------------------------------ outputs, CLI ---


def test_cli_generates_resumes_scores_and_writes_tables_report_and_grids(tmp_path, dino_dir, capsys):
    out = tmp_path / "run"
    argv = ["eval", "dreambench", "--data", "toy", "--subjects", "striped_square,ringed_circle", "--limit-prompts",
            "2", "--images-per-prompt", "2", "--model", str(TOY_SD), "--steps", "2", "--dino", str(dino_dir),
            "--clip", "toy", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    assert "generated 8 images, kept 0" in capsys.readouterr().out
    assert main(argv) == 0
    assert "generated 0 images, kept 8" in capsys.readouterr().out

    subjects = json.loads((out / "per_subject.json").read_text())
    prompts = json.loads((out / "per_prompt.json").read_text())
    assert [r["subject"] for r in subjects] == ["striped_square", "ringed_circle"] and len(prompts) == 4
    assert (out / "per_subject.csv").read_text().splitlines()[0] == (
        "subject,class,kind,references,prompts,images,dino,clip_i,clip_t")
    assert prompts[1]["prompt"] == "a sks square on a white background"
    assert prompts[1]["text_prompt"] == "a square on a white background"
    report = (out / "report.md").read_text()
    assert str(dino_dir) in report and str(TOY_CLIP) in report and "raw cosine" in report
    assert "identifier removed" in report and "grids/ringed_circle.png" in report
    scores = json.loads((out / "scores.json").read_text())
    assert scores["overall"]["all"]["subjects"] == 2
    grid = Image.open(out / "grids" / "striped_square.png")
    assert grid.width >= 5 * 128 and grid.height >= 3 * 128  # references (5) + 2 prompt rows of 2 images
    record = json.loads((out / "images" / db.RECORD_FILE).read_text())
    assert record["generation"]["steps"] == 2 and set(record["subjects"]) == {"striped_square", "ringed_circle"}
    # --dino none: the same CLIP columns from the same images, no DINO column (offline toy runs)
    assert main(["eval", "dreambench", "--data", "toy", "--subjects", "striped_square,ringed_circle",
                 "--limit-prompts", "2", "--images-per-prompt", "2", "--images", str(out / "images"), "--dino", "none",
                 "--clip", "toy", "--out", str(tmp_path / "nodino"), "--quiet", "--no-grids"]) == 0
    again = json.loads((tmp_path / "nodino" / "per_subject.json").read_text())
    assert all(math.isnan(r["dino"]) for r in again)
    assert [r["clip_i"] for r in again] == pytest.approx([r["clip_i"] for r in subjects])
    assert "not computed (--dino none)" in (tmp_path / "nodino" / "report.md").read_text()


def test_eval_registers_both_benchmarks():
    from imgalign.eval import unigenbench

    parser = build_parser()
    assert parser.parse_args(["eval", "unigenbench", "--out", "o"]).func is unigenbench.run_cli
    args = parser.parse_args(["eval", "dreambench", "--data", "toy", "--out", "o"])
    assert args.func is db.run_cli and args.token == "sks" and args.clip_t == "raw"
