"""`imgalign demo`: Diffusion-DPO on the toy world, on a CPU, with a before/after report.

With the shipped toy model (assets/toy/sd), top to bottom:
  1. samples two images per training prompt from the base model and labels each pair with the exact toy
     evaluator (Pick-a-Pic layout parquet; ties dropped)
  2. trains Diffusion-DPO (LoRA) through the same recipe and config system as `imgalign train diffusion-dpo`,
     scoring validation images with the toy evaluator as it goes
  3. generates the held-out test prompts at the same seeds before and after and reports the toy score with
     bootstrap 95% intervals and the paired change; writes a before/after grid and a plot of loss,
     implicit accuracy and validation score over steps

Without the shipped toy model (a checkout that has not built it), the fallback:
  1. builds a tiny SD-type pipeline in code and saves it (the trained toy models replace it once shipped)
  2. writes toy preference pairs in the Pick-a-Pic layout: for a prompt of the toy grammar, the winner is a
     render of that prompt, the loser a render of a prompt that contradicts it in one attribute
  3. trains Diffusion-DPO (LoRA) through the same recipe and config system as `imgalign train diffusion-dpo`
  4. reports, on held-out pairs, how often the model itself finds the winner more likely (lower denoising
     error under shared noise) before and after, with a paired bootstrap 95% interval of the change, and
     writes a plot of the training curves and the recipe's validation grids
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgalign._paths import TOY_ASSETS
from imgalign.config import ConfigError
from imgalign.eval.preference import bootstrap_ci, pair_error_margins


def _toy_pairs(n: int, seed: int, size: int = 32, desc: str = "rendering toy pairs"):
    from tqdm.auto import tqdm

    from imgalign.toy import parse, perturb_scene, render, sample_scene

    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(n), desc=desc, unit="pair"):
        scene = sample_scene(rng, kind="single" if i % 2 == 0 else None)
        bad = perturb_scene(scene, rng)
        win, _ = render(scene, rng, size=size)
        lose, _ = render(bad, rng, size=size)
        label = 1.0 if i % 2 == 0 else 0.0  # store half the pairs loser-first, as Pick-a-Pic does
        rows.append((scene.to_text(), win if label else lose, lose if label else win, label))
        assert parse(scene.to_text()) is not None
    return rows


EMA_ALPHA = 0.1  # weight of the newest step in the smoothed curves of training_curves.png


def _ema(values: list[float], alpha: float = EMA_ALPHA) -> list[float]:
    """Exponential moving average, bias-corrected (the first points are not pulled towards 0)."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg, weight = (1 - alpha) * avg + alpha * v, (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _raw_and_smoothed(ax, steps: list[int], values: list[float], name: str) -> None:
    """The raw per-step curve (faint) and its EMA (solid), both in the legend."""
    line, = ax.plot(steps, values, lw=0.8, alpha=0.35, label=f"{name} (per step)")
    ax.plot(steps, _ema(values), lw=1.8, c=line.get_color(), label=f"{name}, EMA (alpha={EMA_ALPHA})")


def _loss_panel(ax, steps: list[int], losses: list[float]) -> None:
    _raw_and_smoothed(ax, steps, losses, "loss")
    ax.axhline(np.log(2), ls="--", c="gray", lw=0.8, label="log 2: no preference learned")
    ax.set_title("DPO loss")
    ax.set_ylabel("DPO loss (nats)")
    ax.legend(fontsize=7)


def _finish_plot(fig, axes, path: Path) -> None:
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    _loss_panel(axes[0], steps, [h["train/loss"] for h in history])
    _raw_and_smoothed(axes[1], steps, [h["train/rewards/accuracies"] for h in history], "accuracy")
    axes[1].axhline(0.5, ls="--", c="gray", lw=0.8, label="0.5: chance")
    axes[1].set(title="implicit accuracy", ylabel="fraction of pairs, winner favoured")
    _raw_and_smoothed(axes[2], steps, [h["train/rewards/margins"] for h in history], "margin")
    axes[2].set(title="implicit reward margin", ylabel="reward(winner) - reward(loser)")
    for ax in axes[1:]:
        ax.legend(fontsize=7)
    _finish_plot(fig, axes, path)


TOY_PIPELINE = TOY_ASSETS / "sd"


