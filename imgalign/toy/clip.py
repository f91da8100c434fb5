"""The toy CLIP: a tiny `transformers.CLIPModel` trained contrastively on toy renders and their prompts.

Saved in ``assets/toy/clip/`` as a standard transformers folder (`CLIPModel.save_pretrained` +
`CLIPTokenizer` + `CLIPImageProcessor`), so anything that loads a CLIP by path loads it:

    from transformers import CLIPModel, CLIPProcessor
    model = CLIPModel.from_pretrained("assets/toy/clip")
    processor = CLIPProcessor.from_pretrained("assets/toy/clip")

`load_toy_clip` and `clip_scores` are small conveniences on top. Images are 32 px; the tokenizer is the
real CLIP tokenizer with ``model_max_length`` 32 (toy prompts are at most 16 tokens).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from imgalign._paths import TOY_ASSETS
from imgalign.toy import models as M

CLIP_DIR = TOY_ASSETS / "clip"


def load_toy_clip(path: str | Path = CLIP_DIR):
    """(CLIPModel in eval mode, CLIPTokenizer, CLIPImageProcessor) from a saved toy CLIP folder."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(str(path), dtype=torch.float32).eval()
    return model, CLIPTokenizer.from_pretrained(str(path)), CLIPImageProcessor.from_pretrained(str(path))


def _as_uint8(images) -> np.ndarray:
    from imgalign.toy.evaluator import to_uint8_array

    if isinstance(images, np.ndarray) and images.ndim == 4:
        return images
    return np.stack([to_uint8_array(im) for im in images])


@torch.no_grad()
def embed_texts(model, tok, prompts: list[str]) -> torch.Tensor:
    batch = tok(list(prompts), padding=True, truncation=True, return_tensors="pt")
    out = model.get_text_features(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    out = getattr(out, "pooler_output", out)  # transformers 5 may return an output object
    return F.normalize(out.float(), dim=-1)


@torch.no_grad()
def embed_images(model, images) -> torch.Tensor:
    """images: uint8 [N, 32, 32, 3] array or a list of PIL images / arrays (32 px)."""
    pixels = M.to_clip_pixels(_as_uint8(images))
    out = model.get_image_features(pixel_values=pixels)
    out = getattr(out, "pooler_output", out)
    return F.normalize(out.float(), dim=-1)


@torch.no_grad()
def clip_scores(model, tok, images, prompts: list[str]) -> torch.Tensor:
    """Cosine similarity of each image with its own prompt, [N]."""
    return (embed_images(model, images) * embed_texts(model, tok, prompts)).sum(-1)


@torch.no_grad()
def retrieval_accuracy(model, tok, images, prompts: list[str]) -> dict[str, float]:
    """Top-1 retrieval among the N given (image, prompt) pairs: text->image and image->text."""
    sim = embed_texts(model, tok, prompts) @ embed_images(model, images).T  # [N texts, N images]
    target = torch.arange(len(prompts))
    return {"text_to_image_top1": float((sim.argmax(1) == target).float().mean()),
            "image_to_text_top1": float((sim.argmax(0) == target).float().mean()),
            "n": len(prompts)}


def train_clip(prompts: list[str], steps: int, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
               renders_per_prompt: int = 8, progress: bool = True, time_limit_s: float | None = None):
    """Train a toy CLIP contrastively (symmetric InfoNCE, learned temperature) on fresh renders.

    Returns (model, info) with the steps actually run and the final loss.
    """
    import time

    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = M.build_clip(seed).train()
    tok = M.tokenizer()
    images, index = M.render_dataset(prompts, renders_per_prompt, seed=seed + 1)
    pixels = M.to_clip_pixels(images)
    ids = tok(prompts, padding="max_length", truncation=True, return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    start, loss_value, done = time.time(), float("nan"), 0
    bar = tqdm(range(steps), desc="clip", disable=not progress)
    for step in bar:
        # Sample distinct prompts per batch so that in-batch negatives are true negatives.
        chosen = torch.randperm(len(prompts), generator=gen)[:batch_size]
        which = torch.randint(0, renders_per_prompt, (len(chosen),), generator=gen)
        rows = chosen * renders_per_prompt + which  # render_dataset is prompt-major
        out = model(input_ids=ids.input_ids[chosen], attention_mask=ids.attention_mask[chosen],
                    pixel_values=pixels[rows], return_loss=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        loss_value, done = out.loss.item(), step + 1
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if time_limit_s is not None and time.time() - start > time_limit_s:
            break
    assert index is not None
    return model.eval(), {"steps": done, "final_loss": loss_value, "batch_size": batch_size, "lr": lr,
                          "renders_per_prompt": renders_per_prompt, "seconds": round(time.time() - start, 1)}


def save_toy_clip(model, out_dir: str | Path) -> Path:
    return M.save_clip(model, out_dir)
