"""Flash-DMD on tiny pipelines: the student schedule and sampler (against diffusers' LCM pipeline), backward simulation,
TTUR, optimiser separation, the timestep split, every family, full fine-tuning, kill and resume. The DM gradient, its
surrogate, the GAN losses, the split and the hinge are tested on hand-computed values in
tests/unit/test_losses_distill.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from imgalign.config import ConfigError, load_config
from imgalign.losses.distill import smoothed_gradient
from imgalign.recipes import flash_dmd
from imgalign.train.loop import Run

FAMILIES = ("sd15", "sd2-v", "sdxl", "sd3", "flux")
GAN = ("dmd.gan_weight=1e-2", "data.real_source=toy_renders")
LORA = "pytorch_lora_weights.safetensors"


def make_cfg(pipeline: str, out: Path, *extra: str):
    return load_config(flash_dmd.Config, None, [
        f"model.pretrained={pipeline}", "data.resolution=32", f"run.output_dir={out}", "run.max_steps=2",
        "run.batch_size=2", "run.checkpoint_every=1", "run.keep_last=2", "run.progress=false", "run.log_with=none",
        "optim.lr=1e-3", "critic_optim.lr=1e-3", "lora.rank=4", "dmd.ttur=2", "validation.enabled=false", *extra,
    ])


def lora_b(weights: dict) -> list[torch.Tensor]:
    return [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]


def test_student_schedules_match_dmd2_and_the_flow_shift(tiny_pipelines):
    """SD: DMD2's [999, 749, 499, 249] with alpha = sqrt(alphabar_t); flow (tiny SD3, shift 3): sigmas 3u / (1 + 2u)
    for u = 1, 3/4, 1/2, 1/4 = 1, 0.9, 0.75, 0.5 with alpha = 1 - sigma. Both place the split the same way."""
    from imgalign.models.adapters import load_adapter

    sd, flow = load_adapter(tiny_pipelines("sd15")), load_adapter(tiny_pipelines("sd3"))
    s_sd, s_flow = flash_dmd.StudentSchedule(sd, 4), flash_dmd.StudentSchedule(flow, 4)
    assert s_sd.t.tolist() == [999, 749, 499, 249]
    ac = sd.noise_scheduler.alphas_cumprod[s_sd.t]
    torch.testing.assert_close(s_sd.alpha, ac.sqrt())
    torch.testing.assert_close(s_flow.t, torch.tensor([1.0, 0.9, 0.75, 0.5]))
    torch.testing.assert_close(s_flow.alpha, 1 - s_flow.t)
    torch.testing.assert_close(s_sd.frac, s_flow.frac)
    assert flash_dmd.timestep_split(s_sd.frac, 0.5)[0].tolist() == [True, True, False, False]


def test_backward_simulation_input_equals_a_manual_rollout(tiny_pipelines):
    """Per sample b, from its generator: noise x; k_b times (x0 = the student's epsilon -> x0 at t_j; x = sqrt(ab_{j+1})
    x0 + sqrt(1 - ab_{j+1}) z with fresh z from the same generator). Samples with k = 0, 2, 3, 1 in one batch."""
    from imgalign.models.adapters import load_adapter

    adapter = load_adapter(tiny_pipelines("sd15"))
    adapter.freeze_all()
    adapter.add_lora(rank=4, adapter_name="student")
    with torch.no_grad():  # a student that differs from the teacher
        for p in adapter.lora_parameters("student"):
            p.add_(0.1 * torch.randn_like(p))
    unet, ab = adapter.denoiser, adapter.noise_scheduler.alphas_cumprod
    sched = flash_dmd.StudentSchedule(adapter, 4)
    prompts = ["a red circle", "two blue squares", "a green star", ""]
    cond = adapter.encode_prompts(prompts)
    k = torch.tensor([0, 2, 3, 1])
    shape = (4, 16, 16)
    seeds = [11, 12, 13, 14]
    got = flash_dmd.simulate_input(adapter, unet, sched, cond, k, [torch.Generator().manual_seed(s) for s in seeds],
                                   shape)
    ts = [999, 749, 499, 249]
    with torch.no_grad():
        for b in range(4):
            g = torch.Generator().manual_seed(seeds[b])
            x = torch.randn(shape, generator=g)[None]
            for j in range(int(k[b])):
                eps = unet(x, torch.tensor([ts[j]]), encoder_hidden_states=cond["encoder_hidden_states"][b:b + 1]).sample
                x0 = (x - (1 - ab[ts[j]]).sqrt() * eps) / ab[ts[j]].sqrt()
                z = torch.randn(shape, generator=g)[None]
                x = ab[ts[j + 1]].sqrt() * x0 + (1 - ab[ts[j + 1]]).sqrt() * z
            torch.testing.assert_close(got[b:b + 1], x, rtol=1e-4, atol=1e-4)  # x0 at t=999 amplifies 15x


def test_ttur_counts_the_student_every_kth_step_and_the_critic_every_step(tiny_pipelines, tmp_path, monkeypatch):
    """dmd.ttur=5 over 10 steps: the critic is updated 10 times, the student at steps 0 and 5 (DMD2: k % 5 == 0)."""
    calls = []
    real = Run.apply_gradients
    monkeypatch.setattr(Run, "apply_gradients", lambda self, name=None: calls.append(name) or real(self, name))
    result = flash_dmd.train(make_cfg(tiny_pipelines("sd15"), tmp_path / "run", "run.max_steps=10", "dmd.ttur=5",
                                      "run.batch_size=1", "run.checkpoint_every=0"))
    assert calls.count("critic") == 10 and calls.count("student") == 2
    hist = result["history"]
    assert [h["train/student_turn"] for h in hist] == [1.0, 0, 0, 0, 0, 1.0, 0, 0, 0, 0]
    assert hist[-1]["train/student_updates"] == 2 and hist[-1]["train/critic_updates"] == 10
    assert "train/loss_student" in hist[5] and "train/loss_student" not in hist[4]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_each_update_moves_only_its_own_network(lora, tiny_pipelines, tmp_path, monkeypatch):
    """At every update, the other network holds no gradient (nothing leaked into it) and is bit-identical after the
    step; its own parameters moved. LoRA: two adapters on one module; the critic includes the GAN head; RL is on."""
    seen = []
    real = Run.apply_gradients

    def checked(self, name=None):
        mine, other = self.networks[name].params, self.networks["critic" if name == "student" else "student"].params
        assert all(p.grad is None for _, p in other), f"gradients of the {name}'s loss reached the other network"
        before = {n: p.detach().clone() for n, p in mine + other}
        updated = real(self, name)
        assert all(torch.equal(before[n], p) for n, p in other), f"the {name} update changed the other network"
        assert any(not torch.equal(before[n], p) for n, p in mine), f"the {name} update changed nothing"
        seen.append(name)
        return updated

    monkeypatch.setattr(Run, "apply_gradients", checked)
    flash_dmd.train(make_cfg(tiny_pipelines("sd15"), tmp_path / "run", *GAN, "run.max_steps=3", "run.checkpoint_every=0",
                             "rl.rewards=[compressibility]", "rl.thresholds=[0]", "rl.start_step=0",
                             "rl.smoothing_pairs=1", f"lora.enabled={str(lora).lower()}"))
    assert seen == ["student", "critic", "critic", "student", "critic"]


@pytest.mark.parametrize("split", [0.5, None], ids=["split", "dmd2"])
def test_the_split_routes_each_sample_to_its_loss(split, tiny_pipelines, tmp_path, monkeypatch):
    """Samples at the student steps 999, 749, 499, 249 (k = 0..3 in one batch): with split_threshold 0.5 the DM
    gradient is computed on exactly the first two samples' x0 and the GAN and regression terms on the last two, the
    regression from those samples' own inputs; without a split (DMD2) every loss on all four."""
    seen = {}
    real_x0, real_dm, real_adv = flash_dmd.student_x0, flash_dmd.dm_gradient, flash_dmd.adversarial_term
    real_reg, real_sim = flash_dmd.regression_term, flash_dmd.simulate_input

    def x0_spy(*a, **k):
        out = real_x0(*a, **k)
        if torch.is_grad_enabled():  # the trained forward (backward simulation runs without grad)
            seen["x0"] = out.detach().clone()
        return out

    monkeypatch.setattr(flash_dmd, "draw_k", lambda cfg, step, positions: torch.arange(4))
    monkeypatch.setattr(flash_dmd, "student_x0", x0_spy)
    monkeypatch.setattr(flash_dmd, "dm_gradient", lambda x, *a: seen.setdefault("dm", x.clone()) is not None
                        and real_dm(x, *a))
    monkeypatch.setattr(flash_dmd, "adversarial_term", lambda ctx, x, *a: seen.setdefault("adv", x.detach().clone())
                        is not None and real_adv(ctx, x, *a))
    monkeypatch.setattr(flash_dmd, "simulate_input", lambda *a: seen.setdefault("x_in", real_sim(*a)))
    monkeypatch.setattr(flash_dmd, "regression_term", lambda ctx, x, x_in, k, *a: seen.setdefault(
        "reg", (x.detach().clone(), x_in, k)) is not None and real_reg(ctx, x, x_in, k, *a))
    extra = [f"dmd.split_threshold={split}"] if split is not None else []
    result = flash_dmd.train(make_cfg(tiny_pipelines("sd15"), tmp_path / "run", *GAN, *extra, "run.max_steps=1",
                                      "run.batch_size=4", "run.checkpoint_every=0", "dmd.regression_weight=1"))
    dm_rows, adv_rows = ([0, 1], [2, 3]) if split is not None else ([0, 1, 2, 3], [0, 1, 2, 3])
    torch.testing.assert_close(seen["dm"], seen["x0"][dm_rows], rtol=0, atol=0)
    torch.testing.assert_close(seen["adv"], seen["x0"][adv_rows], rtol=0, atol=0)
    x, x_in, k = seen["reg"]
    torch.testing.assert_close(x, seen["x0"][adv_rows], rtol=0, atol=0)
    torch.testing.assert_close(x_in, seen["x_in"][adv_rows], rtol=0, atol=0)
    assert k.tolist() == adv_rows
    first = result["history"][0]
    assert first["train/dm_share"] == len(dm_rows) / 4 and first["train/adv_share"] == len(adv_rows) / 4
    assert first["train/loss_reg"] > 0


