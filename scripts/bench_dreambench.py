"""DreamBench scoring cost: one subject (25 prompts x 4 images, already generated) against the bare encoder passes.

    python scripts/bench_dreambench.py                       # tiny DINO + toy CLIP, 64 px images
    python scripts/bench_dreambench.py --dino vits16 --image-size 512

Setup, offline: a DreamBench-layout folder in a temporary directory with one toy subject (its 5 reference renders)
and 25 prompt templates, and 100 generated images named ``<subject>/<prompt_index:02d>_<k>.png`` (toy renders of
the subject at --image-size). Backbones: a tiny random DINO ``ViTModel`` (``--dino tiny``, 2 layers at 32 px) or one
of DINO ViT-S/16's size (``--dino vits16``: 12 layers, 384 wide, 224 px, random weights), and the toy CLIP.

Timed in CPU seconds (``time.process_time``, ``torch.set_num_threads(1)``), best of --repeats runs:

- scoring: ``imgalign.eval.dreambench.score_dreambench`` on the subject (file checks, reading, embedding, cosines,
  tables);
- bare passes: what embedding each image once costs at least: read each reference and generated image once, one
  DINO and one CLIP image embedding call (preprocessing + forward) per batch of --batch-size images, and the 25
  prompt texts through the CLIP text encoder once.

Prints both, their ratio (target <= 1.1) and the encoder counts (each image embedded exactly once per backbone).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imgalign.data.images import read_image
from imgalign.eval import dreambench as db
from imgalign.rewards import testing as tiny
from imgalign.rewards.images import to_unit_range
from imgalign.toy.subjects import PROMPT_TEMPLATES, SUBJECT_DIR, SUBJECTS, render_subject

SUBJECT = "striped_square"
EXTRA_TEMPLATES = tuple(f"a {{0}} {{1}} next to a {colour} {shape}" for colour in ("red", "green", "blue", "yellow",
                                                                                  "white") for shape in ("circle",
                                                                                                         "triangle"))


def build_dataset(root: Path, image_size: int, images_per_prompt: int = 4) -> tuple[Path, Path]:
    """(dataset folder, generated images folder) of one toy subject with 25 prompts."""
    data, images = root / "dataset", root / "images"
    shutil.copytree(SUBJECT_DIR / SUBJECT, data / SUBJECT)
    templates = (PROMPT_TEMPLATES + EXTRA_TEMPLATES)[:25]
    body = ",\n".join(f"'{t}'.format(unique_token, class_token)" for t in templates)
    (data / db.PROMPTS_FILE).write_text(f"Classes\n\nsubject_name,class\n{SUBJECT},{SUBJECTS[SUBJECT]}\n\n"
                                        f"Prompts\n\nObject Prompts\n\nprompt_list = [\n{body}\n]\n")
    rng = np.random.default_rng(0)
    for i in range(len(templates)):
        for k in range(images_per_prompt):
            path = db.image_path(images, SUBJECT, i, k)
            path.parent.mkdir(parents=True, exist_ok=True)
            render_subject(SUBJECT, rng, size=image_size).save(path)
    return data, images


def save_dino(directory: Path, size: str) -> Path:
    if size == "tiny":
        return tiny.save_tiny_dino(directory)
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)  # DINO ViT-S/16's shape (facebook/dino-vits16), random weights
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                       intermediate_size=1536, qkv_bias=True, layer_norm_eps=1e-6)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(str(directory))
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(str(directory))
    return directory


def cpu_seconds(fn, repeats: int) -> float:
    """Best of ``repeats`` CPU-time measurements after one warm-up run."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dino", choices=("tiny", "vits16"), default="tiny")
    parser.add_argument("--image-size", type=int, default=64, help="side of the generated images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        data, images = build_dataset(work, args.image_size)
        backbones = db.load_backbones(str(save_dino(work / "dino", args.dino)), "toy")
        bench = db.load_dreambench(data)
        subject = bench.subjects[0]
        texts = bench.text_prompts(subject)
        files = list(subject.references) + [db.image_path(images, SUBJECT, i, k) for i in range(len(texts))
                                            for k in range(4)]

        def scoring() -> dict:
            backbones.clip._text_cache.clear()
            return db.score_dreambench(bench, images, backbones, batch_size=args.batch_size, progress=False)

        @torch.no_grad()
        def bare_passes() -> None:
            backbones.clip._text_cache.clear()
            pictures = [read_image(p) for p in files]
            for start in range(0, len(pictures), args.batch_size):
                unit = to_unit_range(pictures[start:start + args.batch_size])
                backbones.dino.embed_unit(unit)
                backbones.clip.encode_images(unit)
            backbones.clip.encode_texts(texts)

        counts = backbones.dino.image_encodings, backbones.clip.image_encodings
        result = scoring()
        per_run = backbones.dino.image_encodings - counts[0], backbones.clip.image_encodings - counts[1]
        t_score = cpu_seconds(scoring, args.repeats)
        t_bare = cpu_seconds(bare_passes, args.repeats)

    print(f"subject {SUBJECT}: {len(subject.references)} references, {len(texts)} prompts x 4 images of "
          f"{args.image_size} px; DINO {args.dino}, CLIP toy; batch {args.batch_size}; torch threads 1")
    print(f"images embedded per scoring run: DINO {per_run[0]}, CLIP {per_run[1]} "
          f"(expected {len(files)} each: every image once)")
    print(f"scoring      {t_score:.3f} s CPU")
    print(f"bare passes  {t_bare:.3f} s CPU")
    print(f"ratio        {t_score / t_bare:.3f} (target <= 1.1)")
    o = result["overall"]["all"]
    print(f"(scores: DINO {o['dino']:.4f}, CLIP-I {o['clip_i']:.4f}, CLIP-T {o['clip_t']:.4f})")
    return 0 if per_run == (len(files), len(files)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
