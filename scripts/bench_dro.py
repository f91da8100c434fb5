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

--cost instead times one DRO optimizer step on a tiny pipeline (CPU time, one thread, medians), split into the buffer
refresh against a plain pipeline call sampling the same trajectories, and the update against its floor (a policy
forward + backward and a reference forward over 2B precomputed inputs, as Diffusion-DPO's floor), and counts the
parameters the lagged sampler adds (a LoRA adapter, not a network):

    python scripts/bench_dro.py --cost --family sd15 --batch 4 --sample-steps 20

--memory instead measures the peak resident memory (CPU) of a few training steps of diffusion-dpo and diffusion-dro
with LoRA r 8 on an SD1.5-size pipeline (random weights in SD1.5's architecture: UNet 860M, CLIP ViT-L/14 text tower,
the SD VAE; built once in --memory-dir), each recipe in its own process at 64 px, beside a process that only loads
the pipeline; the ratios show what the lagged sampler (a second adapter) and the replay buffer cost:

    python scripts/bench_dro.py --memory --batch 2 --sample-steps 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRITERIA = ("preference", "score", "taste", "watermark")


def cost(args) -> None:
    import statistics
    import tempfile
    import time
    import types

    import torch

    from imgalign.models.adapters import adapters_disabled, load_adapter, repeat_cond
    from imgalign.models.tiny import save_tiny_pipeline
    from imgalign.recipes import diffusion_dro
    from imgalign.sampling.noise import NoiseLevels
    from imgalign.train.seeding import sample_generators

    torch.set_num_threads(1)
    pipe_dir = save_tiny_pipeline(args.family, Path(tempfile.mkdtemp()) / args.family)
    adapter = load_adapter(str(pipe_dir))
    adapter.freeze_all()
    adapter.add_lora(rank=8)
    base_params = sum(p.numel() for p in adapter.denoiser.parameters())
    lora = diffusion_dro.LoraConfig(rank=8)
    lagged = diffusion_dro.LaggedSampler(adapter, lora, torch.float32)
    extra = sum(p.numel() for p in adapter.lora_parameters("lagged"))
    model = adapter.denoiser
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    levels = NoiseLevels(adapter, 1000)
    cfg = types.SimpleNamespace(dro=diffusion_dro.DROConfig(sample_steps=args.sample_steps))  # what _step reads
    res = 32
    shape = (adapter.vae.config.latent_channels, res // adapter.pipe.vae_scale_factor, res // adapter.pipe.vae_scale_factor)
    prompts = ["a red circle"] * args.batch

    def refresh(i):
        gens = sample_generators(0, "b", i, range(args.batch))
        net, active = lagged.model(model)
        with active:
            return diffusion_dro.policy_trajectories(adapter, net, levels, prompts, gens, cfg.dro, shape)

    def plain(i):
        with torch.no_grad():
            adapter.pipe(prompt=prompts, num_inference_steps=args.sample_steps, guidance_scale=1.0, height=res, width=res,
                         generator=torch.Generator().manual_seed(i), output_type="latent")

    x, k, pred = refresh(0)
    buffer = diffusion_dro.ReplayBuffer(args.batch)
    buffer.add(list(range(args.batch)), prompts, x, k, pred)
    pixels = torch.rand(args.batch, 3, res, res) * 2 - 1

    import contextlib

    class Acc:
        device = torch.device("cpu")

        @staticmethod
        def autocast():
            return contextlib.nullcontext()

    def update(i):
        gens = sample_generators(0, "u", i, range(args.batch))
        loss, _ = diffusion_dro._step(adapter, model, None, levels, buffer.sample(gens), pixels, gens, cfg, Acc)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    cache = diffusion_dro.EncodingCache(adapter, [{"image": None, "caption": p} for p in prompts], None)
    for r in range(args.batch):  # what data.cache_latents stores: each expert's latent distribution, each prompt
        cache.latents[r] = (adapter.encode_images(pixels[r:r + 1])[0], torch.zeros(shape))
    cache.prompts(prompts)

    def update_cached(i):
        gens = sample_generators(0, "u", i, range(args.batch))
        loss, _ = diffusion_dro._step(adapter, model, None, levels, buffer.sample(gens), cache, gens, cfg, Acc)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    lat = torch.randn(2 * args.batch, *shape)
    t2 = levels.model_t[torch.full((2 * args.batch,), 500)]
    cond2 = repeat_cond(adapter.encode_prompts(prompts), 2)

    def floor(i):
        pred_ = adapter.predict(model, lat, t2, cond2)
        pred_.pow(2).mean().backward()
        with torch.no_grad(), adapters_disabled(model):
            adapter.predict(model, lat, t2, cond2)
        opt.step()
        opt.zero_grad(set_to_none=True)

    fns = {"refresh": refresh, "plain sampling": plain, "update": update, "update cached": update_cached,
           "update floor": floor}
    times = {name: [] for name in fns}
    for r in range(args.repeats + 1):  # interleaved rounds; round 0 warms up
        for name, fn in fns.items():
            t0 = time.process_time()
            fn(r)
            if r:
                times[name].append(time.process_time() - t0)
    med = {k_: statistics.median(v) for k_, v in times.items()}
    print(f"[cost] tiny {args.family}, batch {args.batch}, {args.sample_steps} sampler steps, LoRA r 8, CPU time of one "
          f"thread, median of {args.repeats}:")
    print(f"  buffer refresh {med['refresh'] * 1e3:.1f} ms vs plain pipeline sampling {med['plain sampling'] * 1e3:.1f} ms"
          f" -> {med['refresh'] / med['plain sampling']:.2f}x (target <= 1.1x)")
    print(f"  update {med['update'] * 1e3:.1f} ms vs floor {med['update floor'] * 1e3:.1f} ms -> "
          f"{med['update'] / med['update floor']:.2f}x (target <= 1.15x; the update also encodes the experts' images and "
          "prompts, which the floor takes precomputed)")
    print(f"  update with data.cache_latents {med['update cached'] * 1e3:.1f} ms -> "
          f"{med['update cached'] / med['update floor']:.2f}x the floor")
    print(f"  lagged sampler: {extra:,} extra parameters ({100 * extra / base_params:.2f} % of the denoiser's {base_params:,})")


def memory_child(args) -> None:
    """One process: load the pipeline only, or train `--memory-steps` steps of a recipe; print its peak RSS."""
    import resource

    import torch

    torch.set_num_threads(2)
    overrides = [f"model.pretrained={args.memory_dir / 'sd15-size'}", "data.resolution=64", "lora.rank=8",
                 f"run.output_dir={args.memory_dir / ('run-' + args.memory_child)}", f"run.max_steps={args.memory_steps}",
                 f"run.batch_size={args.batch}", "run.checkpoint_every=0", "run.progress=false", "run.log_with=none",
                 "validation.enabled=false", f"data.source={args.memory_dir / 'pairs.jsonl'}"]
    if args.memory_child == "load":
        from imgalign.models.adapters import load_adapter

        load_adapter(str(args.memory_dir / "sd15-size")).freeze_all()
    else:
        from imgalign.config import load_config
        from imgalign.recipes import get_recipe

        recipe = get_recipe(args.memory_child)
        extra = [f"dro.sample_steps={args.sample_steps}", f"dro.buffer_batch={args.batch}"] \
            if args.memory_child == "diffusion-dro" else []
        recipe.train(load_config(recipe.Config, None, overrides + extra))
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory(args) -> None:
    import subprocess
    import sys

    from PIL import Image

    from imgalign.data import write_preference_jsonl

    args.memory_dir.mkdir(parents=True, exist_ok=True)
    from imgalign.models.tiny import save_sd15_architecture

    save_sd15_architecture(args.memory_dir / "sd15-size")
    red, blue = Image.new("RGB", (64, 64), (220, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 220))
    write_preference_jsonl(args.memory_dir / "pairs.jsonl", args.memory_dir / "images",
                           [("a red square", red, blue, 1.0)] * 8)
    peaks = {}
    for mode in ("load", "diffusion-dpo", "diffusion-dro"):
        cmd = [sys.executable, __file__, "--memory-child", mode, "--memory-dir", str(args.memory_dir), "--batch",
               str(args.batch), "--sample-steps", str(args.sample_steps), "--memory-steps", str(args.memory_steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[mode] = json.loads(out)["peak_mb"]
    print(f"[memory] SD1.5-size pipeline (random weights), LoRA r 8, {args.memory_steps} steps of {args.batch} at 64 px, "
          f"DRO buffer {args.batch} trajectories x {args.sample_steps} steps; peak RSS per process:")
    for mode, mb in peaks.items():
        print(f"  {mode:<14}{mb:>9.0f} MB  {mb / peaks['load']:.2f}x load only")
    print(f"  diffusion-dro / diffusion-dpo: {peaks['diffusion-dro'] / peaks['diffusion-dpo']:.3f}x (target <= 1.1x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="outputs/demo", help="folder with pairs_train.parquet (make demo's output)")
    ap.add_argument("--top", type=int, default=200, help="expert images kept by the toy rater")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps of every run")
    ap.add_argument("--runs", nargs="*", default=["sft", "dro", "dpo"], choices=["sft", "dro", "dpo"])
    ap.add_argument("--out", default="outputs/dro_bench")
    ap.add_argument("--eval-prompts", type=int, default=200)
    ap.add_argument("--cost", action="store_true", help="time one step on a tiny pipeline instead (see above)")
    ap.add_argument("--family", default="sd15")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--memory", action="store_true", help="peak memory of DPO vs DRO at SD1.5 size (see above)")
    ap.add_argument("--memory-dir", type=Path, default=Path("outputs/dro_memory"), help="where the SD1.5-size "
                    "pipeline (4 GB) and the runs go")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args)
    if args.memory:
        return memory(args)
    if args.cost:
        cost(args)
        return

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
