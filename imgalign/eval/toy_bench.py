"""The toy benchmark: generate a prompt set with a pipeline (plus optional LoRA) and check every image exactly.

    python scripts/bench_toy.py --pipeline assets/toy/sd [--lora outputs/demo/dpo] [--split test]

Per-criterion scores follow GenEval: each criterion is averaged over the images whose prompt states it;
`overall` is the fraction of images that satisfy every stated criterion; `score` is the dense mean of the
stated (fidelity) criteria; `taste` (prompts without a background), `watermark` (band coverage, lower is
better) and `preference` (fidelity + taste, scaled down by the watermark: the toy rater's score) are in
`imgalign.toy.evaluator`. Intervals are percentile bootstrap 95% over prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from imgalign.eval.preference import bootstrap_ci

CRITERIA = ("preference", "score", "overall", "presence", "colour", "shape", "count", "size", "relation", "background",
            "taste", "watermark")


@dataclass
class ToyBenchResult:
    prompts: list[str]
    per_image: list[dict[str, float | None]]  # one dict of criteria per image (None where not stated)
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    summary: dict[str, tuple[float, float, float, int]] = field(default_factory=dict)  # mean, lo, hi, n

    def values(self, criterion: str) -> np.ndarray:
        return np.array([r[criterion] for r in self.per_image if r.get(criterion) is not None], dtype=np.float64)

    def table(self) -> str:
        lines = [f"{'criterion':<12}{'mean':>8}{'95% CI':>20}{'n':>6}"]
        for name, (m, lo, hi, n) in self.summary.items():
            lines.append(f"{name:<12}{m:>8.3f}{f'[{lo:.3f}, {hi:.3f}]':>20}{n:>6}")
        return "\n".join(lines)


@torch.no_grad()
def generate_and_score(pipe, prompts: list[str], images_per_prompt: int = 1, num_inference_steps: int = 20,
                       guidance_scale: float = 5.0, seed: int = 0, batch_size: int = 32, size: int = 32,
                       progress: bool = True) -> ToyBenchResult:
    """Generate `images_per_prompt` images per prompt at fixed seeds and evaluate each against its prompt."""
    from tqdm.auto import tqdm

    from imgalign.toy import evaluate

    pipe.set_progress_bar_config(disable=True)
    all_images, all_prompts, rows = [], [], []
    for begin in tqdm(range(0, len(prompts), batch_size), desc="toy bench", disable=not progress):
        batch = prompts[begin:begin + batch_size]
        gen = torch.Generator("cpu").manual_seed(seed * 1_000_003 + begin)
        images = pipe(batch, num_images_per_prompt=images_per_prompt, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=gen, height=size, width=size,
                      output_type="pt").images.float().cpu()  # [b * k, 3, H, W], prompt-major
        for i, img in enumerate(images):
            prompt = batch[i // images_per_prompt]
            s = evaluate(img, prompt)
            rows.append({**s.criteria, "overall": s.overall, "score": s.score, "taste": s.taste,
                         "preference": s.preference, "watermark": s.watermark})
            all_prompts.append(prompt)
        all_images.append(images)
    result = ToyBenchResult(all_prompts, rows, torch.cat(all_images))
    for name in CRITERIA:
        v = result.values(name)
        if len(v):
            result.summary[name] = (*bootstrap_ci(v), len(v))
    return result


def load_pipeline(path: str, lora: str | None = None, device: str = "cpu"):
    from imgalign.models.adapters import load_adapter

    adapter = load_adapter(path, device=device)
    if lora:
        adapter.pipe.load_lora_weights(lora)
    return adapter.pipe


def paired_changes(base: ToyBenchResult, after: ToyBenchResult,
                   criteria=("preference", "score", "taste", "watermark")) -> dict[str, dict]:
    """Per criterion: the mean after, and the change against `base` on the same prompts and seeds with a paired
    bootstrap 95 % interval -> {criterion: {"after", "change", "ci95": [lo, hi]}}."""
    out = {}
    for c in criteria:
        m, lo, hi = bootstrap_ci(after.values(c) - base.values(c))[:3]
        out[c] = {"after": float(after.values(c).mean()), "change": m, "ci95": [lo, hi]}
    return out


def changes_table(base: ToyBenchResult, runs: dict[str, dict], criteria=("preference", "score", "taste",
                                                                          "watermark")) -> str:
    """Rows: the base's means, then each run's `after change [lo, hi]` (from `paired_changes`)."""
    lines = [f"{'run':<8}" + "".join(f"{c:>30}" for c in criteria),
             f"{'base':<8}" + "".join(f"{float(base.values(c).mean()):>30.3f}" for c in criteria)]
    for name, r in runs.items():
        cells = [f"{r[c]['after']:.3f} {r[c]['change']:+.3f} [{r[c]['ci95'][0]:+.3f}, {r[c]['ci95'][1]:+.3f}]"
                 for c in criteria]
        lines.append(f"{name:<8}" + "".join(f"{cell:>30}" for cell in cells))
    return "\n".join(lines)


def demo_heldout(lora: str | None = None, n_prompts: int = 200) -> ToyBenchResult:
    """The demo's held-out protocol on the shipped toy SD (+ an optional LoRA): the first `n_prompts` test prompts,
    1 image each, 10 steps, CFG 5, seed 7, so every toy benchmark compares against the same base images."""
    from imgalign._paths import TOY_ASSETS
    from imgalign.toy.prompts import PROMPT_DIR, load_prompts

    prompts = load_prompts(PROMPT_DIR / "test.txt")[:n_prompts]
    return generate_and_score(load_pipeline(str(TOY_ASSETS / "sd"), lora), prompts, 1, num_inference_steps=10,
                              guidance_scale=5.0, seed=7)
