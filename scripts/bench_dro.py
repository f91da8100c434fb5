"""Diffusion-DRO on the toy SD against SFT on the same experts and Diffusion-DPO, on the demo's held-out protocol.

Experts: the top --top images of the demo's rater-labelled pairs by the toy rater (`imgalign select-experts`, written
to --out/experts with their scores). Each run trains a LoRA r 8 at lr 3e-4 for --steps optimizer steps of 16 items:
  sft  plain denoising on the experts (diffusion-dro, dro.objective=sft): one forward + backward on 16 per step
  dro  Diffusion-DRO (configs/diffusion_dro/toy.yaml): a 2 x 16 forward + backward and a 2 x 16 reference forward
       per step, plus a buffer refresh of 4 trajectories x 10 sampler steps every micro-step
  dpo  Diffusion-DPO on the pairs themselves (configs/diffusion_dpo/toy.yaml): 2 x 16 forward + backward and
       2 x 16 reference forward per step
then samples the 200 held-out test prompts at the demo's seeds (10 steps, CFG 5, seed 7) and prints each criterion's
paired change against the base with a bootstrap 95 % interval, and the training seconds of each run (the compute).

    make demo
    python scripts/bench_dro.py --pairs outputs/demo --top 200 --steps 150 --out outputs/dro_bench
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRITERIA = ("preference", "score", "taste", "watermark")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="outputs/demo", help="folder with pairs_train.parquet (make demo's output)")
    ap.add_argument("--top", type=int, default=200, help="expert images kept by the toy rater")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of every run")
    ap.add_argument("--runs", nargs="*", default=["sft", "dro", "dpo"], choices=["sft", "dro", "dpo"])
    ap.add_argument("--out", default="outputs/dro_bench")
    ap.add_argument("--eval-prompts", type=int, default=200)
    args = ap.parse_args()

    import torch

    from imgalign.config import load_config
    from imgalign.data.experts import select_experts
    from imgalign.eval.toy_bench import changes_table, demo_heldout, paired_changes
    from imgalign.recipes import diffusion_dpo, diffusion_dro

    torch.set_num_threads(1)
    out = Path(args.out)
    experts = out / "experts" / "experts.jsonl"
    if not experts.is_file():
        summary = select_experts(str(Path(args.pairs) / "pairs_train.parquet"), "toy_preference", args.top,
                                 out / "experts")
        print(f"[dro] experts: {summary['kept']} of {summary['images_scored']} images, rater score >= "
              f"{summary['score_last_kept']:.3f} (mean of all {summary['score_mean_all']:.3f})", flush=True)
    common = [f"run.max_steps={args.steps}", "validation.enabled=false", "run.progress=false"]
    recipes = {
        "sft": (diffusion_dro, "diffusion_dro", [f"data.source={experts}", "dro.objective=sft"]),
        "dro": (diffusion_dro, "diffusion_dro", [f"data.source={experts}"]),
        "dpo": (diffusion_dpo, "diffusion_dpo", [f"data.source={args.pairs}"]),
    }
    def bench(lora=None):
        return demo_heldout(lora, args.eval_prompts)

    base = bench()
    report = {}
    for name in args.runs:
        recipe, folder, overrides = recipes[name]
        lora = out / name
        seconds = None
        if not (lora / "pytorch_lora_weights.safetensors").is_file():
            cfg = load_config(recipe.Config, ROOT / "configs" / folder / "toy.yaml",
                              [*overrides, f"run.output_dir={lora}", *common])
            seconds = recipe.train(cfg)["seconds"]
            print(f"[dro] {name}: {args.steps} steps in {seconds:.0f} s", flush=True)
        report[name] = {"train_seconds": seconds, **paired_changes(base, bench(str(lora)), CRITERIA)}
    print(f"\n[toy] experts: top {args.top} by the rater; {args.steps} steps x 16 items, LoRA r 8, lr 3e-4; held-out: "
          f"{args.eval_prompts} test prompts x 1 image, 10 steps, CFG 5, seed 7; paired change vs base [bootstrap 95 % CI]")
    print(changes_table(base, report, CRITERIA))
    print("train seconds: " + ", ".join(f"{k} {v['train_seconds']:.0f}" for k, v in report.items()
                                        if v["train_seconds"] is not None))
    (out / "results.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
