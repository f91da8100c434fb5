"""Flash-DMD's cost, memory and evidence on the toy world.

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

--toy: evidence on the toy world (assets/toy/sd, 32 px, CPU). Three 4-step students of the 25-step teacher, trained
with configs/flash_dmd/toy.yaml at the same seed, steps (--steps) and learning rates (--lr: student and critic), each
in --out/<name> (reused when it holds the final student: pytorch_lora_weights.safetensors + flash_dmd_student.json;
delete a folder to retrain it), validated every --val-every steps with the toy rater:
  (t) teacher@25  the teacher, 25 DDIM steps, CFG 5 (the reference distribution)
  (a) teacher@4   the same teacher and sampler cut to 4 steps, CFG 5 (what few steps give without distillation)
  (b) dmd2        DMD2: DM and GAN loss on every student step (dmd.split_threshold=null), no RL
  (c) split       Flash-DMD's timestep-aware split (0.5: DM on t 999/749, GAN on 499/249), no RL
  (d) split_rl    (c) plus the joint RL term (toy rater, hinge, from rl.start_step)
  split_teacher      (c) with the GAN's real images = 512 samples of the teacher (data.real_source=teacher), which
                     carry its watermark habit, unlike the clean renders of (c)
  split_teacher_reg  split_teacher plus the regression loss on the low-noise steps (weight 0.25, latent MSE to the
                     teacher's 4-step DDIM sample from the student's input)
  split_wm           (c) with 40 % of the renders watermarked (the toy SD's last pretraining phase)
  split_pixel        split_teacher with the pixel-space GAN (dmd.gan_space=pixel) on the frozen toy CLIP image tower
  split_teacher_grpo split_teacher plus rl.algorithm=grpo: the toy rater's win rates in groups of 4 rollouts of the
                     student (2 prompts per micro-batch), from rl.start_step
The students sample their 4 steps without CFG, as `imgalign generate --lora <student>` does. Evaluation: the first
--eval-prompts held-out test prompts x --images-per-prompt images, image j of prompt i at one seed derived from
(--eval-seed, i, j) for every model. Per model, with percentile bootstrap 95 % intervals:
  preference, fidelity, watermark rate  the toy rater (`imgalign.toy.evaluate`: .preference, .score, .watermarked),
                                         per prompt means, intervals over prompts; the paired change (same prompt,
                                         same seeds) against teacher@4
  FD to teacher@25                       Frechet distance between the toy-CLIP image embeddings of the model's images
                                         and teacher@25's at the same seeds (covariances + 1e-4 I, RIDGE); interval
                                         over images (resampled jointly in both sets). teacher@25's own row: a second
                                         teacher@25 set at seeds from --eval-seed + 1 against the first (the noise
                                         floor)
  diversity                              per prompt, the mean pairwise L2 distance between the toy-CLIP embeddings of
                                         its images (0: all identical); beside it the mean pairwise distance in px
                                         between the centroids of the largest detected object (prompts where every
                                         image has one) and the share of image pairs whose detected backgrounds
                                         differ (prompts that state no background); intervals over prompts
Convergence: per run, the first validation step whose reward (the config's val/toy_preference, or with
`--set validation.reward=toy` the rater's fidelity alone, which the watermark does not move) reaches a level: teacher@4's validation reward, 90 % of the best run's final, teacher@25's. What the evidence should show:
(b) and (c) close the gap from (a) to (t) (preference and fidelity up from teacher@4, FD down towards the noise
floor), (c) reaches the levels in fewer steps than (b) (Flash-DMD's claim: faster convergence), and (d) raises the
rater's preference over (c) without collapsing diversity (CLIP diversity, position spread, background variety near
(c)'s and the teacher's). Note: the GAN's real images are unwatermarked toy renders, so (b)-(d) may lose the
teacher's watermark without RL.

    python scripts/bench_flash_dmd.py --toy --steps 1000 --lr 1e-3 --split-gan-weight 0.1 --set rl.start_step=500 \
        --set validation.prompts_file=outputs/val48.txt --val-every 100 --eval-prompts 200 --images-per-prompt 2 \
        --threads 1 --out outputs/flash_dmd_toy      # docs/results.md (outputs/val48.txt: 48 validation prompts)
    python scripts/bench_flash_dmd.py --toy --runs dmd2 split split_teacher split_teacher_reg split_wm split_pixel \
        split_teacher_grpo --steps 1000 --lr 1e-3 --split-gan-weight 0.1 --set rl.start_step=500 \
        --set validation.reward=toy --set validation.prompts_file=outputs/val48.txt --val-every 100 \
        --eval-prompts 200 --images-per-prompt 2 --threads 1 --out outputs/flash_dmd_toy2

(untuned: at the config's lr 1e-4 the validation reward of dmd2 did not move in 100 steps, at 1e-3 it rose from 0.33
to 0.45 on 32 validation prompts; --set passes any other override to every run, e.g. rl.start_step.)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NO_RL = ["rl.rewards=[]", "rl.thresholds=[]"]
TOY_RUNS = {  # overrides of configs/flash_dmd/toy.yaml per student
    "dmd2": ["dmd.split_threshold=null", *NO_RL],
    "split": NO_RL,
    "split_rl": [],
    # the GAN's real images as the teacher's own samples (LADD-style; they carry its watermark habit) ...
    "split_teacher": [*NO_RL, "data.real_source=teacher", "data.teacher_images=512"],
    # ... plus the regression loss on the low-noise steps (DMD1's weight 0.25, latent MSE)
    "split_teacher_reg": [*NO_RL, "data.real_source=teacher", "data.teacher_images=512", "dmd.regression_weight=0.25"],
    # ... or renders watermarked as the toy SD's last pretraining phase (40 %)
    "split_wm": [*NO_RL, "data.toy_watermark_fraction=0.4"],
    # split_teacher plus the Pref-GRPO-style RL term (the toy rater's win rates on the student's own rollouts)
    "split_teacher_grpo": ["data.real_source=teacher", "data.teacher_images=512", "rl.algorithm=grpo",
                           "rl.rewards=[toy_preference]", "rl.thresholds=[]", "rl.mode=pairwise"],
    # split_teacher with Flash-DMD's pixel-space GAN: heads on the frozen toy CLIP image tower over decoded images
    "split_pixel": [*NO_RL, "data.real_source=teacher", "data.teacher_images=512", "dmd.gan_space=pixel",
                    "dmd.pixel_encoder=assets/toy/clip"],
}
RATER = ("preference", "fidelity", "watermark_rate")  # per image, paired against teacher@4
RIDGE = 1e-4  # added to both covariances of the Frechet distance (48-d embeddings, a few hundred images)


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
    from imgalign.models.gan_head import BottleneckFeatures, GANHead
    from imgalign.models.tiny import save_tiny_pipeline
    from imgalign.recipes import flash_dmd as F

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp())
    pipe_dir = Path(args.model) if args.model else save_tiny_pipeline(args.family, work / args.family)
    (work / "prompts.txt").write_text("a red circle\ntwo blue squares\na green triangle\n")
    gan = ["dmd.gan_weight=5e-3", "data.real_source=toy_renders"] if args.gan else ["dmd.gan_weight=0"]
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
        features = BottleneckFeatures(net)
        with adapter.adapter_active("fake"), torch.no_grad():
            probe = features(lambda: adapter.predict(net, torch.zeros(1, *shape), sched.t[:1], adapter.encode_prompts([""])))
        head = GANHead(probe.shape[1], probe.shape[-1])
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


# ------------------------------------------------------------------------------------------------
# --toy: pure helpers (tested in tests/unit/test_bench_flash_dmd.py)
# ------------------------------------------------------------------------------------------------
def frechet_distance(a, b, ridge: float = RIDGE) -> float:
    """Frechet distance between Gaussians fitted to rows of a [N, D] and b [M, D]:
    ||mu_a - mu_b||^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2), each covariance plus ridge * I."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    eye = ridge * np.eye(a.shape[1])
    sa, sb = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sb @ root), 0, None)).sum()
    value = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross
    return max(float(value), 0.0)


