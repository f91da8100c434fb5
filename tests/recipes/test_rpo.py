"""RPO on tiny pipelines: Bradley-Terry labels, steps on every family, the cached negatives, best-model selection,
kill and resume. The loss itself is tested on hand-computed values in tests/unit/test_losses_diffusion.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgalign._paths import TOY_ASSETS
from imgalign.config import ConfigError, load_config
from imgalign.data.errors import DataError
from imgalign.recipes import rpo

FAMILIES = ("sd15", "sd2-v", "sdxl", "sd3", "flux")
SUBJECT = TOY_ASSETS / "subjects" / "dataset" / "striped_square"
LORA = "pytorch_lora_weights.safetensors"


def make_cfg(pipeline: str, out: Path, *extra: str):
    return load_config(rpo.Config, None, [
        f"model.pretrained={pipeline}", f"data.subject_dir={SUBJECT}", "data.class_token=square",
        "data.instance_prompt='a {0} {1}'", "data.train_prompts=['a {0} {1} left of a red circle','a blue {0} {1}']",
        "data.resolution=32", f"reward.model={TOY_ASSETS / 'clip'}", "rpo.num_negatives=2", "rpo.negatives_steps=2",
        f"run.output_dir={out}", "run.max_steps=3", "run.batch_size=2", "run.checkpoint_every=1", "run.keep_last=0",
        "run.progress=false", "run.log_with=none", "optim.lr=1e-3", "lora.rank=4", "validation.every=0",
        "validation.num_inference_steps=1", "validation.images_per_prompt=1", *extra,
    ])


class CountingNegatives(rpo.Negatives):
    made: list = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        CountingNegatives.made.append(self)


def test_labels_follow_the_bradley_terry_probability():
    """Pair draws: reference and negative uniform, label 1 with probability P[j, i], drawn anew per draw."""
    from PIL import Image

    from imgalign.data.unpaired import ImageTransform

    prefer = torch.tensor([[0.2, 0.9]])
    subject = rpo.Subject("s", "square", [Image.new("RGB", (8, 8))], [], "a sks square", ["p"])
    items = [{"prompt": "p"}, {"prompt": "p"}]
    negs = [Image.new("RGB", (8, 8))] * 2
    counts = {0: [0, 0], 1: [0, 0]}
    for step in range(100):
        gens = [torch.Generator().manual_seed(1000 * step + b) for b in range(40)]
        batch = rpo.draw_pairs(gens, prefer, subject, items, negs, ImageTransform(8, hflip=False), step, list(range(40)))
        for label, p in zip(batch["labels"].tolist(), batch["probs"].tolist()):
            i = 0 if p == pytest.approx(0.2) else 1
            counts[i][0] += label
            counts[i][1] += 1
    for i, p in ((0, 0.2), (1, 0.9)):
        k, n = counts[i]
        assert n > 1500 and abs(k / n - p) < 4 * math.sqrt(p * (1 - p) / n), (i, k, n)
    assert batch["pixels"].shape == (80, 3, 8, 8) and batch["captions"][:40] == ["a sks square"] * 40


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_on_every_family(family, tiny_pipelines, tmp_path):
    """Step 1 on a fresh LoRA: policy == reference, so the preference term is log 2 whatever the label; the LoRA
    trains; negatives, best/ and the checkpoint's best state are written."""
    out = tmp_path / "run"
    result = rpo.train(make_cfg(tiny_pipelines(family), out))
    hist = result["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    assert hist[0]["train/pref_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert hist[0]["train/loss"] == pytest.approx(math.log(2) + hist[0]["train/sim_loss"], abs=1e-5)
    assert all(math.isfinite(h["train/loss"]) for h in hist)
    record = json.loads((out / "negatives" / "negatives.json").read_text())
    assert len(record["items"]) == 4 and len(record["rewards"]["negatives"]) == 4
    assert len(record["rewards"]["references"]) == 5 and len(record["rewards"]["references"][0]) == 2
    assert sorted(p.name for p in (out / "negatives").glob("*.png")) == ["00_00.png", "00_01.png", "01_00.png",
                                                                          "01_01.png"]
    assert (out / "best" / LORA).is_file() and (out / "checkpoint-3" / "rpo_best.json").is_file()
    assert [v["step"] for v in result["validation"]] == [0, 3] and "val/reward" in result["validation"][0]
    trained = load_file(str(out / LORA))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k or "lora.up" in k)


