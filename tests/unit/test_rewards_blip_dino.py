"""ImageReward (released BLIP checkpoint mapped onto transformers BLIP modules) and DINO similarity, on tiny
random-weight models saved to disk and loaded back by path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imgalign.rewards import RewardLoadError, build_reward
from imgalign.rewards import testing as tiny
from imgalign.rewards.imagereward import REWARD_MEAN, REWARD_STD, convert_original_state_dict
from imgalign.rewards.images import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

PROMPTS = ["two red circles", "a blue square left of a green triangle"]


@pytest.fixture(scope="module")
def imagereward_dir(tmp_path_factory):
    return tiny.save_tiny_imagereward(tmp_path_factory.mktemp("imagereward") / "release")


def _reference_imagereward(state, pixels, ids, mask, vision_heads, text_heads):
    """BLIP's ViT + cross-attention BERT + linear head written out with plain tensor ops on the *released* key
    names, independent of transformers (so the key mapping and module choices are checked, not assumed)."""

    def ln(x, prefix, eps):
        return F.layer_norm(x, x.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], eps)

    def lin(x, prefix):
        return F.linear(x, state[prefix + ".weight"], state[prefix + ".bias"])

    def heads_split(x, n):
        b, length, d = x.shape
        return x.view(b, length, n, d // n).transpose(1, 2)  # [B, n, L, d/n]

    v = "blip.visual_encoder."
    conv_w = state[v + "patch_embed.proj.weight"]
    x = F.conv2d(pixels, conv_w, state[v + "patch_embed.proj.bias"], stride=conv_w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([state[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + state[v + "pos_embed"]
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(v + "blocks."))
    for i in range(layers):
        p = f"{v}blocks.{i}."
        h = ln(x, p + "norm1", 1e-6)
        b, n, d = h.shape
        q, k, val = lin(h, p + "attn.qkv").view(b, n, 3, vision_heads, d // vision_heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-1, -2)) * (d // vision_heads) ** -0.5).softmax(-1)
        x = x + lin((att @ val).transpose(1, 2).reshape(b, n, d), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    t = "blip.text_encoder."
    y = state[t + "embeddings.word_embeddings.weight"][ids] + state[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    y = ln(y, t + "embeddings.LayerNorm", 1e-12)
    additive = (1.0 - mask[:, None, None, :].float()) * -10000.0  # BERT's extended attention mask
    layers = 1 + max(int(k.split(".")[4]) for k in state if k.startswith(t + "encoder.layer."))
    for i in range(layers):
        p = f"{t}encoder.layer.{i}."
        for block, memory, bias in (("attention", y, additive), ("crossattention", image, 0.0)):
            q = heads_split(lin(y, p + block + ".self.query"), text_heads)
            k = heads_split(lin(memory, p + block + ".self.key"), text_heads)
            val = heads_split(lin(memory, p + block + ".self.value"), text_heads)
            scores = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5) + bias
            ctx = (scores.softmax(-1) @ val).transpose(1, 2).flatten(2)
            y = ln(lin(ctx, p + block + ".output.dense") + y, p + block + ".output.LayerNorm", 1e-12)
        y = ln(lin(F.gelu(lin(y, p + "intermediate.dense")), p + "output.dense") + y, p + "output.LayerNorm", 1e-12)
    h = y[:, 0]
    for i in (0, 2, 4, 6, 7):
        h = lin(h, f"mlp.layers.{i}")
    return h[:, 0]


def test_imagereward_matches_blip_reference(imagereward_dir):
    reward = build_reward("imagereward", checkpoint=str(imagereward_dir / "ImageReward.pt"), vision_heads=2)
    assert reward.preprocess.mean == OPENAI_CLIP_MEAN and reward.preprocess.std == OPENAI_CLIP_STD
    assert reward.preprocess.resize_mode == "shortest" and reward.preprocess.output_size == (32, 32)
    vocab = reward.tokenizer.get_vocab()
    assert "[DEC]" in vocab and "[ENC]" in vocab  # BLIP's extra tokens

    unit = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    score = reward.score(unit, PROMPTS)
    state = torch.load(imagereward_dir / "ImageReward.pt", weights_only=True)
    tokens = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (2, 35) and (tokens["input_ids"][:, 0] == reward.tokenizer.cls_token_id).all()
    pixels = (unit - torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        raw = _reference_imagereward(state, pixels, tokens["input_ids"], tokens["attention_mask"], 2, 2)
    assert torch.allclose(reward.raw_output(unit, PROMPTS), raw, atol=1e-4)
    # reward = (MLP(h_cls) - 0.16717362830052426) / 1.0333394966054072
    assert torch.allclose(score, (raw - REWARD_MEAN) / REWARD_STD, atol=1e-4)
    assert (REWARD_MEAN, REWARD_STD) == (0.16717362830052426, 1.0333394966054072)
    # Bradley-Terry with scale 1, ImageReward's training objective
    assert torch.allclose(reward.compare(unit[:1], unit[1:], PROMPTS[0]),
                          torch.sigmoid(reward.score(unit[:1], PROMPTS[0]) - reward.score(unit[1:], PROMPTS[0])))


def test_imagereward_converted_layout_roundtrip_and_gradient(imagereward_dir, tmp_path):
    original = build_reward("imagereward", checkpoint=str(imagereward_dir), vision_heads=2)  # directory works too
    original.save(tmp_path / "converted")
    assert sorted(p.name for p in (tmp_path / "converted").iterdir()) >= ["config.json", "model.safetensors"]
    converted = build_reward("imagereward", checkpoint=str(tmp_path / "converted"))
    unit = torch.rand(2, 3, 40, 36, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(original.score(unit, PROMPTS), converted.score(unit, PROMPTS), atol=1e-5)
    x = unit.clone().requires_grad_(True)
    converted.score(x, PROMPTS).sum().backward()
    assert x.grad.abs().sum() > 0


def test_imagereward_rejects_unknown_keys():
    with pytest.raises(RewardLoadError, match="unexpected keys"):
        convert_original_state_dict({"blip.visual_encoder.extra.weight": torch.zeros(1), "mystery": torch.zeros(1)})


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return tiny.save_tiny_dino(tmp_path_factory.mktemp("dino") / "dino")


def test_dino_similarity_is_cls_cosine(dino_dir):
    from transformers import ViTModel

    refs = torch.rand(3, 3, 36, 36, generator=torch.Generator().manual_seed(2))
    reward = build_reward("dino", model=str(dino_dir), references=refs)
    pre = reward.preprocess
    assert (pre.resize_size, pre.output_size, pre.mean, pre.std) == (36, (32, 32), IMAGENET_MEAN, IMAGENET_STD)
    images = torch.cat([refs[:1], torch.rand(1, 3, 36, 36, generator=torch.Generator().manual_seed(3))])
    score = reward.score(images)

    model = ViTModel.from_pretrained(dino_dir, add_pooling_layer=False)

    def cls(x):  # 36x36 input: no resize needed; center crop 32; ImageNet normalisation
        x = x[..., 2:34, 2:34]
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            return F.normalize(model(pixel_values=x).last_hidden_state[:, 0], dim=-1)

    expected = (cls(images) @ cls(refs).T).mean(1)
    assert torch.allclose(score, expected, atol=1e-5)
    paired = build_reward("dino", model=str(dino_dir), paired=True)
    assert torch.allclose(paired.score(refs, references=refs), torch.ones(3), atol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        paired.score(refs)
