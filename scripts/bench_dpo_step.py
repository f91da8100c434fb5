"""Time and peak memory of one Diffusion-DPO training step against the bare minimum.

Bare minimum: one policy forward + backward over 2B noisy latents and one no-grad reference forward over
the same 2B (adapter disabled), from precomputed latents and text embeddings, plus the optimizer step.
Recipe step: `imgalign.recipes.diffusion_dpo._step` as training runs it (VAE and text encoding included,
or from the latent/text cache with --cached), loss core, backward and optimizer step.
RPO step (`rpo` row): `imgalign.recipes.rpo._step` on the same B pairs (a reference image and a negative each, with
their own prompts, timesteps and noise), the same work otherwise; its ratio to the recipe row is printed.

Each mode runs in its own process so peak RSS (CPU) or peak allocated memory (CUDA) is its own. On CPU the
time is the process's CPU time with one thread, which other load on a shared machine disturbs far less
than wall time; on CUDA it is wall time after synchronisation.

    python scripts/bench_dpo_step.py --family sd15 --pairs 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def _peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_mode(mode: str, pipeline: str, pairs: int, steps: int, res: int) -> dict:
    from accelerate import Accelerator

    from imgalign.models.adapters import adapters_disabled, load_adapter, repeat_cond
    from imgalign.recipes import diffusion_dpo
    from imgalign.train.seeding import sample_generators

    torch.manual_seed(0)
    accelerator = Accelerator()
    on_cpu = accelerator.device.type == "cpu"
    if on_cpu:
        torch.set_num_threads(1)
    clock = time.process_time if on_cpu else time.perf_counter
    adapter = load_adapter(pipeline, device=accelerator.device)
    adapter.freeze_all()
    adapter.add_lora(rank=8)
    model = adapter.denoiser
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    pixels = torch.rand(pairs, 3, res, res) * 2 - 1
    batch = {"pixels_w": pixels, "pixels_l": pixels.flip(-1), "captions": ["a red circle"] * pairs,
             "labels": torch.ones(pairs), "original_sizes": torch.full((pairs, 2), res),
             "crops_top_left": torch.zeros(pairs, 2, dtype=torch.long)}
    cfg = diffusion_dpo.Config()
    if mode == "cached":
        lat = adapter.encode_images(torch.cat([batch["pixels_w"], batch["pixels_l"]]))
        batch = {"latents": torch.cat([lat, torch.zeros_like(lat)], dim=1), "labels": batch["labels"],
                 "cond": adapter.encode_prompts(batch["captions"]), "captions": batch["captions"]}
    lat2 = adapter.encode_images(pixels.repeat(2, 1, 1, 1))
    cond2 = repeat_cond(adapter.encode_prompts(["a red circle"] * pairs), 2)

    if mode == "rpo":
        import types

        from imgalign.recipes import rpo

        batch = {"pixels": torch.cat([pixels, pixels.flip(-1)]), "captions": ["a sks square"] * pairs + ["a red circle"] * pairs,
                 "original_sizes": torch.full((2 * pairs, 2), res), "crops_top_left": torch.zeros(2 * pairs, 2, dtype=torch.long),
                 "labels": torch.ones(pairs), "probs": torch.full((pairs,), 0.5)}
        cfg = types.SimpleNamespace(rpo=rpo.RPOLossConfig())  # what rpo._step reads

    def bare_step(gen):
        t = adapter.sample_timesteps(pairs, generator=gen).repeat(2)
        noise = torch.randn(lat2.shape, generator=gen).to(lat2.device)
        noisy, target = adapter.noise_and_target(lat2, noise, t)
        loss = (adapter.predict(model, noisy, t, cond2) - target).pow(2).mean()
        loss.backward()
        with torch.no_grad(), adapters_disabled(model):
            adapter.predict(model, noisy, t, cond2)

    times = []
    for i in range(steps + 2):
        gen = torch.Generator().manual_seed(i)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        if mode == "bare":
            bare_step(gen)
        else:  # the recipe draws per pair, from (seed, step, position) generators
            gens = sample_generators(0, "dpo", i, list(range(pairs)))
            step_fn = rpo._step if mode == "rpo" else diffusion_dpo._step
            loss, _ = step_fn(adapter, model, None, batch, gens, cfg, accelerator)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(clock() - t0)
    n_denoisers = sum(1 for m in [adapter.denoiser] if m is not None)
    return {"mode": mode, "median_s": statistics.median(times), "peak_mb": _peak_mb(accelerator.device),
            "denoiser_copies": n_denoisers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd15", help="tiny family to build (sd15, sdxl, sd3, flux)")
    ap.add_argument("--pipeline", help="benchmark this pipeline folder instead of a tiny one")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.pipeline, args.pairs, args.steps, args.resolution)))
        return
    with tempfile.TemporaryDirectory() as d:
        pipeline = args.pipeline
        if pipeline is None:
            from imgalign.models.tiny import save_tiny_pipeline

            pipeline = str(save_tiny_pipeline(args.family, d))
        rows: dict[str, dict] = {}
        for mode in ("bare", "recipe", "cached", "rpo") * 2:  # interleaved; best of two each
            cmd = [sys.executable, __file__, "--mode", mode, "--pipeline", pipeline, "--pairs", str(args.pairs),
                   "--steps", str(args.steps), "--resolution", str(args.resolution)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            if mode not in rows or r["median_s"] < rows[mode]["median_s"]:
                rows[mode] = r
    base = rows["bare"]
    print(f"Diffusion-DPO step, {args.pairs} pairs, {args.resolution}px, {args.family if not args.pipeline else args.pipeline}")
    print(f"{'mode':<8}{'median s/step':>15}{'x bare':>8}{'peak MB':>10}{'x bare':>8}")
    for mode, r in rows.items():
        print(f"{mode:<8}{r['median_s']:>15.4f}{r['median_s'] / base['median_s']:>8.2f}{r['peak_mb']:>10.0f}"
              f"{r['peak_mb'] / base['peak_mb']:>8.2f}")
    print(f"RPO step / Diffusion-DPO step (recipe rows): {rows['rpo']['median_s'] / rows['recipe']['median_s']:.2f}x")
    print("recipe = encodes images and text every step; cached = data.cache_latents=true. "
          f"Denoiser copies held with LoRA: {rows['recipe']['denoiser_copies']} (reference = adapter disabled).")


if __name__ == "__main__":
    main()
