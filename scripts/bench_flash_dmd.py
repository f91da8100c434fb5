"""Flash-DMD's cost and memory.

--cost: CPU time of one student update and one critic update of `imgalign train flash-dmd` (LoRA r 8, TTUR 2, one
thread, a tiny --family pipeline) against the bare minimum of network evaluations each needs, done by hand at the same
batch, the same student steps k and the same optimizers: the student's backward simulation (k no-grad student
passes), the student's pass with grad, the teacher's CFG pass and the fake score's pass at the same x_t, the backward
and AdamW step; the critic's fake-score pass with grad, backward and step. With --gan the DMD2 GAN joins (every sample
both losses): the student adds the fake network's bottleneck + head pass with grad to x0, the critic the VAE encoding
of the real images and the bottleneck + head pass on real and fake latents. The recipe's student update is timed as
(a step with the student's turn) - (a step without it), over the same step indices as the floor:

    python scripts/bench_flash_dmd.py --cost --family sd15 --batch 4 --steps 12
    python scripts/bench_flash_dmd.py --cost --family sd15 --batch 4 --steps 12 --gan
    python scripts/bench_flash_dmd.py --cost --model assets/toy/sd --batch 8 --steps 12

Memory (the default): the LoRA-shared layout (student and fake score as two adapters on the one teacher) against full
copies (teacher, student and fake score as separate networks, each trained one with its AdamW state), on the same
model: an SD1.5-architecture pipeline with random weights (`imgalign.models.tiny.save_sd15_architecture`; UNet width
--unet-width, 320 = SD1.5's 860M UNet, 160 = a quarter of its parameters so full copies fit a 24 GB CPU machine).

Each layout trains --steps steps (TTUR 1: the critic and the student both update every step) of 1 prompt at 64 px in
its own process; the peak resident memory of each is printed beside a process that only loads the pipeline.

    python scripts/bench_flash_dmd.py --unet-width 160 --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path


def child(args) -> None:
    import torch

    torch.set_num_threads(2)
    pipe = args.dir / f"sd15-arch-{args.unet_width}"
    if args.child == "load":
        from imgalign.models.adapters import load_adapter

        load_adapter(str(pipe)).freeze_all()
    else:
        from imgalign.config import load_config
        from imgalign.recipes import flash_dmd

        (args.dir / "prompts.txt").write_text("a red circle\ntwo blue squares\n")
        flash_dmd.train(load_config(flash_dmd.Config, None, [
            f"model.pretrained={pipe}", f"data.prompts={args.dir / 'prompts.txt'}", "data.resolution=64",
            f"lora.enabled={args.child == 'lora'}", "lora.rank=8", "dmd.ttur=1", "dmd.split_threshold=null",
            "dmd.gan_weight=0", f"run.output_dir={args.dir / ('run-' + args.child)}", f"run.max_steps={args.steps}",
            "run.batch_size=1", "run.checkpoint_every=0", "run.progress=false", "run.log_with=none",
            "validation.enabled=false"]))
    print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def cost(args) -> None:
    import tempfile
    import time

    import torch

    from imgalign.config import load_config
    from imgalign.losses.distill import dm_gradient, dm_surrogate_loss, gan_critic_loss, gan_generator_loss
    from imgalign.models.adapters import adapters_disabled, load_adapter
    from imgalign.models.tiny import save_tiny_pipeline
    from imgalign.recipes import flash_dmd as F

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp())
    pipe_dir = Path(args.model) if args.model else save_tiny_pipeline(args.family, work / args.family)
    (work / "prompts.txt").write_text("a red circle\ntwo blue squares\na green triangle\n")
    gan = [f"dmd.gan_weight={5e-3 if args.gan else 0}", "data.real_source=toy_renders" if args.gan else "dmd.ttur=2"]
    cfg = load_config(F.Config, None, [
        f"model.pretrained={pipe_dir}", f"data.prompts={work / 'prompts.txt'}", "data.resolution=32", "lora.rank=8",
        "dmd.ttur=2", "dmd.split_threshold=null", *gan, f"run.output_dir={work / 'run'}",
        f"run.max_steps={args.steps}", f"run.batch_size={args.batch}", "run.checkpoint_every=0",
        "run.progress=false", "run.log_with=none", "validation.enabled=false"])

    # 1. the recipe, each optimizer step timed (even steps: student + critic; odd: critic only)
    recipe, inner = {}, F.train_step

    def timed(ctx, book, i, *a):
        t0 = time.process_time()
        out = inner(ctx, book, i, *a)
        recipe[i] = time.process_time() - t0
        return out

    loading, real_batch = [], F.RealImages.batch  # the GAN's real images: data loading, not a network evaluation

    def timed_batch(self, *a, **kw):
        t0 = time.process_time()
        out = real_batch(self, *a, **kw)
        loading.append(time.process_time() - t0)
        return out

    F.train_step, F.RealImages.batch = timed, timed_batch
    try:
        F.train(cfg)
    finally:
        F.train_step, F.RealImages.batch = inner, real_batch

    # 2. the floor: the same evaluations by hand on a fresh copy of the pipeline with the same two adapters
    adapter = load_adapter(str(pipe_dir))
    adapter.freeze_all()
    adapter.add_lora(rank=8, adapter_name="student")
    adapter.add_lora(rank=8, adapter_name="fake")
    net, sched, d = adapter.denoiser, F.StudentSchedule(adapter, cfg.dmd.student_steps), cfg.dmd
    shape = (adapter.vae.config.latent_channels, 32 // adapter.pipe.vae_scale_factor, 32 // adapter.pipe.vae_scale_factor)
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    batch_prompts = [prompts[b % 3] for b in range(args.batch)]
    features = head = None
    if args.gan:
        features = F.BottleneckFeatures(net)
        with adapter.adapter_active("fake"), torch.no_grad():
            probe = features(lambda: adapter.predict(net, torch.zeros(1, *shape), sched.t[:1], adapter.encode_prompts([""])))
        head = F.GANHead(probe.shape[1], probe.shape[-1])
    opt_s = torch.optim.AdamW(adapter.lora_parameters("student"), lr=1e-5)
    opt_c = torch.optim.AdamW(adapter.lora_parameters("fake") + (list(head.parameters()) if head else []), lr=1e-5)
    real_pixels = torch.rand(args.batch, 3, 32, 32) * 2 - 1

    def d_logits(x, cond):
        t = adapter.sample_timesteps(len(x), noise_range=(0.0, d.gan_noise_max))
        xt, _ = adapter.noise_and_target(x, torch.randn_like(x), t)
        return head(features(lambda: adapter.predict(net, xt, t, cond)))

    def critic_floor(x0, cond):
        with adapter.adapter_active("fake"):
            t = adapter.sample_timesteps(len(x0))
            xt, target = adapter.noise_and_target(x0, torch.randn_like(x0), t)
            loss = (adapter.predict(net, xt, t, cond) - target).pow(2).mean()
            if args.gan:
                x_real = adapter.encode_images(real_pixels)
                real_cond = adapter.encode_prompts(batch_prompts)  # the real images' captions
                cond2 = {k: torch.cat([v, w]) for (k, v), w in zip(real_cond.items(), cond.values())}
                real, fake = d_logits(torch.cat([x_real, x0]), cond2).chunk(2)
                loss = loss + d.gan_critic_weight * gan_critic_loss(real, fake).mean()
            loss.backward()
        opt_c.step()
        opt_c.zero_grad(set_to_none=True)

    def student_sample(i, grad):
        """Backward simulation to the step's k, then the student's pass there (with grad on its turn)."""
        cond = adapter.encode_prompts(batch_prompts)
        k = int(F.draw_k(cfg, i, list(range(args.batch)))[0])
        with adapter.adapter_active("student"):
            x = torch.randn(args.batch, *shape)
            with torch.no_grad():
                for j in range(k):
                    ks = torch.full((args.batch,), j)
                    x = sched.renoise(F.student_x0(adapter, net, sched, x, ks, cond), ks + 1, torch.randn_like(x))
            with torch.set_grad_enabled(grad):
                x0 = F.student_x0(adapter, net, sched, x, torch.full((args.batch,), k), cond)
        return x0, cond

    def student_update(x0, cond):
        uncond = adapter.encode_uncond(args.batch, cond)
        t = adapter.sample_timesteps(args.batch, noise_range=tuple(d.dm_range))
        xt, _ = adapter.noise_and_target(x0.detach(), torch.randn_like(x0), t)
        with torch.no_grad():
            with adapters_disabled(net):
                real = adapter.predict_cfg(net, xt, t, cond, uncond, d.real_guidance)
            with adapter.adapter_active("fake"):
                fake = adapter.predict(net, xt, t, cond)
        a, s = adapter.alpha_sigma(t, xt)
        g = dm_gradient(x0.detach(), adapter.to_x0_eps(real, xt, a, s)[0], adapter.to_x0_eps(fake, xt, a, s)[0])
        loss = dm_surrogate_loss(x0, g).mean()
        if args.gan:
            leaf = x0.detach().requires_grad_(True)
            critic = opt_c.param_groups[0]["params"]
            with adapter.adapter_active("fake"):
                for p in critic:
                    p.requires_grad_(False)
                (grad,) = torch.autograd.grad(gan_generator_loss(d_logits(leaf, cond)).sum(), leaf)
                for p in critic:
                    p.requires_grad_(True)
            loss = loss + d.gan_weight * (grad * x0).flatten(1).sum(1).mean()
        with adapter.adapter_active("student"):
            loss.backward()
        opt_s.step()
        opt_s.zero_grad(set_to_none=True)

    floor = {}
    for i in range(args.steps):
        t0 = time.process_time()
        x0, cond = student_sample(i, grad=i % 2 == 0)
        if i % 2 == 0:
            student_update(x0, cond)
        critic_floor(x0.detach(), cond)
        floor[i] = time.process_time() - t0
    steps = range(2, args.steps)  # steps 0-1 warm up
    mean = lambda times, parity: sum(times[i] for i in steps if i % 2 == parity) / len(steps[parity::2])  # noqa: E731
    r_both, r_crit, f_both, f_crit = mean(recipe, 0), mean(recipe, 1), mean(floor, 0), mean(floor, 1)
    print(f"[cost] {args.model or 'tiny ' + args.family}, batch {args.batch}, 32 px, LoRA r 8, {'DMD2 + GAN' if args.gan else 'DMD2, no GAN'}"
          f", TTUR 2, {len(steps)} steps after 2 of warm-up, CPU time of one thread, same k per step in both:")
    print(f"  step with the student's turn {r_both * 1e3:.1f} ms vs floor {f_both * 1e3:.1f} ms -> {r_both / f_both:.2f}x")
    print(f"  critic-only step             {r_crit * 1e3:.1f} ms vs floor {f_crit * 1e3:.1f} ms -> {r_crit / f_crit:.2f}x "
          "(target <= 1.15x; both sample the student's inputs by backward simulation)")
    if loading:
        print(f"  of every step: loading the GAN's real images (toy renders) {sum(loading) / len(loading) * 1e3:.1f} ms, "
              "in the recipe's time, not in the floor's")
    r_stu, f_stu = r_both - r_crit, f_both - f_crit
    print(f"  student update (the difference) {r_stu * 1e3:.1f} ms vs floor {f_stu * 1e3:.1f} ms -> {r_stu / f_stu:.2f}x "
          "(target <= 1.15x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet-width", type=int, default=160)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=Path("outputs/flash_dmd_memory"), help="pipeline and runs")
    ap.add_argument("--cost", action="store_true", help="time one student and one critic update against their floors")
    ap.add_argument("--gan", action="store_true", help="--cost: with DMD2's GAN (real images: toy renders)")
    ap.add_argument("--family", default="sd15", help="--cost: tiny pipeline family")
    ap.add_argument("--model", help="--cost: a pipeline folder instead of the tiny --family pipeline")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cost:
        args.steps = max(args.steps, 6)
        return cost(args)
    if args.child:
        return child(args)
    from imgalign.models.tiny import save_sd15_architecture

    args.dir.mkdir(parents=True, exist_ok=True)
    save_sd15_architecture(args.dir / f"sd15-arch-{args.unet_width}", unet_width=args.unet_width)
    peaks = {}
    for mode in ("load", "lora", "full"):
        cmd = [sys.executable, __file__, "--child", mode, "--unet-width", str(args.unet_width), "--steps",
               str(args.steps), "--dir", str(args.dir)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        peaks[mode] = json.loads(out)["peak_mb"]
    print(f"[memory] SD1.5 architecture, UNet width {args.unet_width}, random weights; flash-dmd {args.steps} steps "
          "(TTUR 1) of 1 prompt at 64 px; peak RSS per process:")
    for mode, mb in peaks.items():
        print(f"  {mode:<6}{mb:>9.0f} MB")
    print(f"  LoRA-shared / full copies: {peaks['lora'] / peaks['full']:.3f}x (target <= 0.6x)")


if __name__ == "__main__":
    main()
