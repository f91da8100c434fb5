"""CLIP-family rewards on tiny random-weight models saved to disk and loaded back by path:
CLIP score (open_clip and transformers backends), CLIP image similarity, toy CLIP, PickScore, HPSv2, aesthetic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from imgalign.rewards import RewardLoadError, build_reward
from imgalign.rewards import testing as tiny
from imgalign.rewards.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

PROMPTS = ["a red circle", "two blue squares on a white background", "a photo of a cat"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_rewards")
    arch, safetensors_ckpt = tiny.save_tiny_open_clip_arch(root / "arch_st", checkpoint="safetensors")
    _, pt_ckpt = tiny.save_tiny_open_clip_arch(root / "arch_pt", name="imgalign-tiny-clip-pt", checkpoint="pt")
    return {
        "open_clip_dir": tiny.save_tiny_open_clip_dir(root / "open_clip_dir"),
        "arch": arch,
        "ckpt_safetensors": safetensors_ckpt,
        "ckpt_pt": pt_ckpt,
        "hf_clip": tiny.save_tiny_hf_clip(root / "hf_clip"),
        "head": tiny.save_aesthetic_head(root / "sac+logos+ava1-l14-linearMSE.pth", in_dim=16),
    }


def _images(n=3, seed=0, size=(40, 52)):
    return torch.rand(n, 3, *size, generator=torch.Generator().manual_seed(seed))


def _pixels(unit, size=32):
    """Reference preprocessing written out by hand for square inputs: resize to size, CLIP mean/std."""
    x = F.interpolate(unit, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    return (x - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)


def test_clip_score_formula_and_layout(models):
    """score = 100 * cos(E_image, E_text) with the model loaded from its directory (open_clip layout)."""
    import open_clip

    reward = build_reward("clip", model=str(models["open_clip_dir"]))
    unit = _images(3, size=(48, 48))
    score = reward.score(unit, PROMPTS)
    assert score.shape == (3,) and score.dtype == torch.float32

    model = open_clip.create_model(f"local-dir:{models['open_clip_dir']}")  # independent load
    tokens = open_clip.get_tokenizer(f"local-dir:{models['open_clip_dir']}")(PROMPTS)
    with torch.no_grad():
        image = F.normalize(model.encode_image(_pixels(unit)), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
    assert torch.allclose(score, 100 * (image * text).sum(-1), atol=1e-4)

    # compare uses the model's temperature: sigmoid(exp(logit_scale) * (cos_a - cos_b))
    other = _images(3, seed=1, size=(48, 48))
    p = reward.compare(unit, other, PROMPTS)
    expected = torch.sigmoid(reward.encoder.logit_scale * (score - reward.score(other, PROMPTS)) / 100)
    assert torch.allclose(p, expected, atol=1e-5)
    # Hessel's CLIPScore variant: 2.5 * max(cos, 0)
    hessel = build_reward("clip", model=str(models["open_clip_dir"]), scale=2.5, clamp=True)
    assert torch.allclose(hessel.score(unit, PROMPTS), (2.5 * score / 100).clamp_min(0), atol=1e-5)


def test_clip_score_value_ranges_and_pil_agree(models):
    reward = build_reward("clip", model=str(models["open_clip_dir"]))
    pixels = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    unit = pixels.float() / 255
    base = reward.score(pixels, PROMPTS[:2])
    assert torch.allclose(reward.score(unit, PROMPTS[:2]), base, atol=1e-4)
    assert torch.allclose(reward.score(unit * 2 - 1, PROMPTS[:2], value_range=(-1, 1)), base, atol=1e-4)
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    assert torch.allclose(reward.score(pil, PROMPTS[:2]), base, atol=1e-4)


def test_clip_score_is_differentiable_and_checkpoint_formats_agree(models):
    """Built-in-style architecture + checkpoint file (safetensors, or a .pt read with weights_only=True)."""
    from_st = build_reward("clip", model=str(models["arch"]), pretrained=str(models["ckpt_safetensors"]))
    from_pt = build_reward("clip", model=str(models["arch"]), pretrained=str(models["ckpt_pt"]))
    unit = _images(2)
    assert torch.allclose(from_st.score(unit, PROMPTS[:2]), from_pt.score(unit, PROMPTS[:2]), atol=1e-5)
    x = unit.clone().requires_grad_(True)
    from_st.score(x, PROMPTS[:2]).sum().backward()
    assert x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in from_st.encoder.model.parameters())


def test_clip_transformers_backend_and_toy_clip(models):
    """A transformers CLIPModel directory (the toy CLIP's layout) works through the same reward."""
    from transformers import CLIPModel, CLIPProcessor

    reward = build_reward("toy_clip", model=str(models["hf_clip"]))
    assert type(reward.encoder).__name__ == "HFDualEncoder"
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    score = reward.score([image], "a red circle")
    model, processor = CLIPModel.from_pretrained(models["hf_clip"]), CLIPProcessor.from_pretrained(models["hf_clip"])
    inputs = processor(text=["a red circle"], images=[image], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = F.cosine_similarity(out.image_embeds, out.text_embeds)
    assert torch.allclose(score, 100 * cos, atol=1e-3)


def test_clip_image_similarity(models):
    refs = _images(2, seed=5, size=(32, 32))
    reward = build_reward("clip_image", model=str(models["open_clip_dir"]), references=refs)
    images = torch.cat([refs[:1], _images(1, seed=9, size=(32, 32))])
    emb, ref_emb = reward.embed(images), reward.embed(refs)
    score = reward.score(images)
    assert torch.allclose(score, (emb @ ref_emb.T).mean(1), atol=1e-5)
    assert torch.allclose(reward.score(images, references=refs[:1]), (emb @ ref_emb[:1].T)[:, 0], atol=1e-5)
    paired = build_reward("clip_image", model=str(models["open_clip_dir"]), paired=True)
    assert paired.score(refs, references=refs).sub(1).abs().max() < 1e-5  # an image is its own best match


def test_loading_errors_name_the_fix(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RewardLoadError, match=r"yuvalkirstain/PickScore_v1.*local path.*model=DIR"):
        build_reward("pickscore", model="yuvalkirstain/PickScore_v1", processor=str(models["hf_clip"]))
    with pytest.raises(RewardLoadError, match="xswu/HPSv2.*HPS_v2.1_compressed.pt"):
        build_reward("hpsv2.1", model=str(models["arch"]))
    with pytest.raises(RewardLoadError, match="no such file"):
        build_reward("clip", model="ViT-B-32", pretrained="/nonexistent/weights.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RewardLoadError, match="open_clip_config.json"):
        build_reward("clip", model=str(tmp_path / "empty"))
    with pytest.raises(RewardLoadError, match=r"no-such-tag: neither a file nor a known tag of RN50-quickgelu"):
        build_reward("clip", model="RN50-quickgelu", pretrained="no-such-tag")
    with pytest.raises(RewardLoadError, match="needs weights"):
        build_reward("clip", model="ViT-H-14")  # no OpenAI weights for this architecture: say so
    with pytest.raises(RewardLoadError, match=r"laion/CLIP-ViT-B-32-laion2B-s34B-b79K.*pretrained=DIR"):
        build_reward("clip", model="ViT-B-32", pretrained="laion2b_s34b_b79k")  # a tag needs the hub
    with pytest.raises(RewardLoadError, match="toy CLIP not found"):
        build_reward("toy_clip", model=str(tmp_path / "missing"))


def test_pickscore_formula(models):
    """PickScore = exp(logit_scale) * cos(text, image) from a transformers CLIPModel + processor by path."""
    from transformers import CLIPModel

    reward = build_reward("pickscore", model=str(models["hf_clip"]))
    unit = _images(3, size=(32, 32))
    score = reward.score(unit, PROMPTS)
    model = CLIPModel.from_pretrained(models["hf_clip"])
    tokens = reward.encoder.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = F.normalize(model.get_image_features(pixel_values=_pixels(unit)).pooler_output, dim=-1)
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    scale = model.logit_scale.exp()
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-3)  # learned logit scale read from the checkpoint
    assert torch.allclose(score, scale * (image * text).sum(-1), atol=1e-3)
    # two candidates for one prompt: compare == softmax over the pair (PickScore's calc_probs)
    a, b = unit[:1], unit[1:2]
    p = reward.compare(a, b, PROMPTS[0])
    logits = torch.stack([reward.score(a, PROMPTS[0]), reward.score(b, PROMPTS[0])], -1)
    assert torch.allclose(p, logits.softmax(-1)[:, 0], atol=1e-6)


def test_hpsv2_pads_to_square_and_scores_raw_cosine(models):
    """HPSv2: checkpoint as released ({"state_dict": ...} .pt, read with weights_only=True); longest side resized,
    black padding, no logit scale."""
    reward = build_reward("hpsv2", model=str(models["arch"]), checkpoint=str(models["ckpt_pt"]))
    assert reward.version == "v2.0" and reward.encoder.preprocess.resize_mode == "longest"
    wide = torch.rand(1, 3, 16, 32)
    pixels = reward.encoder.preprocess(wide)
    black = (-torch.tensor(OPENAI_CLIP_MEAN) / torch.tensor(OPENAI_CLIP_STD)).view(3, 1)
    assert pixels.shape == (1, 3, 32, 32)
    assert torch.allclose(pixels[0, :, :8, :].reshape(3, -1), black.expand(3, 8 * 32), atol=1e-5)
    assert torch.allclose(pixels[0, :, 24:, :].reshape(3, -1), black.expand(3, 8 * 32), atol=1e-5)
    score = reward.score(wide, "a red circle")
    with torch.no_grad():
        image = F.normalize(reward.encoder.model.encode_image(pixels), dim=-1)
    text = reward.encoder.encode_texts(["a red circle"])
    assert torch.allclose(score, (image * text).sum(-1), atol=1e-5)
    assert -1 <= score.item() <= 1
    v21 = build_reward("hpsv2.1", model=str(models["arch"]), checkpoint=str(models["ckpt_pt"]))
    assert v21.version == "v2.1" and v21.name == "hpsv2.1"
    with pytest.raises(ValueError, match="version"):
        build_reward("hpsv2", version="v3", checkpoint=str(models["ckpt_pt"]), model=str(models["arch"]))


def test_aesthetic_is_mlp_on_normalised_embedding(models):
    reward = build_reward("aesthetic", head=str(models["head"]), clip_model=str(models["arch"]),
                          clip_pretrained=str(models["ckpt_safetensors"]))
    unit = _images(2, size=(32, 32))
    score = reward.score(unit)  # prompts are not needed
    state = torch.load(models["head"], weights_only=True)
    with torch.no_grad():
        emb = F.normalize(reward.encoder.model.encode_image(_pixels(unit)), dim=-1)
    h = emb
    for i in (0, 2, 4, 6, 7):  # linear layers, no activations (dropout is off at eval)
        h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    assert torch.allclose(score, h[:, 0], atol=1e-5)
    assert not reward.head.relu
    x = unit.clone().requires_grad_(True)
    reward.score(x).sum().backward()
    assert x.grad.abs().sum() > 0


def test_aesthetic_head_layouts(tmp_path):
    from imgalign.rewards.aesthetic import AestheticHead

    relu_state = {}  # the reluMSE variant: ReLU after each Linear but the last -> indices 0, 3, 6, 9, 11
    for i, (a, b) in zip((0, 3, 6, 9, 11), ((8, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        relu_state[f"layers.{i}.weight"], relu_state[f"layers.{i}.bias"] = torch.randn(b, a), torch.randn(b)
    head = AestheticHead.from_state_dict(relu_state)
    assert head.relu and [lin.in_features for lin in head.linears] == [8, 1024, 128, 64, 16]
    x = torch.randn(2, 8)
    h = x
    for k, i in enumerate((0, 3, 6, 9, 11)):
        h = h @ relu_state[f"layers.{i}.weight"].T + relu_state[f"layers.{i}.bias"]
        h = torch.relu(h) if k < 4 else h
    assert torch.allclose(head(x), h, atol=1e-4)
    with pytest.raises(RewardLoadError):
        AestheticHead.from_state_dict({"fc.weight": torch.zeros(1, 1)})


def test_device_and_dtype(models):
    """``to(dtype=...)`` moves the model; inputs follow; scores stay float32 and agree with float32 ones."""
    reward = build_reward("pickscore", model=str(models["hf_clip"]))
    unit = _images(2, size=(32, 32))
    base = reward.score(unit, PROMPTS[:2])
    reward.to(dtype=torch.float64)
    assert next(reward.encoder.model.parameters()).dtype == torch.float64
    doubled = reward.score(unit, PROMPTS[:2])
    assert doubled.dtype == torch.float32 and torch.allclose(doubled, base, atol=1e-4)
    built = build_reward("clip", model=str(models["open_clip_dir"]), dtype="fp64", device="cpu")
    assert next(built.encoder.model.parameters()).dtype == torch.float64