def _plot_toy(history: list[dict], validation: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    _loss_panel(axes[0], steps, [h["train/loss"] for h in history])
    _raw_and_smoothed(axes[1], steps, [h["train/rewards/accuracies"] for h in history], "accuracy")
    axes[1].axhline(0.5, ls="--", c="gray", lw=0.8, label="0.5: chance")
    axes[1].set(title="implicit accuracy", ylabel="fraction of pairs, winner favoured")
    axes[1].legend(fontsize=7)
    val_steps, by_step = _validation_points(validation, "val/toy_preference")
    axes[2].plot(val_steps, [by_step[s] for s in val_steps], marker="o")
    axes[2].set(title="validation toy preference score", ylabel="mean toy preference (validation prompts)")
    _finish_plot(fig, axes, path)


def _validation_points(validation: list[dict], key: str) -> tuple[list[int], dict[int, float]]:
    """Validation steps to plot, each once: the last record of a step wins, and a scheduled validation just before
    the final one (e.g. every 62 of 250 steps: 248 and 250) is left out, so the end of training is one point."""
    by_step = {v["step"]: v[key] for v in validation if key in v}
    steps = sorted(by_step)
    if len(steps) >= 3 and steps[-1] - steps[-2] < (steps[-2] - steps[-3]) / 2:
        del by_step[steps.pop(-2)]
    return steps, by_step


def _before_after(before, after, n: int, path: Path) -> None:
    """before_after.png: the first `n` held-out images before (row 1) and after (row 2) at the same seeds, rows
    labelled, each prompt wrapped under its column, "watermark" in red under the tiles whose band is detected."""
    from imgalign.toy.evaluator import DEFAULT_CONFIG
    from imgalign.train.setup import captioned_grid

    threshold = DEFAULT_CONFIG.watermark_detected
    marks = [[(r.get("watermark") or 0.0) >= threshold for r in res.per_image[:n]] for res in (before, after)]
    rows = [f"before (base)\n{sum(marks[0])}/{n} watermarked", f"after (DPO LoRA)\n{sum(marks[1])}/{n} watermarked"]
    images = torch.cat([before.images[:n], after.images[:n]]) * 2 - 1
    title = (f"held-out test prompts, same seeds before and after; red \"watermark\": band coverage >= {threshold:g} "
             "(toy evaluator)")
    captioned_grid(images, rows, col_labels=before.prompts[:n], title=title,
                   tile_captions=["watermark" if m else None for m in marks[0] + marks[1]]).save(path)


@dataclass
class ToyDemoSettings:
    """What `imgalign demo` runs on the shipped toy model (measured: see README)."""

    pairs: int = 512  # preference pairs sampled from the base model (one per training prompt, in file order)
    images_per_pair: int = 2  # k samples per prompt, the pair is the best and the worst (k = 2: a random pair)
    sampler_steps: int = 10  # DDIM steps for pairs, validation and the before/after benchmark (20 took 12.8 min in all)
    cfg: float = 5.0
    dpo_steps: int = 250
    batch_size: int = 16
    lr: float = 3e-4
    beta: float = 500.0
    noise_range: tuple[float, float] = (0.6, 1.0)  # the noisiest 40 % of the schedule (2.4x the band removed; README)
    rank: int = 8
    eval_images_per_prompt: int = 1  # images per held-out test prompt in the before/after benchmark
    eval_prompts: int | None = None  # the first N held-out test prompts (None: all 200)
    validation_prompts: int = 48  # validation prompts scored during training (the curve in training_curves.png)
    pipeline: str = str(TOY_PIPELINE)

    def dpo_overrides(self, pairs: Path, output_dir: Path) -> list[str]:
        """The demo's Diffusion-DPO recipe as config overrides (scripts/bench_guidance.py trains its aligned model
        with it too); validation and logging are left to the caller."""
        return [
            f"model.pretrained={self.pipeline}", f"data.source={pairs}", "data.resolution=32", "data.hflip=false",
            "data.cache_latents=true", f"run.output_dir={output_dir}", f"run.max_steps={self.dpo_steps}",
            f"run.batch_size={self.batch_size}", "run.checkpoint_every=0", "run.keep_last=1", f"optim.lr={self.lr}",
            "optim.lr_scheduler=constant", f"lora.rank={self.rank}", f"loss.beta={self.beta}",
            f"loss.noise_range=[{self.noise_range[0]},{self.noise_range[1]}]",
        ]


def run_toy_demo(out: Path, settings: ToyDemoSettings | None = None) -> int:
    from imgalign.config import load_config
    from imgalign.eval.toy_bench import generate_and_score, load_pipeline
    from imgalign.recipes import diffusion_dpo
    from imgalign.toy.pairs import generate_toy_pairs
    from imgalign.toy.prompts import PROMPT_DIR, load_prompts

    st = settings or ToyDemoSettings()
    start = time.time()
    train_prompts = load_prompts(PROMPT_DIR / "train.txt")
    test_prompts = load_prompts(PROMPT_DIR / "test.txt")[:st.eval_prompts]
    sampling = dict(num_inference_steps=st.sampler_steps, guidance_scale=st.cfg)
    print(f"[demo] 1/4 sampling {st.pairs} toy preference pairs ({st.images_per_pair} images each) from "
          f"{st.pipeline} and labelling them with the toy evaluator", flush=True)
    stats = generate_toy_pairs(st.pipeline, train_prompts, out / "pairs_train.parquet", n_pairs=st.pairs, seed=1,
                               images_per_prompt=st.images_per_pair, **sampling)
    print(f"[demo] {stats['n_pairs']} pairs, {stats['n_ties']} ties (dropped), {stats['seconds']:.0f} s", flush=True)

    def bench(lora=None):
        return generate_and_score(load_pipeline(st.pipeline, lora), test_prompts, st.eval_images_per_prompt,
                                  seed=7, **sampling)

    n_eval = len(test_prompts) * st.eval_images_per_prompt
    print(f"[demo] 2/4 sampling and scoring {n_eval} held-out test images with the base model (before)", flush=True)
    before = bench()
    val_prompts = load_prompts(PROMPT_DIR / "validation.txt")[:st.validation_prompts]
    (out / "val_prompts.txt").write_text("\n".join(val_prompts) + "\n")
    cfg = load_config(diffusion_dpo.Config, None, [
        *st.dpo_overrides(out / "pairs_train.parquet", out / "dpo"),
        f"validation.every={max(st.dpo_steps // 4, 1)}", f"validation.prompts_file={out / 'val_prompts.txt'}",
        "validation.images_per_prompt=1", "validation.reward=toy_preference", f"validation.num_inference_steps={st.sampler_steps}",
        f"validation.guidance_scale={st.cfg}",
    ])
    print(f"[demo] 3/4 training Diffusion-DPO (LoRA) for {st.dpo_steps} steps, validating every "
          f"{max(st.dpo_steps // 4, 1)}", flush=True)
    result = diffusion_dpo.train(cfg)
    print(f"[demo] 4/4 sampling and scoring {n_eval} held-out test images with the DPO LoRA (after)", flush=True)
    after = bench(out / "dpo")
    total = time.time() - start

    change = {name: bootstrap_ci(after.values(name) - before.values(name)) for name in ("preference", "score", "taste", "watermark")}
    lines = ["", "== imgalign demo: Diffusion-DPO on the toy world ==",
             f"base model {st.pipeline}; {stats['n_pairs'] - stats['n_ties']} evaluator-labelled pairs "
             f"(best vs worst of {st.images_per_pair}; sampled in {stats['seconds']:.0f} s); {result['steps']} DPO "
             f"steps in {result['seconds']:.0f} s; whole demo {total / 60:.1f} min",
             f"held-out test prompts: {len(test_prompts)} x {st.eval_images_per_prompt} images, same seeds before and "
             f"after, {st.sampler_steps} steps, CFG {st.cfg}",
             f"{'criterion':<12}{'before':>24}{'after':>24}"]
    for name, (m, lo, hi, _) in before.summary.items():
        m2, lo2, hi2, _ = after.summary[name]
        lines.append(f"{name:<12}{f'{m:.3f} [{lo:.3f}, {hi:.3f}]':>24}{f'{m2:.3f} [{lo2:.3f}, {hi2:.3f}]':>24}")
    for name, label in (("preference", "toy preference score (the labels' target)"), ("score", "fidelity score"),
                        ("taste", "taste (white where no background is asked)"),
                        ("watermark", "watermark band coverage (lower is better)")):
        m, lo, hi = change[name][:3]
        lines.append(f"change in {label}: {m:+.3f}  [95% CI {lo:+.3f}, {hi:+.3f}]  (paired bootstrap)")
    lines.append(f"outputs: {out / 'before_after.png'}, {out / 'training_curves.png'}, {out / 'dpo'}")
    print("\n".join(lines))
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    _before_after(before, after, min(16, len(before.images)), out / "before_after.png")
    _plot_toy(result["history"], result["validation"], out / "training_curves.png")
    return 0


def run_demo(args) -> int:
    from imgalign.config import load_config
    from imgalign.data import PairTransform, collate_pairs, load_preference_pairs, write_preference_parquet
    from imgalign.models.adapters import load_adapter
    from imgalign.models.tiny import save_tiny_pipeline
    from imgalign.recipes import diffusion_dpo

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = getattr(args, "model", None)
    if model and args.tiny:
        raise ConfigError("imgalign demo: --model and --tiny exclude each other; pass one")
    if model and not (Path(model) / "model_index.json").is_file():
        raise ConfigError(f"imgalign demo --model {model}: no model_index.json there; pass a diffusers pipeline folder "
                          "such as assets/toy/sd3")
    if model or ((TOY_PIPELINE / "model_index.json").is_file() and not args.tiny):
        settings = {"dpo_steps": args.steps} if args.steps else {}
        return run_toy_demo(out, ToyDemoSettings(**settings, **({"pipeline": model} if model else {})))
    steps = args.steps or 150
    print(f"[demo] building a tiny SD pipeline and toy preference pairs in {out}", flush=True)
    base = save_tiny_pipeline("sd15", out / "base_pipeline", seed=0)
    write_preference_parquet(out / "pairs_train.parquet", _toy_pairs(256, seed=1, desc="training pairs"))
    write_preference_parquet(out / "pairs_heldout.parquet", _toy_pairs(128, seed=2, desc="held-out pairs"))

    heldout = load_preference_pairs(out / "pairs_heldout.parquet")
    transform = PairTransform(32, hflip=False)
    batches = [collate_pairs([transform(heldout[j], index=j) for j in range(i, min(i + 16, len(heldout)))])
               for i in range(0, len(heldout), 16)]

    def margins(lora_dir=None):
        from tqdm.auto import tqdm

        adapter = load_adapter(str(base))
        if lora_dir:
            adapter.pipe.load_lora_weights(str(lora_dir))
        bar = tqdm(batches, desc=f"held-out margins ({'after' if lora_dir else 'before'})", unit="batch")
        return pair_error_margins(adapter, adapter.denoiser, bar, n_draws=8, seed=3).numpy()

    before = margins()
    cfg = load_config(diffusion_dpo.Config, None, [
        f"model.pretrained={base}", f"data.source={out / 'pairs_train.parquet'}", "data.resolution=32",
        "data.hflip=false", f"run.output_dir={out / 'dpo'}", f"run.max_steps={steps}", "run.batch_size=8",
        "run.checkpoint_every=50", "run.keep_last=1", "optim.lr=1e-3", "optim.lr_scheduler=constant",
        "lora.rank=8", "loss.beta=5000", "validation.every=50", "validation.num_inference_steps=10",
        "validation.prompts=[a red circle,a blue square,two green triangles]",
    ])
    result = diffusion_dpo.train(cfg)
    after = margins(out / "dpo")

    acc_b, acc_a = (before > 0).astype(float), (after > 0).astype(float)
    b = bootstrap_ci(acc_b)
    a = bootstrap_ci(acc_a)
    d = bootstrap_ci(acc_a - acc_b)
    _plot(result["history"], out / "training_curves.png")
    lines = [
        "",
        "== imgalign demo: Diffusion-DPO on toy preference pairs ==",
        f"held-out pairs: {len(acc_b)}; metric: fraction where the model finds the winner more likely",
        f"  before: {b[0]:.3f}  [95% CI {b[1]:.3f}, {b[2]:.3f}]",
        f"  after:  {a[0]:.3f}  [95% CI {a[1]:.3f}, {a[2]:.3f}]",
        f"  change: {d[0]:+.3f}  [95% CI {d[1]:+.3f}, {d[2]:+.3f}]  (paired bootstrap)",
        f"training: {result['steps']} steps in {result['seconds']:.0f} s; curves: {out / 'training_curves.png'}",
        f"validation grids: {out / 'dpo' / 'validation'}; LoRA: {out / 'dpo' / 'pytorch_lora_weights.safetensors'}",
    ]
    print("\n".join(lines))
    (out / "report.txt").write_text("\n".join(lines) + "\n")
    torch.save({"before": before, "after": after}, out / "margins.pt")
    return 0
