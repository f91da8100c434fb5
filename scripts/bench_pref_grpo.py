"""Benchmarks of the pref-grpo recipe: rollout cost, and toy evidence that Pref-GRPO resists reward hacking.

    # (1) cost: a rollout that records log-probabilities vs a plain pipeline call at the same steps (goal <= 1.05x)
    python scripts/bench_pref_grpo.py cost --family sd15 --steps 10 --batch 4
    python scripts/bench_pref_grpo.py cost --model assets/toy/sd3 --resolution 32

    # (2) toy evidence: Pref-GRPO (the toy rater as the pairwise judge, win rates) vs pointwise GRPO on a hackable
    #     reward (the rater's score + a bonus for saturated colour); both judged on held-out test prompts by the
    #     rater's preference score, its fidelity part, its taste part, saturation and the watermark (--judge toy:
    #     fidelity only). A run whose LoRA is already in --out is evaluated again, not retrained.
    python scripts/bench_pref_grpo.py toy --iterations 80 --groups 8 --group-size 4 --lr 1e-3 --eval-prompts 200 \
        --out outputs/pg     # README numbers (the toy SD, configs/pref_grpo/toy.yaml: DDIM eta 1 rollouts)

Numbers are printed with 95 % confidence intervals (paired over test prompts, same seeds for every model).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# (1) cost
# ------------------------------------------------------------------------------------------------
def bench_cost(args) -> dict:
    from imgalign.models.adapters import load_adapter
    from imgalign.recipes.pref_grpo import SampleConfig
    from imgalign.sampling.rollout import make_sampler, rollout

    model = args.model
    if model is None:
        from imgalign.models.tiny import save_tiny_pipeline

        model = str(save_tiny_pipeline(args.family, Path(tempfile.mkdtemp()) / args.family))
    adapter = load_adapter(model)
    adapter.denoiser.eval()
    # FLUX's pipeline has no CFG branch (its guidance is an embedding): the rollout then samples without CFG too
    # (sample.guidance_scale=1, as configs/pref_grpo/flux.yaml), at the adapter's embedded guidance
    flux = adapter.family == "flux"
    pipe_guidance = adapter.flux_guidance if flux else args.guidance
    sample = SampleConfig(num_steps=args.steps, guidance_scale=1.0 if flux else args.guidance,
                          resolution=args.resolution, batch_size=args.batch)
    sampler = make_sampler(adapter, sample)
    prompts = ["a red circle above a blue square on a white background"] * args.batch

    # the same work on both sides: the rollout encodes prompts with the adapter's T5 length (SD3/FLUX), so the
    # pipeline call gets the same max_sequence_length (its default, 256, would encode twice the tokens)
    extra = {"max_sequence_length": adapter.max_sequence_length} if adapter.is_flow else {}

    def plain():
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            adapter.pipe(prompt=prompts, num_inference_steps=args.steps, guidance_scale=pipe_guidance,
                         height=args.resolution, width=args.resolution, generator=gen, output_type="pt", **extra)

    def with_logprobs():
        rollout(adapter, adapter.denoiser, sampler, prompts, list(range(args.batch)), sample, torch.float32)

    for fn in (plain, with_logprobs):  # warm-up
        fn()
    times = {"plain": [], "rollout": []}
    # CPU time of this process (wall clock on a shared machine measures the neighbours too); interleaved repeats
    clock = time.process_time if adapter.device.type == "cpu" else time.perf_counter
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("rollout", with_logprobs)):
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = sorted(r / p for r, p in zip(times["rollout"], times["plain"]))
    out = {"model": model, "family": adapter.family, "steps": args.steps, "batch": args.batch,
           "resolution": args.resolution, "cfg": args.guidance, "threads": torch.get_num_threads(), "clock": clock.__name__,
           "plain_s": med["plain"], "rollout_s": med["rollout"], "ratio_of_medians": med["rollout"] / med["plain"],
           "ratio_min": ratios[0], "ratio_max": ratios[-1]}
    print(f"[cost] {adapter.family} ({model}), {args.steps} steps, batch {args.batch}, {args.resolution}px, "
          f"CFG {sample.guidance_scale:g}: pipeline {med['plain'] * 1e3:.1f} ms, rollout+log-probs {med['rollout'] * 1e3:.1f} ms"
          f" -> ratio {out['ratio_of_medians']:.3f}x (per-repeat range {ratios[0]:.3f}-{ratios[-1]:.3f}, "
          f"{args.repeats} repeats)")
    return out


# ------------------------------------------------------------------------------------------------
# (2) toy evidence
# ------------------------------------------------------------------------------------------------
def saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation (max - min) / max over pixels of [0, 1] images [B, 3, H, W] -> [B]."""
    hi, lo = images.max(dim=1).values, images.min(dim=1).values
    return ((hi - lo) / hi.clamp(min=1e-3)).mean(dim=(1, 2))


