"""Evaluate a pipeline (plus optional LoRA) on the toy prompt set; print per-criterion scores with intervals.

    python scripts/bench_toy.py --pipeline assets/toy/sd --split test
    python scripts/bench_toy.py --pipeline assets/toy/sd --lora outputs/demo/dpo --split test
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="assets/toy/sd", help="pipeline folder or hub id")
    ap.add_argument("--lora", help="folder with pytorch_lora_weights.safetensors")
    ap.add_argument("--split", default="test", help="toy prompt split (train, validation, test) or a prompt file")
    ap.add_argument("--images-per-prompt", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, help="use the first N prompts")
    ap.add_argument("--out", help="write summary JSON and an image grid here")
    args = ap.parse_args()

    from imgalign.data import load_prompt_file
    from imgalign.eval.toy_bench import generate_and_score, load_pipeline
    from imgalign.toy.prompts import PROMPT_DIR

    path = Path(args.split) if Path(args.split).exists() else PROMPT_DIR / f"{args.split}.txt"
    prompts = load_prompt_file(path)[: args.limit]
    result = generate_and_score(load_pipeline(args.pipeline, args.lora), prompts, args.images_per_prompt,
                                args.steps, args.guidance_scale, args.seed)
    print(f"toy benchmark: {args.pipeline}" + (f" + {args.lora}" if args.lora else "") +
          f", {path.name}, {len(result.per_image)} images, {args.steps} steps, CFG {args.guidance_scale}")
    print(result.table())
    if args.out:
        from imgalign.train.setup import image_grid

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "toy_bench.json").write_text(json.dumps({k: list(v) for k, v in result.summary.items()}, indent=2))
        image_grid(result.images[:64] * 2 - 1, nrow=8).save(out / "toy_bench_grid.png")


if __name__ == "__main__":
    main()