def test_full_finetuning(tiny_pipelines, tmp_path):
    out = tmp_path / "full"
    result = rpo.train(make_cfg(tiny_pipelines("sd15"), out, "lora.enabled=false", "run.max_steps=2", "optim.lr=1e-4"))
    assert result["history"][0]["train/pref_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert (out / "best" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_best_is_kept_when_the_validation_reward_rises(tiny_pipelines, tmp_path, monkeypatch):
    """Validation rewards 0.5, 0.4, 0.7, 0.6, 0.65 at steps 0-4: best/ holds step 2's weights (== checkpoint-2's)."""
    from imgalign.rewards.harmonic import LambdaHarmonic

    values = iter([0.5, 0.4, 0.7, 0.6, 0.65])

    def parts(self, images, prompts, lam=None, value_range=None):
        v = next(values)
        n = len(prompts)
        return {"reward": torch.full((n,), v), "s_image": torch.zeros(n), "s_text": torch.zeros(n)}

    monkeypatch.setattr(LambdaHarmonic, "parts", parts)
    out = tmp_path / "run"
    result = rpo.train(make_cfg(tiny_pipelines("sd15"), out, "run.max_steps=4", "validation.every=1"))
    assert [v["val/best_reward"] for v in result["validation"]] == pytest.approx([0.5, 0.5, 0.7, 0.7, 0.7])
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["step"] == 2 and best["reward"] == pytest.approx(0.7)
    kept, ckpt2 = load_file(str(out / "best" / LORA)), load_file(str(out / "checkpoint-2" / LORA))
    assert kept.keys() == ckpt2.keys() and all(torch.equal(kept[k], ckpt2[k]) for k in kept)
    assert json.loads((out / "checkpoint-3" / "rpo_best.json").read_text()) == {"value": pytest.approx(0.7), "step": 2}
    assert (out / "validation" / "step-000002.png").is_file()


def test_kill_and_resume_equals_uninterrupted_and_reuses_the_negatives(tiny_pipelines, tmp_path, run_killed,
                                                                         assert_same_continuation, monkeypatch):
    """Killed in step 3 after checkpoint-2, resumed from latest: the same losses and final weights as the uninterrupted
    run, the best-model state restored, and not one negative generated again."""
    monkeypatch.setattr(rpo, "Negatives", CountingNegatives)
    pipe = tiny_pipelines("sd15")
    extra = ("run.max_steps=4", "run.checkpoint_every=2", "run.grad_accum=2", "validation.every=2",
             "optim.lr_scheduler=cosine")
    full = rpo.train(make_cfg(pipe, tmp_path / "full", *extra))
    run_killed(rpo, "_step", 6, lambda: rpo.train(make_cfg(pipe, tmp_path / "killed", *extra)))
    assert CountingNegatives.made[-1].generated == 4
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = rpo.train(make_cfg(pipe, tmp_path / "killed", *extra, "run.resume_from=latest"))
    assert CountingNegatives.made[-1].generated == 0
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    assert_same_continuation(full["history"], resumed["history"], ("train/loss", "train/label", "train/sim_loss"),
                             [(tmp_path / "full" / LORA, tmp_path / "killed" / LORA)], abs=1e-9)
    assert resumed["validation"][-1]["val/best_reward"] == pytest.approx(full["validation"][-1]["val/best_reward"])
    assert (json.loads((tmp_path / "full" / "best" / "best.json").read_text())["step"]
            == json.loads((tmp_path / "killed" / "best" / "best.json").read_text())["step"])


def test_negatives_generation_continues_and_changed_settings_are_refused(tiny_pipelines, tmp_path, monkeypatch):
    """A negatives folder with two images deleted: only those two are generated; other negative settings refuse the
    folder, naming the setting and the fix."""
    monkeypatch.setattr(rpo, "Negatives", CountingNegatives)
    pipe = tiny_pipelines("sd15")
    rpo.train(make_cfg(pipe, tmp_path / "a", "run.max_steps=1", "validation.enabled=false"))
    before = (tmp_path / "a" / "negatives" / "00_00.png").read_bytes()
    for name in ("00_01.png", "01_00.png"):
        (tmp_path / "a" / "negatives" / name).unlink()
    shared = f"rpo.negatives_dir={tmp_path / 'a' / 'negatives'}"
    rpo.train(make_cfg(pipe, tmp_path / "b", "run.max_steps=1", "validation.enabled=false", shared))
    assert CountingNegatives.made[-1].generated == 2
    assert (tmp_path / "a" / "negatives" / "00_00.png").read_bytes() == before
    with pytest.raises(ConfigError, match="negatives_guidance|guidance.*delete the folder"):
        rpo.train(make_cfg(pipe, tmp_path / "c", "run.max_steps=1", shared, "rpo.negatives_guidance=3.0"))


def test_bad_subject_inputs_name_the_path(tmp_path):
    empty = tmp_path / "dataset" / "dog"
    empty.mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    cfg = rpo.DataConfig(subject_dir=str(empty), class_token="dog")
    with pytest.raises(DataError, match=r"dataset/dog.*no images"):
        rpo.load_subject(cfg)
    (empty / "00.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="00.jpg"):
        rpo.load_subject(cfg)
    (empty / "00.jpg").unlink()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(empty / "00.png")
    with pytest.raises(ConfigError, match="prompts_and_classes.txt"):
        rpo.load_subject(rpo.DataConfig(subject_dir=str(empty)))
    subject = rpo.load_subject(rpo.DataConfig(subject_dir=str(empty), class_token="dog", identifier="[V]"))
    assert subject.instance_prompt == "a photo of [V] dog" and len(subject.train_prompts) == 8
    assert subject.train_prompts == [t.format("[V]", "dog") for t in rpo.LIVE_PROMPTS]  # dogs are live subjects
    with pytest.raises(ConfigError, match="has no \\{0\\}"):
        rpo.load_subject(rpo.DataConfig(subject_dir=str(empty), class_token="dog", train_prompts=["a dog"]))


def test_class_from_the_dreambench_table():
    """data.class_token null: the class comes from prompts_and_classes.txt beside the subject folder."""
    subject = rpo.load_subject(rpo.DataConfig(subject_dir=str(SUBJECT)))
    assert subject.class_token == "square" and subject.instance_prompt == "a photo of sks square"
    assert subject.train_prompts[0] == "a painting of a sks square in the style of Van Gogh"  # objects' prompts


def test_reconstruction_baseline_needs_no_reference_forward(tiny_pipelines, tmp_path, monkeypatch):
    monkeypatch.setattr(rpo, "reference_errors", lambda *a, **k: pytest.fail("the baseline has no reference forward"))
    result = rpo.train(make_cfg(tiny_pipelines("sd15"), tmp_path / "db", "rpo.objective=reconstruction",
                                "run.max_steps=2"))
    assert all(h["train/loss"] == pytest.approx(h["train/sim_loss"]) and h["train/loss"] > 0 for h in result["history"])