def test_regression_split_without_gan_and_a_regression_run(tiny_pipelines, tmp_path):
    """The split may route the low-noise steps to the regression loss alone (no GAN, no real images); pseudo-Huber."""
    result = flash_dmd.train(make_cfg(tiny_pipelines("sd15"), tmp_path / "run", "dmd.split_threshold=0.5",
                                      "dmd.regression_weight=0.25", "dmd.regression_distance=pseudo_huber",
                                      "dmd.regression_steps=2", "dmd.k_per_sample=true", "run.batch_size=4",
                                      "dmd.ttur=1", "run.checkpoint_every=0"))
    hist = result["history"]
    assert all(math.isfinite(h["train/loss_reg"]) for h in hist) and any(h["train/loss_reg"] > 0 for h in hist)
    assert all(h["train/adv_share"] == 0 for h in hist)


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sd3"])
def test_teacher_ode_lands_on_the_data_point_and_follows_ddim(family, tiny_pipelines, monkeypatch):
    """With the exact denoiser of a one-point data distribution x* (eps = (x - alpha x*) / sigma, as eps, v or flow
    velocity), the teacher's DDIM/Euler sample is x* from any start time and any step count. And on the real tiny
    network, 2 steps equal a manual DDIM from t_k through round(t_k / 2)."""
    from imgalign.models.adapters import load_adapter

    adapter = load_adapter(tiny_pipelines(family))
    sched = flash_dmd.StudentSchedule(adapter, 4)
    x_star = torch.randn(2, *adapter_latent_shape(adapter))
    t_start = sched.t[torch.tensor([1, 3])]
    a0, s0 = adapter.alpha_sigma(t_start, x_star)
    x = a0 * x_star + s0 * torch.randn_like(x_star)
    cond = adapter.encode_prompts(["a red circle", "a blue square"])
    real_predict = adapter.predict

    def exact(model, noisy, t, c):
        a, s = adapter.alpha_sigma(t, noisy)
        eps = (noisy - a * x_star) / s
        return {"epsilon": eps, "v_prediction": a * eps - s * x_star, "flow": eps - x_star}[adapter.prediction_type]

    monkeypatch.setattr(adapter, "predict", exact)
    for steps in (1, 3):
        got = flash_dmd.teacher_ode_x0(adapter, None, x, t_start, cond, None, 1.0, steps)
        torch.testing.assert_close(got, x_star, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(adapter, "predict", real_predict)
    net = adapter.denoiser
    with torch.no_grad():
        got = flash_dmd.teacher_ode_x0(adapter, net, x, t_start, cond, None, 1.0, 2)
        half = t_start / 2 if adapter.is_flow else (t_start.float() / 2).round().long()
        x0, eps = adapter.to_x0_eps(real_predict(net, x, t_start, cond).float(), x, *adapter.alpha_sigma(t_start, x))
        a, s = adapter.alpha_sigma(half, x)
        x1 = a * x0 + s * eps
        want, _ = adapter.to_x0_eps(real_predict(net, x1, half, cond).float(), x1, *adapter.alpha_sigma(half, x1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def adapter_latent_shape(adapter):
    f = adapter.pipe.vae_scale_factor
    return (adapter.vae.config.latent_channels, 32 // f, 32 // f)


def test_gan_on_the_teacher_pool_generates_once_and_refuses_other_settings(tiny_pipelines, tmp_path):
    """data.real_source=teacher: the teacher's samples of the training prompts become the GAN's real images; the
    pool is generated once (a second run reuses it) and a run with other settings is refused, naming them."""
    pool = tmp_path / "pool"
    extra = ("dmd.gan_weight=1e-2", "data.real_source=teacher", "data.teacher_images=3", "data.teacher_steps=2",
             f"data.teacher_dir={pool}", "run.checkpoint_every=0")
    result = flash_dmd.train(make_cfg(tiny_pipelines("sd15"), tmp_path / "a", *extra))
    assert sorted(p.name for p in pool.glob("*.png")) == ["000000.png", "000001.png", "000002.png"]
    record = json.loads((pool / "teacher_pool.json").read_text())
    assert record["settings"]["steps"] == 2 and record["settings"]["guidance"] == 6.0
    prompts = flash_dmd.load_prompts(flash_dmd.DataConfig())
    assert all(it["prompt"] in prompts for it in record["items"])
    assert all(math.isfinite(h["train/gan_d"]) for h in result["history"])
    stamp = (pool / "000000.png").stat().st_mtime_ns
    flash_dmd.train(make_cfg(tiny_pipelines("sd15"), tmp_path / "b", *extra))
    assert (pool / "000000.png").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="steps"):
        flash_dmd.train(make_cfg(tiny_pipelines("sd15"), tmp_path / "c", *extra, "data.teacher_steps=3"))


def test_toy_renders_carry_the_watermark_at_the_configured_share():
    from imgalign.toy.render import add_watermark

    cfg = flash_dmd.DataConfig(real_source="toy_renders", resolution=32, toy_watermark_fraction=1.0)
    prompts = ["a red circle", "two blue squares"]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    marked, _ = flash_dmd.RealImages(cfg, prompts, 0).batch(gens(), 0)
    as_uint8 = ((marked + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert (add_watermark(as_uint8) == as_uint8).all()
    cfg.toy_watermark_fraction = 0.0
    clean, _ = flash_dmd.RealImages(cfg, prompts, 0).batch(gens(), 0)
    clean = ((clean + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert not (add_watermark(clean) == clean).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_train_both_lora_adapters_and_the_gan_head(family, tiny_pipelines, tmp_path):
    """Two steps with the GAN and RL (compressibility, smoothed) on each family. Step 1: a fresh fake adapter equals the
    teacher, so with teacher CFG 1 the DM gradient is exactly 0. Both adapters and the head are trained and saved."""
    out = tmp_path / "run"
    result = flash_dmd.train(make_cfg(tiny_pipelines(family), out, *GAN, "dmd.real_guidance=1.0", "dmd.ttur=1",
                                      "rl.rewards=[compressibility]", "rl.thresholds=[0]", "rl.start_step=1",
                                      "rl.smoothing_pairs=1"))
    hist = result["history"]
    assert [h["step"] for h in hist] == [1, 2]
    assert hist[0]["train/dm_grad_abs"] == 0.0 and hist[0]["train/loss_dm"] == 0.0
    assert hist[0]["train/rl_active"] == 0.0 and hist[1]["train/rl_active"] == 1.0 and "train/loss_rl" in hist[1]
    for key in ("loss_critic", "loss_fake", "gan_d", "gan_g", "loss_student", "grad_norm_critic", "grad_norm_student"):
        assert math.isfinite(hist[-1][f"train/{key}"]), key
    ckpt = out / "checkpoint-2"
    for name in (LORA, f"critic/{LORA}", "critic/gan_head.safetensors", "trainer_state.json", "optimizer_1.bin"):
        assert (ckpt / name).is_file(), name
    assert any(v.abs().sum() > 0 for v in lora_b(load_file(str(out / LORA))))
    assert any(v.abs().sum() > 0 for v in lora_b(load_file(str(ckpt / "critic" / LORA))))
    schedule = json.loads((out / flash_dmd.STUDENT_FILE).read_text())
    assert schedule["num_steps"] == 4 and schedule["family"] == {"sd15": "sd", "sd2-v": "sd"}.get(family, family)


def test_full_finetuning_trains_student_and_fake_copies(tiny_pipelines, tmp_path):
    out = tmp_path / "full"
    result = flash_dmd.train(make_cfg(tiny_pipelines("sd15"), out, *GAN, "lora.enabled=false", "optim.lr=1e-4",
                                      "critic_optim.lr=1e-4", "dmd.real_guidance=1.0"))
    hist = result["history"]
    assert hist[0]["train/dm_grad_abs"] == 0.0  # fresh copies: fake == teacher
    assert all(math.isfinite(h["train/loss"]) for h in hist)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "checkpoint-2" / "critic" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    base = load_file(str(Path(tiny_pipelines("sd15")) / "unet" / "diffusion_pytorch_model.safetensors"))
    student = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(base[k], student[k]) for k in base)


def test_kill_and_resume_equals_uninterrupted(tiny_pipelines, tmp_path, run_killed, assert_same_continuation):
    """Killed in step 3 (after checkpoint-2): resumed from latest, the run reproduces the uninterrupted one: losses, the
    student, the fake adapter and the GAN head. TTUR 3 (student at steps 0 and 3) and RL from step 3 make the resumed
    steps depend on the restored step counter; two micro-batches per step, the split with k per sample."""
    pipe = tiny_pipelines("sd15")
    extra = (*GAN, "run.max_steps=5", "run.checkpoint_every=2", "run.keep_last=0", "run.grad_accum=2",
             "run.batch_size=1", "dmd.ttur=3", "dmd.split_threshold=0.5", "dmd.k_per_sample=true",
             "rl.rewards=[compressibility]", "rl.thresholds=[0]", "rl.start_step=3", "rl.smoothing_pairs=1",
             "optim.lr_scheduler=cosine")
    full = flash_dmd.train(make_cfg(pipe, tmp_path / "full", *extra))
    # critic_loss runs once per micro-batch: calls 1-4 are steps 1-2; die in step 3
    run_killed(flash_dmd, "critic_loss", 5, lambda: flash_dmd.train(make_cfg(pipe, tmp_path / "killed", *extra)))
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = flash_dmd.train(make_cfg(pipe, tmp_path / "killed", *extra, "run.resume_from=latest"))
    assert [h["step"] for h in resumed["history"]] == [3, 4, 5]
    assert [h["train/rl_active"] for h in resumed["history"]] == [0.0, 1.0, 0.0]
    assert resumed["history"][-1]["train/student_updates"] == 2
    files = [("", LORA), ("checkpoint-5/critic", LORA), ("checkpoint-5/critic", "gan_head.safetensors")]
    assert_same_continuation(full["history"], resumed["history"],
                             ("train/loss", "train/loss_critic", "train/loss_student", "train/loss_rl", "train/gan_d",
                              "train/grad_norm_critic", "train/lr"),
                             [(tmp_path / "full" / d / f, tmp_path / "killed" / d / f) for d, f in files], abs=1e-9)


def test_saved_student_loads_in_diffusers_and_samples_in_n_steps(tiny_pipelines, tmp_path):
    """The saved student LoRA (rank 4, alpha 2: the alpha travels in the adapter metadata) loads with
    pipe.load_lora_weights; diffusers' LCMScheduler at the saved timesteps, without CFG, reproduces the recipe's own
    N-step sampler from the same generator, and differs from the teacher's weights; `imgalign generate --lora` samples
    the same schedule by itself. The validation grid is written."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from imgalign.models.adapters import load_adapter

    pipe_dir, out = tiny_pipelines("sd15"), tmp_path / "run"
    flash_dmd.train(make_cfg(pipe_dir, out, "lora.alpha=2", "dmd.ttur=1", "optim.lr=1e-2", "run.checkpoint_every=0",
                             "validation.enabled=true", "validation.num_inference_steps=2",
                             "validation.images_per_prompt=1"))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000000.png", "step-000002.png"]
    schedule = json.loads((out / flash_dmd.STUDENT_FILE).read_text())
    prompts = ["a red circle", "two blue squares"]

    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(out)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    run = dict(timesteps=schedule["timesteps"], guidance_scale=0.0, height=32, width=32)
    latents = pipe(prompts, generator=torch.Generator().manual_seed(7), output_type="latent", **run).images
    images = pipe(prompts, generator=torch.Generator().manual_seed(7), output_type="np", **run).images
    assert images.shape == (2, 32, 32, 3) and pipe.scheduler.timesteps.tolist() == [999, 749, 499, 249]

    adapter = load_adapter(pipe_dir)
    adapter.freeze_all()
    adapter.add_lora(rank=4, alpha=2, adapter_name="student")
    adapter.load_lora_into_denoiser(out, adapter_name="student")
    sched = flash_dmd.StudentSchedule(adapter, 4)
    ours = flash_dmd.sample_student(adapter, adapter.denoiser, sched, prompts, torch.Generator().manual_seed(7),
                                    (4, 16, 16))
    torch.testing.assert_close(latents, ours, rtol=1e-4, atol=1e-4)
    # `imgalign generate --lora <student>` finds flash_dmd_student.json and samples the same schedule
    import numpy as np

    from imgalign.cli import main

    assert main(["generate", "--model", pipe_dir, "--lora", str(out), "--prompt", prompts[0], "--size", "32",
                 "--out", str(tmp_path / "gen")]) == 0
    cli_image = np.asarray(Image.open(tmp_path / "gen" / "00000_00.png"), dtype=np.int16)
    direct = pipe(prompts[0], generator=torch.Generator("cpu").manual_seed(0), output_type="pil", **run).images[0]
    assert np.abs(cli_image - np.asarray(direct, dtype=np.int16)).max() <= 1
    pipe.unload_lora_weights()
    teacher = pipe(prompts, generator=torch.Generator().manual_seed(7), output_type="latent", **run).images
    assert (teacher - latents).abs().max() > 1e-3


def test_smoothed_gradient_recovers_a_linear_gradient():
    """For h(x) = <a, x> each antithetic pair gives exactly <a, xi> xi, whose mean over many xi tends to a."""
    torch.manual_seed(0)
    k = 4096
    a, x, xi = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, k, 6)
    weights = torch.cat([a, a.repeat_interleave(k, 0), a.repeat_interleave(k, 0)])  # rows: x, x + s xi, x - s xi
    h0, grad = smoothed_gradient(lambda z: (z * weights).sum(1), x, xi, sigma=0.3)
    torch.testing.assert_close(h0, (a * x).sum(1))
    torch.testing.assert_close(grad, ((xi * a[:, None]).sum(-1, keepdim=True) * xi).mean(1))
    assert torch.nn.functional.cosine_similarity(grad, a).min() > 0.95


@pytest.mark.parametrize("override,match", [
    (["dmd.split_threshold=0.5"], "gan_weight"),
    (["dmd.gan_weight=0.01"], "real_source"),
    (["rl.rewards=[toy]"], "one threshold"),
    (["data.prompts=<captions.txt>"], "placeholder"),
])
def test_config_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(flash_dmd.Config, None, ["model.pretrained=x", *override])


def test_teacher_cfg_jitter_draws_per_step_within_its_range(tiny_pipelines, tmp_path, monkeypatch):
    """DMDR's jittered teacher CFG: fixed without jitter; with it, one draw per optimizer step, uniform in
    real_guidance +- jitter (both sides reached), the same for the same (seed, step); and the recipe's teacher pass
    uses exactly that scale on each student turn."""
    from imgalign.models.adapters import ModelAdapter

    d = flash_dmd.DMDConfig(real_guidance=7.0)
    assert flash_dmd.teacher_guidance(d, 0, 3) == 7.0
    d = flash_dmd.DMDConfig(real_guidance=7.0, real_guidance_jitter=0.5)
    draws = [flash_dmd.teacher_guidance(d, 0, step) for step in range(400)]
    assert all(6.5 <= g <= 7.5 for g in draws) and min(draws) < 6.6 and max(draws) > 7.4
    assert abs(sum(draws) / len(draws) - 7.0) < 0.05  # the mean of 400 uniforms: sd 0.014
    assert draws == [flash_dmd.teacher_guidance(d, 0, step) for step in range(400)]
    assert draws != [flash_dmd.teacher_guidance(d, 1, step) for step in range(400)]

    seen = []
    real = ModelAdapter.predict_cfg

    def spy(self, model, noisy, t, cond, uncond, scale):
        seen.append(scale)
        return real(self, model, noisy, t, cond, uncond, scale)

    monkeypatch.setattr(ModelAdapter, "predict_cfg", spy)
    cfg = make_cfg(tiny_pipelines("sd15"), tmp_path / "run", "dmd.real_guidance=3.0", "dmd.real_guidance_jitter=1.0",
                   "run.max_steps=4", "run.checkpoint_every=0")
    flash_dmd.train(cfg)
    assert seen == [flash_dmd.teacher_guidance(cfg.dmd, cfg.run.seed, step) for step in (0, 2)]  # TTUR 2


def test_dynamic_distribution_guidance_borrows_the_fake_lora_at_a_decaying_scale(tiny_pipelines, tmp_path):
    """DMDR's dynamic distribution guidance: the real score's share of the fake LoRA decays as a half cosine from
    dynamic_guidance_scale to 0 at dynamic_guidance_steps; at scale 0 the scaled network is the teacher exactly, at 1
    the fake score exactly, and the fake score's strength is restored after; full copies are refused."""
    from imgalign.models.adapters import load_adapter

    d = flash_dmd.DMDConfig(dynamic_guidance_steps=100, dynamic_guidance_scale=0.5)
    scales = [flash_dmd.real_score_lora_scale(d, step) for step in (0, 50, 99, 100, 500)]
    assert scales[0] == 0.5 and scales[1] == pytest.approx(0.25) and 0 < scales[2] < 1e-3 and scales[3:] == [0, 0]
    assert flash_dmd.real_score_lora_scale(flash_dmd.DMDConfig(), 0) == 0.0  # off by default

    adapter = load_adapter(tiny_pipelines("sd15"))
    nets = flash_dmd.DMDNetworks(adapter, flash_dmd.FlashLoraConfig(rank=4, init=False), torch.float32, False)
    for p in adapter.lora_parameters("fake"):  # a fake score that differs from the teacher
        p.data.normal_(0, 0.5, generator=torch.Generator().manual_seed(p.numel()))
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 700])
    cond = adapter.encode_prompts(["a red circle", "two blue squares"])

    def pred(ctx):
        with torch.no_grad(), ctx as net:
            return adapter.predict(net, x, t, cond)

    teacher, fake = pred(nets.role("teacher")), pred(nets.role("fake"))
    assert (teacher - fake).abs().max() > 1e-3
    torch.testing.assert_close(pred(nets.fake_at_scale(0.0)), teacher)
    torch.testing.assert_close(pred(nets.fake_at_scale(1.0)), fake)
    half = pred(nets.fake_at_scale(0.5))
    assert (half - teacher).abs().max() > 1e-4 and (half - fake).abs().max() > 1e-4
    torch.testing.assert_close(pred(nets.role("fake")), fake)  # restored

    flash_dmd.train(make_cfg(tiny_pipelines("sd15"), tmp_path / "run", "dmd.dynamic_guidance_steps=2",
                             "run.checkpoint_every=0"))  # runs through the scaled real score at step 0
    with pytest.raises(ConfigError, match="dynamic_guidance_steps needs lora.enabled"):
        make_cfg(tiny_pipelines("sd15"), tmp_path / "full", "lora.enabled=false", "dmd.dynamic_guidance_steps=10")


@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory):
    """A tiny SAM image encoder (SamVisionModel: hidden states laid out [B, H, W, C]) saved by path."""
    from transformers import SamVisionConfig, SamVisionModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("sam") / "sam"
    SamVisionModel(SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                   image_size=64, patch_size=16, output_channels=16, global_attn_indexes=[1],
                                   window_size=2)).save_pretrained(path)
    return str(path)


def test_pixel_discriminator_trains_heads_only_on_sam_and_clip_layouts(tiny_sam):
    """Heads on SAM's [B, H, W, C] maps and CLIP's [B, N, C] tokens; only the heads are parameters (and saved); the
    gradient reaches the images through the frozen encoder; the CLIP processor's mean/std are used; four evenly
    spaced layers by default, out-of-range layers refused naming the key."""
    from imgalign._paths import TOY_ASSETS
    from imgalign.models.gan_head import PixelDiscriminator

    sam = PixelDiscriminator(tiny_sam, None, 16)
    assert sam.layers == [1, 2] and sam.size == 64
    assert all(k.startswith("heads.") for k in sam.state_dict())
    assert sum(p.numel() for p in sam.parameters()) == 2 * (2 * 32 + 32 * 16 + 16 + 16 + 1)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    logits = sam(x)
    assert logits.shape == (2, 1)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in sam._encoder[0].parameters())
    clip = PixelDiscriminator(str(TOY_ASSETS / "clip"), [-1], 8)
    assert clip.layers == [-1] and clip.mean.flatten()[0] == pytest.approx(0.48145466)
    assert clip(x.detach()).shape == (2, 1)
    with pytest.raises(ConfigError, match="pixel_layers.*1..2"):
        PixelDiscriminator(tiny_sam, [3], 8)


def test_pixel_gan_run_trains_the_heads_and_the_student_through_the_decoder(tiny_sam, tiny_pipelines, tmp_path):
    """dmd.gan_space=pixel under the split: the low-noise samples get the pixel GAN's generator loss through the VAE
    decoder, the critic trains the heads on real vs decoded pixels; the checkpoint holds the heads, not the encoder."""
    out = tmp_path / "run"
    result = flash_dmd.train(make_cfg(tiny_pipelines("sd15"), out, *GAN, "dmd.gan_space=pixel",
                                      f"dmd.pixel_encoder={tiny_sam}", "dmd.gan_head_width=16",
                                      "dmd.split_threshold=0.5", "dmd.k_per_sample=true", "run.batch_size=4",
                                      "dmd.ttur=1"))
    hist = result["history"]
    assert all(math.isfinite(h["train/gan_d"]) and math.isfinite(h["train/gan_g"]) for h in hist)
    assert any(h["train/adv_share"] > 0 for h in hist) and any(h["train/gan_g"] > 0 for h in hist)
    heads = load_file(str(out / "checkpoint-2" / "critic" / "gan_head.safetensors"))
    assert heads and all(k.startswith("heads.") for k in heads)
    with pytest.raises(ConfigError, match="pixel_encoder"):
        make_cfg(tiny_pipelines("sd15"), tmp_path / "x", *GAN, "dmd.gan_space=pixel")


def test_grpo_term_raises_the_log_probability_of_the_better_rollouts(tiny_pipelines, monkeypatch):
    """rl.algorithm=grpo: with rewards that favour rollout 0 of each group, one SGD step along the term's gradient
    raises the log-probability of rollout 0's transitions and lowers the others' (the term is -A log p); its value at
    ratio 1 is -mean(A) (0 with group-normalised advantages)."""
    from accelerate import Accelerator

    from imgalign.models.adapters import load_adapter
    from imgalign.sampling.gaussian import gaussian_log_prob

    cfg = make_cfg(tiny_pipelines("sd15"), Path("unused"), "rl.algorithm=grpo", "rl.rewards=[compressibility]",
                   "rl.mode=pointwise", "rl.groups=2", "rl.group_size=3")
    adapter = load_adapter(cfg.model.pretrained)
    nets = flash_dmd.DMDNetworks(adapter, cfg.lora, torch.float32, False)
    with torch.no_grad():  # a student that differs from the teacher
        for _, p in nets.named_params("student"):
            p.add_(0.1 * torch.randn_like(p))
    sched = flash_dmd.StudentSchedule(adapter, 4)
    ctx = SimpleNamespace(cfg=cfg, adapter=adapter, nets=nets, sched=sched, accelerator=Accelerator(cpu=True))
    prompts = ["a red circle", "two blue squares"]
    batch = flash_dmd.Batch(prompts, adapter.encode_prompts(prompts), None, torch.zeros(2, dtype=torch.long), [0, 1])
    seen = {}
    real_rollout = flash_dmd.student_rollout
    monkeypatch.setattr(flash_dmd, "student_rollout", lambda *a: seen.setdefault("r", real_rollout(*a)))
    monkeypatch.setattr("imgalign.rewards.online.compute_rewards",
                        lambda specs, rewards, judge, images, *a: (torch.tensor([[1.0, 0, 0, 1.0, 0, 0]]), {}))
    term = flash_dmd.GRPOTerm(cfg.rl, torch.device("cpu"))
    shape = (4, 16, 16)
    with nets.role("student"):
        loss, metrics = term(ctx, batch, 0, shape)
    assert float(loss) == pytest.approx(0.0, abs=1e-6) and float(metrics["grpo_adv_abs"]) > 0
    states, _ = seen["r"]
    cond = flash_dmd._rows(batch.cond, torch.arange(2).repeat_interleave(3))

    def log_p():
        with torch.no_grad(), nets.role("student") as net:
            out = []
            for k in range(3):
                step = torch.full((6,), k)
                x0 = flash_dmd.student_x0(adapter, net, sched, states[k], step, cond)
                a, s = sched.coef(step + 1, x0)
                out.append(gaussian_log_prob(states[k + 1], a * x0, s.expand_as(x0)))
            return torch.stack(out, 1).mean(1)

    before = log_p()
    params = [p for _, p in nets.named_params("student")]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(1e-2 * g)
    change = log_p() - before
    assert (change[[0, 3]] > 0).all() and (change[[1, 2, 4, 5]] < 0).all(), change


def test_grpo_term_runs_beside_the_distillation(tiny_pipelines, tmp_path):
    result = flash_dmd.train(make_cfg(tiny_pipelines("sd15"), tmp_path / "run", "rl.algorithm=grpo",
                                      "rl.rewards=[compressibility]", "rl.mode=pointwise", "rl.start_step=1",
                                      "rl.groups=1", "rl.group_size=2", "dmd.ttur=1", "run.checkpoint_every=0"))
    hist = result["history"]
    assert "train/loss_grpo" not in hist[0] and math.isfinite(hist[1]["train/loss_grpo"])
    assert math.isfinite(hist[1]["train/loss_student"])
    with pytest.raises(ConfigError, match="student_steps >= 2"):
        make_cfg(tiny_pipelines("sd15"), tmp_path / "x", "rl.algorithm=grpo", "rl.rewards=[compressibility]",
                 "dmd.student_steps=1")
