"""Toy preference data: Pick-a-Pic-layout pairs sampled from a base pipeline and labelled by the toy evaluator.

For each prompt we sample two images (or k, keeping the best and the worst) from the pipeline (same prompt,
different noise), score them with the toy evaluator (by default the toy rater's `ToyScore.preference`:
fidelity criteria plus taste, scaled down by the watermark; ``criterion="score"`` labels by fidelity alone) and label the pair like Pick-a-Pic:
``label_0 = 1`` if jpg_0 scores higher, ``0`` if jpg_1 does, ``0.5`` on a tie. An optional label-noise
probability flips decided labels, to simulate noisy human raters. The result is a parquet file that
`imgalign.data.load_preference_pairs` reads (ties are dropped there unless ``keep_ties=True``).

    python -m imgalign.toy.pairs --pipeline assets/toy/sd --out data/toy/pairs_train.parquet --n-pairs 2000

Online RL recipes need prompts only: they use the shipped prompt sets (`online_rl_prompt_files`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

PAIR_CRITERIA = ("preference", "score", "overall")  # the `ToyScore` fields that can rank a prompt's images


def label_from_scores(score_0: float, score_1: float) -> float:
    """Pick-a-Pic label_0 from two evaluator scores: 1.0, 0.0, or 0.5 for a tie."""
    if score_0 > score_1:
        return 1.0
    if score_0 < score_1:
        return 0.0
    return 0.5


def online_rl_prompt_files() -> dict[str, Path]:
    """The prompt files online RL recipes train / evaluate on: the shipped toy prompt sets."""
    from imgalign.toy.prompts import PROMPT_DIR

    return {split: PROMPT_DIR / f"{split}.txt" for split in ("train", "validation", "test")}


def generate_toy_pairs(pipeline_dir: str | Path, prompts: list[str], out_path: str | Path, n_pairs: int,
                       num_inference_steps: int = 10, guidance_scale: float = 5.0, seed: int = 0,
                       label_noise: float = 0.0, lora: str | Path | None = None, batch_size: int = 32,
                       device: str = "cpu", images_per_prompt: int = 2, criterion: str = "preference",
                       progress: bool = True) -> dict:
    """Sample ``n_pairs`` preference pairs and write them as Pick-a-Pic parquet to ``out_path``.

    Args:
        pipeline_dir: a saved diffusers pipeline (e.g. ``assets/toy/sd``), loaded with `load_adapter`.
        prompts: toy prompts; pair ``i`` uses ``prompts[i % len(prompts)]``.
        n_pairs: number of pairs (rows) to write.
        num_inference_steps, guidance_scale: sampler settings (few steps are enough for toy data).
        seed: seeds the sampler noise (per batch) and the label noise; same seed, same file.
        label_noise: probability of flipping a decided label (ties stay ties).
        lora: optional folder with ``pytorch_lora_weights.safetensors`` to sample from a fine-tuned model.
        batch_size: prompts per pipeline call.
        images_per_prompt: k images per prompt; the pair is the best and the worst of them by toy score (kept
            in sampling order, so either may come first; a tie when all k score the same). k = 2 is a random pair;
            larger k gives fewer ties and wider margins at k/2 times the sampling cost.
        criterion: the `ToyScore` field that ranks images: ``preference`` (the rater: fidelity, taste, watermark),
            ``score`` (fidelity only) or ``overall``.
        progress: show progress bars with an ETA (tqdm, to stderr): one for sampling, counted in images, one for
            labelling, counted in pairs (the per-step bar of the pipeline stays off).

    Returns:
        stats: n_pairs, n_ties, n_flipped, mean score of jpg_0 / jpg_1, mean |score difference|, seconds.
    """
    from tqdm.auto import tqdm

    from imgalign.data import write_preference_parquet
    from imgalign.models.adapters import load_adapter
    from imgalign.toy.evaluator import evaluate

    if not prompts:
        raise ValueError("generate_toy_pairs needs at least one prompt")
    if images_per_prompt < 2:
        raise ValueError(f"images_per_prompt must be at least 2 (a pair), got {images_per_prompt}")
    if criterion not in PAIR_CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(PAIR_CRITERIA)}, got {criterion!r}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be a probability in [0, 1], got {label_noise}")
    start = time.time()
    pipe = load_adapter(str(pipeline_dir), device=device).pipe
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    pipe.set_progress_bar_config(disable=True)
    noise_rng = np.random.default_rng([seed, 1])
    rows, scores, n_ties, n_flipped = [], [], 0, 0
    k = images_per_prompt
    sample_bar = tqdm(total=n_pairs * k, desc="sampling pair images", unit="img", disable=not progress, position=0)
    label_bar = tqdm(total=n_pairs, desc="labelling pairs", unit="pair", disable=not progress, position=1)
    for begin in range(0, n_pairs, batch_size):
        batch = [prompts[i % len(prompts)] for i in range(begin, min(begin + batch_size, n_pairs))]
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + begin)
        images = pipe(batch, num_images_per_prompt=k, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=generator, output_type="pil").images
        sample_bar.update(len(images))
        for j, prompt in enumerate(batch):  # diffusers orders images prompt-major: p0 x k, p1 x k, ...
            group = images[k * j:k * (j + 1)]
            group_scores = [getattr(evaluate(im, prompt), criterion) for im in group]
            best, worst = int(np.argmax(group_scores)), int(np.argmin(group_scores))
            a, b = sorted((best, worst)) if best != worst else (0, 1)
            im_0, im_1, s_0, s_1 = group[a], group[b], group_scores[a], group_scores[b]
            label = label_from_scores(s_0, s_1)
            if label == 0.5:
                n_ties += 1
            elif label_noise > 0 and noise_rng.random() < label_noise:
                label, n_flipped = 1.0 - label, n_flipped + 1
            rows.append((prompt, im_0, im_1, label))
            scores.append((s_0, s_1))
            label_bar.update(1)
        label_bar.set_postfix(ties=n_ties, refresh=False)
    sample_bar.close()
    label_bar.close()
    write_preference_parquet(out_path, rows)
    s = np.array(scores, dtype=np.float64).reshape(-1, 2)
    return {"path": str(out_path), "n_pairs": len(rows), "n_ties": n_ties, "n_flipped": n_flipped,
            "mean_score_0": float(s[:, 0].mean()), "mean_score_1": float(s[:, 1].mean()),
            "mean_abs_score_diff": float(np.abs(s[:, 0] - s[:, 1]).mean()),
            "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale, "seed": seed,
            "label_noise": label_noise, "images_per_prompt": images_per_prompt, "criterion": criterion,
            "seconds": round(time.time() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    from imgalign.toy.prompts import load_prompts

    p = argparse.ArgumentParser(description="Sample toy preference pairs (Pick-a-Pic parquet).")
    p.add_argument("--pipeline", default="assets/toy/sd")
    p.add_argument("--prompts", default=str(online_rl_prompt_files()["train"]))
    p.add_argument("--out", required=True)
    p.add_argument("--n-pairs", type=int, default=2000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.0)
    p.add_argument("--lora", default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--images-per-prompt", type=int, default=2, help="pair the best and worst of k samples")
    p.add_argument("--criterion", default="preference", choices=PAIR_CRITERIA,
                   help="what ranks the images: the rater's preference (fidelity + taste) or fidelity alone")
    a = p.parse_args(argv)
    stats = generate_toy_pairs(a.pipeline, load_prompts(a.prompts), a.out, a.n_pairs, a.steps, a.cfg, a.seed,
                               a.label_noise, a.lora, a.batch_size, images_per_prompt=a.images_per_prompt,
                               criterion=a.criterion)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