def register_saturation_reward() -> None:
    from imgalign.rewards import Reward, register_reward

    class SaturationBonus(Reward):
        """A hackable bonus: the mean colour saturation (the toy backgrounds are white, black or gray)."""

        name = "saturation"
        needs_prompts = False

        def _score(self, images, prompts, **kwargs):
            if isinstance(images, (list, tuple)):
                images = torch.stack(list(images))
            return saturation(images.float())

    try:
        register_reward("saturation", SaturationBonus)
    except (ValueError, KeyError):
        pass  # already registered


@torch.no_grad()
def evaluate(model_dir: str, lora_dir: str | None, prompts: list[str], args) -> dict:
    """Per image (seed = args.eval_seed + prompt index, pipeline sampling as users do): the toy rater's preference (fidelity +
    taste, scaled by the watermark), fidelity score, taste (NaN where the prompt states a background), saturation
    and the watermark band's coverage."""
    from imgalign.models.adapters import load_adapter
    from imgalign.rewards.images import unit_to_pil
    from imgalign.toy import evaluate as toy_evaluate

    adapter = load_adapter(model_dir)
    if lora_dir:
        adapter.pipe.load_lora_weights(lora_dir)
    values = {name: [] for name in ("preference", "toy", "taste", "saturation", "watermark")}
    for start in range(0, len(prompts), 25):
        chunk = prompts[start:start + 25]
        gens = [torch.Generator().manual_seed(args.eval_seed + start + i) for i in range(len(chunk))]
        images = adapter.pipe(prompt=chunk, num_inference_steps=args.eval_steps, guidance_scale=args.eval_cfg,
                              height=args.resolution, width=args.resolution, generator=gens,
                              output_type="pt").images.float()
        # one evaluation per image, on the same uint8 pixels the toy rewards see
        scores = [toy_evaluate(image, prompt) for image, prompt in zip(unit_to_pil(images), chunk)]
        values["preference"] += [s.preference for s in scores]
        values["toy"] += [s.score for s in scores]
        values["taste"] += [math.nan if s.taste is None else s.taste for s in scores]
        values["saturation"] += saturation(images).tolist()
        values["watermark"] += [s.watermark for s in scores]
    return {name: torch.tensor(v, dtype=torch.float64) for name, v in values.items()}


