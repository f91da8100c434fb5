"""Benchmarks of RLG / NPO guidance: speed against plain CFG, and toy-world evidence.

    # speed: seconds per pipeline call, ratio to plain CFG (toy SD model if built, else a tiny SD1.5)
    .venv/bin/python scripts/bench_guidance.py speed --steps 20 --batch 8 --repeats 5

    # toy evidence: the demo's Diffusion-DPO LoRA (rater-labelled self-sampled pairs) = the aligned model; RLG
    # sweep over w; then Self-NPO (full fine-tuning, l2 loss) + NPO guidance vs plain CFG. Toy scores with
    # bootstrap 95% CIs and paired differences on the same prompts and seeds.
    .venv/bin/python scripts/bench_guidance.py toy --prompts 200 --npo-steps 60
    # the demo's LoRA as the aligned model, 2 images per prompt, seed 11 (README numbers)
    .venv/bin/python scripts/bench_guidance.py toy --aligned outputs/demo/dpo --weights 0 0.5 1 1.5 2 \
        --images-per-prompt 2 --seed 11 --npo-steps 60 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgalign.guidance import NPOGuidance, RLGuidance, apply_guidance  # noqa: E402
from imgalign.models.adapters import load_adapter  # noqa: E402

TOY_SD = ROOT / "assets" / "toy" / "sd"


def _model_path(arg: str | None) -> str:
    if arg:
        return arg
    if (TOY_SD / "model_index.json").is_file():
        return str(TOY_SD)
    from imgalign.models.tiny import save_tiny_pipeline

    return str(save_tiny_pipeline("sd15", Path(tempfile.mkdtemp()) / "sd15"))


# ------------------------------------------------------------------------------------------------
def speed(args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = _model_path(args.model)
    adapter = load_adapter(path)
    pipe, net = adapter.pipe, adapter.denoiser
    net.requires_grad_(False).eval()
    adapter.add_lora(rank=args.rank)
    net.requires_grad_(False)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    aligned_net = copy.deepcopy(net)  # the aligned model as a second full network (fused copy)
    aligned_net.fuse_lora()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = ["a red circle above a blue square"] * args.batch
    kw = dict(prompt=prompts, num_inference_steps=args.steps, guidance_scale=5.0, height=size, width=size,
              output_type="latent")

    def run_once(guidance, lora_on: bool, seed: int) -> tuple[float, float]:
        if not lora_on:
            net.disable_adapters()
        w0, c0 = time.perf_counter(), time.process_time()
        gen = torch.Generator().manual_seed(seed)
        if guidance is None:
            pipe(generator=gen, **kw)
        else:
            with apply_guidance(pipe, guidance):
                pipe(generator=gen, **kw)
        net.enable_adapters()
        return time.perf_counter() - w0, time.process_time() - c0

    cases = {
        "plain CFG (base, 2 evals/step)": (None, False),
        "plain CFG, LoRA on (aligned alone)": (None, True),
        "RLG w=1.5, LoRA, one mixed-adapter batch": (RLGuidance(weight=1.5, aligned="default", batched=True), True),
        "RLG w=1.5, LoRA, 2 forwards (reference: 4 evals)": (RLGuidance(weight=1.5, aligned="default"), True),
        "RLG w=1.5, LoRA, shared uncond (3 evals, approx.)": (RLGuidance(weight=1.5, aligned="default", shared_uncond=True), True),
        "RLG w=1.5, LoRA, aligned alone first half of steps": (RLGuidance(weight=1.5, aligned="default", zero_init_steps=args.steps // 2), True),
        "RLG w=1.5, two full networks": (RLGuidance(weight=1.5, aligned=aligned_net), False),
        "RLG w=1.5, two full networks, shared uncond (approx.)": (RLGuidance(weight=1.5, aligned=aligned_net, shared_uncond=True), False),
        "RLG w=1.5, two full networks, aligned alone 1st half": (RLGuidance(weight=1.5, aligned=aligned_net, zero_init_steps=args.steps // 2), False),
        "NPO, LoRA negative, one mixed-adapter batch": (NPOGuidance(negative="default", batched=True), True),
        "NPO, LoRA negative, 2 forwards": (NPOGuidance(negative="default"), True),
        "NPO, two full networks": (NPOGuidance(negative=aligned_net), False),
    }
    # rounds over all cases (interleaved, so load changes on a shared machine hit every case alike);
    # round 0 warms up; medians of wall time and of this process's CPU time
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for r in range(args.repeats + 1):
            for name, (g, lora_on) in cases.items():
                w, c = run_once(g, lora_on, r)
                if r:
                    wall[name].append(w)
                    cpu[name].append(c)
    ref = "plain CFG (base, 2 evals/step)"
    rw, rc = statistics.median(wall[ref]), statistics.median(cpu[ref])
    print(f"model {path}  batch {args.batch} x {size}px  {args.steps} steps  LoRA r={args.rank}  "
          f"torch threads {torch.get_num_threads()}  (median of {args.repeats} interleaved rounds)")
    print(f"  {'case':<56}{'wall s':>8}{'ratio':>7}{'cpu s':>8}{'ratio':>7}")
    out = {}
    for name in cases:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(f"  {name:<56}{w:8.3f}{w / rw:7.2f}{c:8.3f}{c / rc:7.2f}")
        out[name] = {"wall_s": w, "wall_ratio": w / rw, "cpu_s": c, "cpu_ratio": c / rc}
    return out


# ------------------------------------------------------------------------------------------------
def _score(pipe, prompts, args, guidance=None):
    from imgalign.eval.toy_bench import generate_and_score

    with apply_guidance(pipe, guidance) if guidance is not None else contextlib.nullcontext():
        return generate_and_score(pipe, prompts, args.images_per_prompt, num_inference_steps=args.steps,
                                  guidance_scale=args.cfg, seed=args.seed, progress=False)


def _fmt(mean_lo_hi, sign: str = "") -> str:
    """mean [lo, hi]; sign="+" for changes."""
    m, lo, hi = mean_lo_hi[:3]
    return f"{m:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


# what the RLG sweep and the NPO comparison report: the toy rater's preference, its fidelity part (the toy score),
# its taste and the watermark band's coverage (lower is better)
SWEEP_METRICS = ("preference", "score", "taste", "watermark")


def toy(args) -> dict:
    from bench_pref_grpo import saturation  # the hackable bonus of the Pref-GRPO toy benchmark (same folder)

    from imgalign.config import load_config
    from imgalign.demo import ToyDemoSettings
    from imgalign.eval.preference import bootstrap_ci
    from imgalign.recipes import diffusion_dpo, self_npo
    from imgalign.toy.pairs import generate_toy_pairs
    from imgalign.toy.prompts import PROMPT_DIR, load_prompts

    model = _model_path(args.model)
    if not (Path(model) / "model_index.json").is_file() or "toy" not in model:
        print("toy benchmark needs a trained toy model (assets/toy/sd or assets/toy/sd3); build it first", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_prompts = load_prompts(PROMPT_DIR / "train.txt")
    test_prompts = load_prompts(PROMPT_DIR / "test.txt")[: args.prompts]
    report: dict = {"model": model, "test_prompts": len(test_prompts), "steps": args.steps, "cfg": args.cfg}
    t0 = time.time()

    if args.weights:  # an empty --weights skips the RLG sweep
        # 1. the aligned model: a quick Diffusion-DPO LoRA on evaluator-labelled self-sampled pairs
        dpo_dir = Path(args.aligned) if args.aligned else out / "dpo"
        if args.aligned and not (dpo_dir / "pytorch_lora_weights.safetensors").is_file():
            sys.exit(f"--aligned {dpo_dir}: no pytorch_lora_weights.safetensors there; pass a LoRA output folder "
                     "(e.g. outputs/demo/dpo) or leave --aligned out to train a quick Diffusion-DPO LoRA")
        if not (dpo_dir / "pytorch_lora_weights.safetensors").is_file():  # the demo's Diffusion-DPO recipe
            demo = ToyDemoSettings(pipeline=model, dpo_steps=args.dpo_steps)
            stats = generate_toy_pairs(model, train_prompts, out / "pairs.parquet", n_pairs=args.pairs, seed=1,
                                       num_inference_steps=demo.sampler_steps, guidance_scale=demo.cfg)  # rater labels
            print(f"[toy] {stats['n_pairs']} pairs ({stats['n_ties']} ties) in {stats['seconds']} s", flush=True)
            cfg = load_config(diffusion_dpo.Config, None, [
                *demo.dpo_overrides(out / "pairs.parquet", dpo_dir), "run.progress=false", "run.log_with=none",
                "validation.num_inference_steps=2", "validation.images_per_prompt=1",
            ])
            diffusion_dpo.train(cfg)
        print(f"[toy] aligned LoRA ready ({time.time() - t0:.0f} s)", flush=True)

        adapter = load_adapter(model)
        pipe = adapter.pipe
        pipe.load_lora_weights(str(dpo_dir), adapter_name="aligned")
        sweep = {}
        for w in args.weights:
            res = _score(pipe, test_prompts, args, RLGuidance(weight=w, aligned="aligned"))
            sweep[w] = res
            print(f"[toy] RLG w={w:<4} " + "  ".join(f"{m} {_fmt(res.summary[m])}" for m in SWEEP_METRICS)
                  + f"  saturation {float(saturation(res.images).mean()):.3f}  ({time.time() - t0:.0f} s)", flush=True)
        first = sweep[args.weights[0]]
        report["rlg"] = {str(w): {**{m: r.summary[m][:3] for m in SWEEP_METRICS},
                                  **{f"{m}_paired_diff_vs_first": bootstrap_ci(r.values(m) - first.values(m))
                                     for m in SWEEP_METRICS},
                                  "saturation": float(saturation(r.images).mean())}
                         for w, r in sweep.items()}

    # 2. Self-NPO negative model (full fine-tuning from the model's own samples) + NPO guidance vs plain CFG
    if args.npo_steps > 0:
        npo_dir = out / "self_npo"
        base = load_adapter(model)
        sub = base.denoiser_name  # where Self-NPO saves the negative: unet/ or transformer/
        if not (npo_dir / sub).is_dir():
            cfg = load_config(self_npo.Config, None, [
                f"model.pretrained={model}", f"data.prompts_file={PROMPT_DIR / 'train.txt'}",
                f"data.num_samples={args.npo_samples}", f"data.sample_steps={args.steps}", "data.resolution=32",
                f"data.sample_guidance={args.cfg}", f"run.output_dir={npo_dir}", f"run.max_steps={args.npo_steps}",
                "run.batch_size=16", "run.checkpoint_every=0", "run.progress=false", "run.log_with=none",
                f"optim.lr={args.npo_lr}", "optim.lr_scheduler=constant", f"npo.teacher_guidance={args.npo_w}",
                "npo.loss=l2",  # the reference's pseudo-Huber loses to CFG here (README); --npo-set npo.loss=huber
                "validation.num_inference_steps=2", "validation.images_per_prompt=1", *args.npo_set,
            ])
            self_npo.train(cfg)
        neg = type(base.denoiser).from_pretrained(str(npo_dir), subfolder=sub).eval()
        plain = _score(base.pipe, test_prompts, args)
        guided = _score(base.pipe, test_prompts, args, NPOGuidance(negative=neg))
        report["npo"] = {m: {"plain": plain.summary[m][:3], "npo": guided.summary[m][:3],
                             "paired_diff": bootstrap_ci(guided.values(m) - plain.values(m))} for m in SWEEP_METRICS}
        print(f"[toy] plain CFG {args.cfg} vs NPO (Self-NPO negative), paired change:", flush=True)
        for m, r in report["npo"].items():
            print(f"  {m:<11} {_fmt(r['plain'])} -> {_fmt(r['npo'])}  {_fmt(r['paired_diff'], '+')}", flush=True)

    if "rlg" in report:
        print(f"\n== RLG sweep (aligned = {dpo_dir}): mean [95% CI] and paired change vs w={args.weights[0]} ==")
        print(f"  {'w':<6}" + "".join(f"{m:<48}" for m in SWEEP_METRICS) + "saturation")
        for w, r in report["rlg"].items():
            cells = [f"{_fmt(r[m])} {_fmt(r[f'{m}_paired_diff_vs_first'], '+')}" for m in SWEEP_METRICS]
            print(f"  {w:<6}" + "".join(f"{c:<48}" for c in cells) + f"{r['saturation']:.3f}")
    report["seconds"] = round(time.time() - t0)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--model", default=None)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--threads", type=int, default=1, help="torch threads (1: stable CPU-time ratios on a shared box)")
    s.add_argument("--json", default=None)
    t = sub.add_parser("toy")
    t.add_argument("--model", default=None)
    t.add_argument("--out", default="outputs/bench_guidance")
    t.add_argument("--aligned", default=None, help="an aligned LoRA folder (e.g. the demo's outputs/demo/dpo); "
                   "default: train one with the demo's Diffusion-DPO settings")
    t.add_argument("--pairs", type=int, default=512)
    t.add_argument("--dpo-steps", type=int, default=250)
    t.add_argument("--prompts", type=int, default=200)
    t.add_argument("--images-per-prompt", type=int, default=1)
    t.add_argument("--seed", type=int, default=7, help="sampling seed of every evaluation (same for all w)")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--cfg", type=float, default=5.0)
    t.add_argument("--weights", type=float, nargs="*", default=[0.0, 0.5, 1.0, 1.5, 2.0],
                   help="RLG weights to sweep (none: skip the sweep)")
    t.add_argument("--npo-steps", type=int, default=60)
    t.add_argument("--npo-samples", type=int, default=128)
    t.add_argument("--npo-lr", type=float, default=1e-5)
    t.add_argument("--npo-w", type=float, default=-1.0, help="Self-NPO teacher guidance (npo.teacher_guidance)")
    t.add_argument("--npo-set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more Self-NPO config overrides, e.g. npo.loss=huber run.seed=12")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    t.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.cmd == "toy" and args.threads:
        torch.set_num_threads(args.threads)
    result = speed(args) if args.cmd == "speed" else toy(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