def fd_interval(a, b, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """FD(a, b) and a percentile bootstrap 95 % interval, resampling row indices jointly in a and b (row n of both
    is image n at the same seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    boots = [frechet_distance(a[i], b[i]) for i in rng.integers(0, len(a), size=(n_boot, len(a)))]
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return frechet_distance(a, b), float(lo), float(hi)


def pairwise_spread(values, k: int):
    """Rows [P * k, D] (prompt-major: k per prompt) -> per prompt [P] the mean L2 distance over the pairs of its k
    rows: 0 when a prompt's rows are identical, NaN when one holds a NaN."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64).reshape(-1, k, np.shape(values)[-1])
    d = np.linalg.norm(x[:, :, None] - x[:, None], axis=-1)  # [P, k, k]
    i, j = np.triu_indices(k, 1)
    return d[:, i, j].mean(1)


def pairwise_disagreement(labels: list, k: int):
    """Labels [P * k] (prompt-major) -> per prompt [P] the share of pairs of its k labels that differ."""
    import itertools

    import numpy as np

    rows = [labels[i:i + k] for i in range(0, len(labels), k)]
    return np.array([np.mean([x != y for x, y in itertools.combinations(r, 2)]) for r in rows])


def first_step_reaching(curve: list[tuple[int, float]], level: float) -> int | None:
    """The first step of a (step, value) curve whose value reaches `level`; None if none does."""
    return next((step for step, value in curve if value >= level), None)


# ------------------------------------------------------------------------------------------------
# --toy: training, sampling, scoring, report
# ------------------------------------------------------------------------------------------------
def toy_overrides(name: str, args) -> list[str]:
    lr = [f"optim.lr={args.lr}", f"critic_optim.lr={args.lr}"] if args.lr is not None else []
    if args.split_gan_weight is not None and name != "dmd2":  # under the split the GAN is the only loss of its steps
        lr.append(f"dmd.gan_weight={args.split_gan_weight}")
    if "data.real_source=teacher" in TOY_RUNS[name]:  # one pool for every run that uses it
        lr.append(f"data.teacher_dir={Path(args.out) / 'teacher_pool'}")
    return [*TOY_RUNS[name], f"run.output_dir={Path(args.out) / name}", f"run.max_steps={args.steps}", *lr,
            "run.progress=false", "run.log_with=none", "run.checkpoint_every=0", f"validation.every={args.val_every}",
            *args.set]


def toy_config(name: str, args):
    from imgalign.config import load_config
    from imgalign.recipes import flash_dmd

    return load_config(flash_dmd.Config, ROOT / "configs" / "flash_dmd" / "toy.yaml", toy_overrides(name, args))


def train_toy_runs(args) -> dict[str, dict]:
    """Each student of --runs, trained or reused -> {name: {dir, seconds, steps, validation, overrides}}."""
    from imgalign.recipes import flash_dmd

    runs = {}
    for name in args.runs:
        out, overrides = Path(args.out) / name, toy_overrides(name, args)
        info = out / "bench_run.json"
        if (out / "pytorch_lora_weights.safetensors").is_file() and (out / flash_dmd.STUDENT_FILE).is_file():
            kept = json.loads(info.read_text()) if info.is_file() else {}
            note = "" if kept.get("overrides") == overrides else " (trained with other settings or unknown ones)"
            print(f"[toy] {name}: reusing the student in {out}{note}", flush=True)
        else:
            result = flash_dmd.train(toy_config(name, args))
            kept = {**{k: result[k] for k in ("seconds", "steps", "validation")}, "overrides": overrides}
            info.write_text(json.dumps(kept, indent=1) + "\n")
            print(f"[toy] {name}: {result['steps']} steps in {result['seconds']:.0f} s", flush=True)
        runs[name] = {"dir": out, "seconds": None, "steps": None, "validation": [], **kept}
    return runs


def teacher_validation_reward(cfg, steps: int) -> float:
    """The validation reward of the teacher at `steps` steps (validation CFG, prompts and seed)."""
    from dataclasses import replace

    from imgalign.models.adapters import load_adapter
    from imgalign.recipes.common import validation_images
    from imgalign.rewards import build_reward

    vcfg = replace(cfg.validation, num_inference_steps=steps)
    images, prompts = validation_images(load_adapter(cfg.model.pretrained), vcfg, cfg.data.resolution)
    return float(build_reward(vcfg.reward).score(images, prompts).mean())


def convergence(runs: dict[str, dict], cfg) -> dict:
    """Levels of the validation reward, and per run the first step reaching each (and its share of the run's
    wall seconds, validation included)."""
    key = f"val/{cfg.validation.reward}"
    curves = {n: [(v["step"], v[key]) for v in r["validation"] if key in v] for n, r in runs.items()}
    curves = {n: c for n, c in curves.items() if c}
    if not curves:
        return {"key": key, "levels": {}, "runs": {}}
    best_final = max(c[-1][1] for c in curves.values())
    levels = {"teacher@4": teacher_validation_reward(cfg, 4), "0.9 x best final": 0.9 * best_final,
              "teacher@25": next(v[f"{key}_teacher"] for r in runs.values() for v in r["validation"]
                                 if f"{key}_teacher" in v)}
    report = {}
    for name, curve in curves.items():
        per_step = runs[name]["seconds"] / runs[name]["steps"] if runs[name]["steps"] else None
        reach = {lv: first_step_reaching(curve, x) for lv, x in levels.items()}
        report[name] = {"curve": curve, "first_step": reach, "approx_seconds": {
            lv: s * per_step if s is not None and per_step else None for lv, s in reach.items()}}
    return {"key": key, "levels": levels, "runs": report}


def image_seed(seed: int, prompt: int, image: int) -> int:
    from imgalign.train.seeding import derive_seed

    return derive_seed(seed, "bench-flash-dmd", prompt, image)


def sample_images(pipe, prompts: list[str], k: int, seed: int, call: dict, size: int, batch: int = 64):
    """k images per prompt [P * k, 3, size, size] in [0, 1], prompt-major; image j of prompt i from its own
    generator, so every model draws it from the same noise."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(k)]
    out = []
    for b in range(0, len(jobs), batch):
        part = jobs[b:b + batch]
        gens = [torch.Generator("cpu").manual_seed(image_seed(seed, i, j)) for i, j in part]
        with torch.no_grad():
            out.append(pipe([prompts[i] for i, _ in part], generator=gens, height=size, width=size,
                            output_type="pt", **call).images.float().cpu())
    return torch.cat(out)


def score_images(images, prompts: list[str], k: int, clip) -> dict:
    """Per image: the toy rater's preference, fidelity, watermark coverage and flag, the centroid of the largest
    detected object (NaN if none), the detected background; the toy-CLIP embedding; per prompt: whether it leaves
    the background open."""
    import numpy as np

    from imgalign.toy import evaluate
    from imgalign.toy.clip import embed_images

    scores = [evaluate(im, p) for im, p in zip(images, [p for p in prompts for _ in range(k)])]
    main = [max(s.detections, key=lambda d: d.area, default=None) for s in scores]
    return {"preference": np.array([s.preference for s in scores]), "fidelity": np.array([s.score for s in scores]),
            "watermark": np.array([s.watermark for s in scores]),
            "watermark_rate": np.array([float(s.watermarked) for s in scores]),
            "centroid": np.array([d.centroid if d is not None else (np.nan, np.nan) for d in main]),
            "background": [s.detected_background for s in scores],
            "open_background": np.array([s.taste is not None for s in scores[::k]]),
            "features": embed_images(clip, images).numpy()}


def interval(values) -> dict | None:
    import numpy as np

    from imgalign.eval.preference import bootstrap_ci

    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    mean, lo, hi = bootstrap_ci(values)
    return {"mean": mean, "ci95": [lo, hi], "n": int(len(values))}


def summarize(s: dict, reference: dict, base: dict | None, k: int) -> dict:
    """One model's metrics with intervals; `reference`: teacher@25's images at the same seeds (for the FD), `base`:
    teacher@4's (paired changes of the rater metrics), None for teacher@4 itself."""
    per_prompt = {m: s[m].reshape(-1, k).mean(1) for m in RATER}
    out = {m: interval(v) for m, v in per_prompt.items()}
    if base is not None:
        out.update({f"{m}_vs_teacher@4": interval(v - base[m].reshape(-1, k).mean(1)) for m, v in per_prompt.items()})
    fd, lo, hi = fd_interval(s["features"], reference["features"])
    out["fd"] = {"mean": fd, "ci95": [lo, hi], "n": len(s["features"])}
    out["diversity"] = interval(pairwise_spread(s["features"], k))
    out["position_spread"] = interval(pairwise_spread(s["centroid"], k))
    out["background_variety"] = interval(pairwise_disagreement(s["background"], k)[s["open_background"]])
    out["watermark_coverage"] = interval(s["watermark"])
    return out


def evaluate_toy(runs: dict[str, dict], args, cfg) -> dict[str, dict]:
    """Samples of the teacher (cfg.model.pretrained) and the students on the held-out prompts at cfg.data.resolution,
    scored -> {model: summary}."""
    from imgalign.eval.toy_bench import load_pipeline
    from imgalign.recipes import flash_dmd
    from imgalign.toy.clip import load_toy_clip
    from imgalign.toy.prompts import PROMPT_DIR, load_prompts

    prompts, k = load_prompts(PROMPT_DIR / "test.txt")[:args.eval_prompts], args.images_per_prompt
    clip = load_toy_clip()[0]
    teacher = load_pipeline(cfg.model.pretrained)

    def scored(pipe, call, seed=args.eval_seed):
        return score_images(sample_images(pipe, prompts, k, seed, call, cfg.data.resolution), prompts, k, clip)

    samples = {"teacher@25": scored(teacher, {"num_inference_steps": 25, "guidance_scale": 5.0}),
               "teacher@4": scored(teacher, {"num_inference_steps": 4, "guidance_scale": 5.0})}
    floor = scored(teacher, {"num_inference_steps": 25, "guidance_scale": 5.0}, seed=args.eval_seed + 1)
    for name, run in runs.items():
        student = load_pipeline(cfg.model.pretrained, str(run["dir"]))
        samples[name] = scored(student, flash_dmd.use_student_sampler(student, Path(run["dir"])))
    ref, base = samples["teacher@25"], samples["teacher@4"]
    summary = {name: summarize(s, ref, None if name == "teacher@4" else base, k) for name, s in samples.items()}
    fd, lo, hi = fd_interval(floor["features"], ref["features"])  # teacher@25's own row: the noise floor, not 0
    summary["teacher@25"]["fd"] = {"mean": fd, "ci95": [lo, hi], "n": len(ref["features"])}
    return summary


def toy_table(summary: dict[str, dict]) -> str:
    """One markdown row per model: `mean [lo, hi]` per metric, the paired change vs teacher@4 beside the rater's."""
    def cell(x, sign=""):
        return "n/a" if x is None else f"{x['mean']:{sign}.3f} [{x['ci95'][0]:{sign}.3f}, {x['ci95'][1]:{sign}.3f}]"

    cols = [("preference", ""), ("preference_vs_teacher@4", "+"), ("fidelity", ""), ("fidelity_vs_teacher@4", "+"),
            ("watermark_rate", ""), ("watermark_rate_vs_teacher@4", "+"), ("fd", ""), ("diversity", ""),
            ("position_spread", ""), ("background_variety", "")]
    names = ["preference", "change vs t@4", "fidelity", "change vs t@4", "watermark rate", "change vs t@4",
             "FD to teacher@25", "diversity (CLIP)", "position spread (px)", "background variety"]
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(cols) + 1) + "|"]
    for model, s in summary.items():
        lines.append(f"| {model} | " + " | ".join("-" if key not in s else cell(s[key], sign) for key, sign in cols)
                     + " |")
    return "\n".join(lines)