def mean_ci(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    x = x[~x.isnan()]  # taste: only prompts without a stated background
    return float(x.mean()), float(1.96 * x.std(unbiased=True) / math.sqrt(len(x)))


def train_run(name: str, args, overrides: list[str]) -> tuple[str, list[dict], float]:
    from imgalign.config import load_config
    from imgalign.recipes import pref_grpo

    out = Path(args.out) / name
    record = out / "bench_history.json"
    if (out / "pytorch_lora_weights.safetensors").is_file():  # a finished run in --out: evaluate it again
        print(f"[toy] {name}: reusing the trained LoRA in {out}", flush=True)
        saved = json.loads(record.read_text()) if record.is_file() else {"history": [], "seconds": None}
        return str(out), saved["history"], saved["seconds"]
    cfg = load_config(pref_grpo.Config, ROOT / "configs/pref_grpo/toy.yaml", [
        f"model.pretrained={args.model}", f"run.output_dir={out}",
        f"run.max_steps={args.iterations}", "run.checkpoint_every=0", "run.log_with=none", "run.progress=false",
        f"run.seed={args.seed}", "validation.prompts_file=null", "validation.num_inference_steps=1",
        f"sample.resolution={args.resolution}", f"optim.lr={args.lr}",
        f"sample.groups_per_iteration={args.groups}", f"sample.group_size={args.group_size}",
        f"sample.batch_size={args.group_size}", *overrides, *args.set,
    ])
    t0 = time.time()
    result = pref_grpo.train(cfg)
    seconds = time.time() - t0
    record.write_text(json.dumps({"history": result["history"], "seconds": seconds}, default=float))
    return str(out), result["history"], seconds


def bench_toy(args) -> dict:
    from imgalign.data import load_prompt_file

    register_saturation_reward()
    prompts = load_prompt_file(ROOT / "assets/toy/prompts/test.txt")[: args.eval_prompts]
    judge = args.judge
    runs = {
        # Pref-GRPO: the toy rater judges every pair of a group; its win rate is the reward
        "pref_grpo_toy_judge": ["reward.mode=pairwise", f"reward.rewards=[{judge}]", "advantage.std=group"],
        # Flow-GRPO-style pointwise GRPO on a hackable reward: the rater's score + a bonus for saturated colour
        "pointwise_toy+saturation": ["reward.mode=pointwise", f"reward.rewards=[{judge}:1.0,saturation:{args.bonus}]",
                                     "reward.combine=weight_then_normalize", "advantage.std=global"],
    }
    t0 = time.time()
    base = evaluate(args.model, None, prompts, args)
    results = {"base": {"eval": base, "seconds": time.time() - t0}}
    for name, overrides in runs.items():
        if args.runs and name not in args.runs:
            continue
        lora, history, seconds = train_run(name, args, overrides)
        results[name] = {"eval": evaluate(args.model, lora, prompts, args), "history": history, "seconds": seconds}

    n = len(prompts)
    target = "preference" if judge == "toy_preference" else "toy"
    print(f"\n[toy] {args.model}: {args.iterations} iterations x {args.groups} prompts x {args.group_size} images, "
          f"lr {args.lr:g}, judge {judge}; held-out: {n} test prompts, 1 image each, {args.eval_steps} steps, "
          f"CFG {args.eval_cfg:g}; mean +- 95% CI half-width, paired change vs base in brackets")
    columns = ["preference", "toy", "taste", "saturation", "watermark"]
    print(f"{'model':<26}" + "".join(f"{c if c != 'toy' else 'fidelity':>34}" for c in columns) + f"{'train s':>9}")
    summary = {}
    for name, r in results.items():
        ev, row = r["eval"], {}
        line = f"{name:<26}"
        for c in columns:
            m, ci = mean_ci(ev[c])
            d, dci = mean_ci(ev[c] - base[c])
            row.update({c: m, f"{c}_ci95": ci, f"{c}_delta_vs_base": d, f"{c}_delta_ci95": dci})
            line += f"{m:.3f} +- {ci:.3f} [{d:+.3f} +- {dci:.3f}]".rjust(34)
        summary[name] = {**row, "train_seconds": r.get("seconds")}
        if r.get("history"):
            summary[name]["train_reward_first_last"] = [r["history"][0]["train/reward_mean"],
                                                       r["history"][-1]["train/reward_mean"]]
            # mean training-rollout score of the judge over the first and last quarter of the iterations
            curve = [h.get(f"train/score/{judge}", math.nan) for h in r["history"]]
            q = max(1, len(curve) // 4)
            summary[name]["train_judge_first_last_quarter"] = [statistics.fmean(curve[:q]), statistics.fmean(curve[-q:])]
            summary[name]["train_judge_curve"] = curve
        print(line + f"{(r.get('seconds') or 0):>9.0f}")
    if {"pref_grpo_toy_judge", "pointwise_toy+saturation"} <= set(results):
        a, b = results["pref_grpo_toy_judge"]["eval"][target], results["pointwise_toy+saturation"]["eval"][target]
        d, dci = mean_ci(a - b)
        summary["pref_minus_pointwise"] = {"delta": d, "ci95": dci}
        print(f"Pref-GRPO - pointwise(hackable) on {target}, paired: {d:+.3f} +- {dci:.3f}")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["cost", "toy", "all"])
    p.add_argument("--model", default=None, help="pipeline folder (default: a tiny --family pipeline for cost, "
                   "assets/toy/sd for toy)")
    p.add_argument("--family", default="sd15", help="tiny pipeline family for the cost benchmark without --model")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--guidance", type=float, default=4.5)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--judge", default="toy_preference", choices=["toy_preference", "toy"],
                   help="toy: the rater (toy_preference: fidelity + taste, the toy pairs' labeller; toy: fidelity only)")
    p.add_argument("--bonus", type=float, default=1.0, help="weight of the saturation bonus of the hackable reward")
    p.add_argument("--eval-prompts", type=int, default=100)
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--eval-cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0, help="training seed (run.seed)")
    p.add_argument("--eval-seed", type=int, default=10_000,
                   help="first sampling seed of the held-out evaluation (image i of the test prompts uses "
                        "eval-seed + i); the README's numbers use the default")
    p.add_argument("--runs", nargs="*", default=None, choices=["pref_grpo_toy_judge", "pointwise_toy+saturation"],
                   help="toy: run only these (default: both)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra recipe overrides for both toy runs, e.g. sample.sampler=ddim sample.eta=1.0")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models on a busy CPU)")
    p.add_argument("--out", default=None, help="output folder of the toy runs (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the numbers to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    if args.what in ("cost", "all"):
        results["cost"] = bench_cost(args)
    if args.what in ("toy", "all"):
        args.model = args.model if args.what == "toy" and args.model else str(ROOT / "assets/toy/sd")
        if not (Path(args.model) / "model_index.json").is_file():
            print(f"[toy] no toy model at {args.model}: build it with scripts/build_toy_assets.py; skipping")
        else:
            args.out = args.out or tempfile.mkdtemp(prefix="bench_pref_grpo_")
            results["toy"] = bench_toy(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
