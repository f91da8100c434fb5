"""RPO on the toy world: per toy subject, the base toy SD, DreamBooth-style fine-tuning (reconstruction only) and RPO
with the same steps, batch and LoRA, evaluated on the subject's 15 held-out prompts (assets/toy/subjects/dataset/
prompts_and_classes.txt; none is among RPO's 8 training prompts in configs/rpo/toy.yaml) at 4 images per prompt, the
same seeds for every model, by
  - the exact subject checks (imgalign.toy.subject_check): subject fidelity (is the subject's pattern drawn: the toy
    DINO), prompt fidelity (does the image satisfy the rest of the prompt: the toy CLIP-T), and both at once
  - the DreamBench evaluator (`imgalign.eval.dreambench`) with the toy CLIP: CLIP-I and CLIP-T (no DINO offline)
with paired bootstrap 95 % intervals over the (subject, prompt) units against the base and RPO minus DreamBooth.
RPO's claim is the trade-off: subject fidelity near DreamBooth's with better prompt fidelity.

    python scripts/bench_rpo.py --subjects checker_square ringed_circle two_tone_triangle --steps 1500 --out outputs/rpo_bench

Runs are kept in --out: a rerun reuses finished trainings and images (delete a folder to redo it). --set KEY=VALUE
passes overrides to both trainings (e.g. --set optim.lr=1e-3). RPO is evaluated with its selected weights (best/)
and its final weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("fidelity", "detected", "prompt_fidelity", "prompt_passed", "both", "clip_i", "clip_t")


def train_runs(subject: str, args) -> dict[str, dict]:
    """DreamBooth-style and RPO LoRAs for one subject (skipped when already trained) -> {method: {dir, seconds}}."""
    from imgalign.config import load_config
    from imgalign.recipes import rpo
    from imgalign.toy.subjects import SUBJECT_DIR

    runs = {}
    for method, objective in (("dreambooth", "reconstruction"), ("rpo", "rpo")):
        out = Path(args.out) / subject / method
        info = out / "bench_run.json"
        if not info.is_file():
            cfg = load_config(rpo.Config, ROOT / "configs" / "rpo" / "toy.yaml", [
                f"data.subject_dir={SUBJECT_DIR / subject}", f"run.output_dir={out}", f"run.max_steps={args.steps}",
                f"rpo.objective={objective}", f"rpo.negatives_dir={Path(args.out) / subject / 'negatives'}",
                "run.progress=false", f"run.seed={args.seed}", *args.set])
            result = rpo.train(cfg)
            best = json.loads((out / "best" / "best.json").read_text()) if (out / "best").is_dir() else None
            info.write_text(json.dumps({"seconds": result["seconds"], "steps": result["steps"], "best": best,
                                        "validation": result["validation"]}, indent=1) + "\n")
        runs[method] = {"dir": out, **json.loads(info.read_text())}
    return runs


def evaluate(model: str, loras: dict[str, Path] | None, subjects: list[str], args) -> list[dict]:
    """Images of every subject's held-out prompts with one model, scored -> one row per (subject, prompt)."""
    import numpy as np

    from imgalign.data.images import read_image
    from imgalign.eval import dreambench as db
    from imgalign.models.adapters import load_adapter
    from imgalign.toy.subject_check import evaluate_subject_batch
    from imgalign.toy.subjects import SUBJECT_DIR

    bench = db.load_dreambench(SUBJECT_DIR, subjects=subjects)
    images = Path(args.out) / "images" / model
    adapter = load_adapter(str(ROOT / "assets" / "toy" / "sd"))
    db.generate_images(adapter.pipe, bench, images, images_per_prompt=args.images_per_prompt, seed=args.eval_seed,
                       num_inference_steps=args.sample_steps, guidance_scale=args.guidance, size=32, loras=loras,
                       progress=False)
    paths = db.check_generated(bench, images, args.images_per_prompt)
    clip = db.score_dreambench(bench, images, db.load_backbones("none", "toy"), images_per_prompt=args.images_per_prompt,
                               paths=paths, progress=False)["prompts"]
    rows = []
    for subject in bench.subjects:
        prompts = bench.prompts(subject)
        k = args.images_per_prompt
        checks = evaluate_subject_batch([read_image(p) for p in paths[subject.name]],
                                        [p for p in prompts for _ in range(k)], subject.name).per_image
        for i, prompt in enumerate(prompts):
            mine = checks[i * k:(i + 1) * k]
            scored = next(r for r in clip if r["subject"] == subject.name and r["prompt_index"] == i)
            rows.append({"subject": subject.name, "prompt": prompt,
                         "fidelity": float(np.mean([c.fidelity.score for c in mine])),
                         "detected": float(np.mean([c.fidelity.detected for c in mine])),
                         "prompt_fidelity": float(np.mean([c.prompt.score for c in mine])),
                         "prompt_passed": float(np.mean([c.prompt.passed for c in mine])),
                         "both": float(np.mean([c.fidelity.detected and c.prompt.passed for c in mine])),
                         "clip_i": scored["clip_i"], "clip_t": scored["clip_t"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", nargs="+", default=["checker_square", "ringed_circle", "two_tone_triangle"],
                    help="toy subjects (the toy VAE keeps these three patterns; it loses striped_square's stripes and "
                         "most of cross_circle's plus)")
    ap.add_argument("--steps", type=int, default=1500, help="optimizer steps of each training (batch, lr, LoRA: the config)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both trainings")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--images-per-prompt", type=int, default=4)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--eval-seed", type=int, default=7)
    ap.add_argument("--out", default="outputs/rpo_bench")
    args = ap.parse_args()

    import numpy as np

    from imgalign.eval.preference import bootstrap_ci

    runs = {s: train_runs(s, args) for s in args.subjects}
    models = {"base": None,
              "dreambooth": {s: runs[s]["dreambooth"]["dir"] for s in args.subjects},
              "rpo_best": {s: runs[s]["rpo"]["dir"] / "best" for s in args.subjects},
              "rpo_final": {s: runs[s]["rpo"]["dir"] for s in args.subjects}}
    rows = {name: evaluate(name, loras, args.subjects, args) for name, loras in models.items()}

    def values(model, metric):
        return np.array([r[metric] for r in rows[model]])

    lines = [f"RPO on the toy SD: {len(args.subjects)} subjects x 15 held-out prompts x {args.images_per_prompt} "
             f"images ({args.sample_steps} steps, CFG {args.guidance:g}, seed {args.eval_seed}); {args.steps} training "
             "steps each; paired bootstrap 95 % over (subject, prompt) units", ""]
    lines.append("| model | " + " | ".join(METRICS) + " |")
    lines.append("|---" * (len(METRICS) + 1) + "|")
    lines.append("| base | " + " | ".join(f"{values('base', m).mean():.3f}" for m in METRICS) + " |")
    summary = {"settings": vars(args), "runs": {s: {k: {"seconds": v["seconds"], "best": v["best"]}
                                                    for k, v in r.items()} for s, r in runs.items()}, "models": {}}
    comparisons = [(m, "base") for m in ("dreambooth", "rpo_best", "rpo_final")] + [("rpo_best", "dreambooth"),
                                                                                      ("rpo_final", "dreambooth")]
    for a, b in comparisons:
        cells, entry = [], {}
        for m in METRICS:
            mean, lo, hi = bootstrap_ci(values(a, m) - values(b, m))[:3]
            entry[m] = {"mean": float(values(a, m).mean()), "change": mean, "ci95": [lo, hi]}
            cells.append(f"{values(a, m).mean():.3f} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        summary["models"][f"{a} - {b}"] = entry
        lines.append(f"| {a} (- {b}) | " + " | ".join(cells) + " |")
    lines.append("")
    for s in args.subjects:
        lines.append(f"{s}: " + "; ".join(
            f"{name} fidelity {np.mean([r['fidelity'] for r in rows[name] if r['subject'] == s]):.3f} prompt "
            f"{np.mean([r['prompt_fidelity'] for r in rows[name] if r['subject'] == s]):.3f}" for name in rows))
    seconds = {k: sum(runs[s][k]["seconds"] for s in args.subjects) for k in ("dreambooth", "rpo")}
    lines.append(f"training wall seconds (all subjects): dreambooth {seconds['dreambooth']:.0f}, rpo "
                 f"{seconds['rpo']:.0f}; RPO's selected steps: "
                 + ", ".join(f"{s} {runs[s]['rpo']['best']['step'] if runs[s]['rpo']['best'] else '-'}"
                             for s in args.subjects))
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    (out / "summary.txt").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps({**summary, "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