def toy(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    if args.images_per_prompt < 2:
        raise SystemExit("--images-per-prompt must be at least 2 (diversity is measured between a prompt's images)")
    cfg = toy_config(args.runs[0] if args.runs else "split", args)
    runs = train_toy_runs(args)
    conv = convergence(runs, cfg)
    summary = evaluate_toy(runs, args, cfg)
    print(f"\n[toy] Flash-DMD on the toy SD: {args.steps} steps, lr {args.lr or cfg.optim.lr:g}, seed {cfg.run.seed}; "
          f"{args.eval_prompts} test prompts x {args.images_per_prompt} images (seeds from {args.eval_seed}); "
          "bootstrap 95 % intervals; changes paired against teacher@4")
    print(toy_table(summary))
    print("teacher@25's FD: a second teacher@25 set at other seeds against the first (the noise floor); "
          "students: 4 steps, no CFG")
    if conv["levels"]:
        print(f"\nconvergence: first validation step with {conv['key']} >= level (every {args.val_every} steps; "
              "~seconds at the run's mean seconds per step, validation included)")
        for level, value in conv["levels"].items():
            cells = [f"{n} {r['first_step'][level] if r['first_step'][level] is not None else 'not reached'}"
                     + (f" (~{r['approx_seconds'][level]:.0f} s)" if r["approx_seconds"][level] is not None else "")
                     for n, r in conv["runs"].items()]
            print(f"  {level} ({value:.3f}): " + ", ".join(cells))
    print("training seconds: " + ", ".join(f"{n} {r['seconds']:.0f}" if r["seconds"] is not None else f"{n} -"
                                            for n, r in runs.items()))
    path = Path(args.json) if args.json else Path(args.out) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"settings": vars(args), "runs": runs, "convergence": conv, "models": summary},
                               indent=1, default=str) + "\n")
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--unet-width", type=int, default=160)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (memory: 2; --cost: at least 6; --toy: 600)")
    ap.add_argument("--dir", type=Path, default=Path("outputs/flash_dmd_memory"), help="pipeline and runs")
    ap.add_argument("--cost", action="store_true", help="time one student and one critic update against their floors")
    ap.add_argument("--gan", action="store_true", help="--cost: with DMD2's GAN (real images: toy renders)")
    ap.add_argument("--family", default="sd15", help="--cost: tiny pipeline family")
    ap.add_argument("--model", help="--cost: a pipeline folder instead of the tiny --family pipeline")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--toy", action="store_true", help="train dmd2 / split / split_rl students on the toy world and "
                    "evaluate them beside the teacher (see above)")
    ap.add_argument("--split-gan-weight", type=float, default=None,
                    help="--toy: dmd.gan_weight of the split students (the GAN alone trains their low-noise steps; "
                         "default: the toy config's, DMD2's add-on weight 1e-3)")
    ap.add_argument("--runs", nargs="*", default=list(TOY_RUNS), choices=list(TOY_RUNS), help="--toy: students")
    ap.add_argument("--lr", type=float, default=None, help="--toy: optim.lr and critic_optim.lr (default: the config)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="--toy: override for every run")
    ap.add_argument("--val-every", type=int, default=50, help="--toy: validation every N steps")
    ap.add_argument("--eval-prompts", type=int, default=100, help="--toy: first N held-out test prompts")
    ap.add_argument("--images-per-prompt", type=int, default=2)
    ap.add_argument("--eval-seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="--toy: torch threads")
    ap.add_argument("--out", default="outputs/flash_dmd_toy", help="--toy: runs and results")
    ap.add_argument("--json", default=None, help="--toy: results file (default: --out/results.json)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps is None:
        args.steps = 600 if args.toy else 2
    if args.toy:
        return toy(args)
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
