"""Diffusion-DPO beside MaPO and Diffusion-KTO on the toy SD, on the same pairs and held-out protocol as the demo.

Trains each loss with configs/diffusion_dpo/toy.yaml (the demo's recipe: 250 steps, LoRA r 8, cached latents,
loss.noise_range=[0.6,1.0]) on the pairs `make demo` wrote, then samples the 200 held-out test prompts at the
demo's seeds (10 steps, CFG 5, seed 7) and prints each criterion's paired change against the base model with a
bootstrap 95 % interval. A LoRA already in --out/<loss> is evaluated again, not retrained.

    make demo    # writes outputs/demo/pairs_train.parquet (and outputs/demo/dpo, reused with --dpo-lora)
    python scripts/bench_dpo_losses.py --pairs outputs/demo --out outputs/dpo_losses --dpo-lora outputs/demo/dpo
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSES = {  # name -> overrides on configs/diffusion_dpo/toy.yaml (the config's comments say why)
    "dpo": [],
    "mapo": ["loss.loss_type=[mapo]", "loss.beta=0.1"],
    "kto": ["loss.loss_type=[kto]", "loss.beta=250", "run.batch_size=32"],
}
CRITERIA = ("preference", "score", "taste", "watermark")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="outputs/demo", help="folder with pairs_train.parquet (make demo's output)")
    ap.add_argument("--out", default="outputs/dpo_losses")
    ap.add_argument("--losses", nargs="*", default=list(LOSSES), choices=list(LOSSES))
    ap.add_argument("--dpo-lora", help="use this Diffusion-DPO LoRA (e.g. the demo's outputs/demo/dpo) instead of training")
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args()

    import torch

    from imgalign.config import load_config
    from imgalign.eval.toy_bench import changes_table, demo_heldout, paired_changes
    from imgalign.recipes import diffusion_dpo

    torch.set_num_threads(1)
    config = ROOT / "configs" / "diffusion_dpo" / "toy.yaml"
    def bench(lora=None):
        return demo_heldout(lora, args.eval_prompts)

    base = bench()
    report = {}
    for name in args.losses:
        lora = Path(args.dpo_lora) if name == "dpo" and args.dpo_lora else Path(args.out) / name
        seconds = None
        if not (lora / "pytorch_lora_weights.safetensors").is_file():
            cfg = load_config(diffusion_dpo.Config, config, [f"data.source={args.pairs}", f"run.output_dir={lora}",
                                                             "validation.enabled=false", *LOSSES[name]])
            seconds = diffusion_dpo.train(cfg)["seconds"]
        after = bench(str(lora))
        report[name] = {"lora": str(lora), "train_seconds": seconds, **paired_changes(base, after, CRITERIA)}
    print(f"\n[toy] held-out: {args.eval_prompts} test prompts x 1 image, 10 steps, CFG 5, seed 7; paired change vs base "
          "[bootstrap 95 % CI]")
    print(changes_table(base, report, CRITERIA))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
