"""Self-NPO: the re-noising jump against its closed form, and a few training steps on tiny pipelines."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from imgalign.config import load_config
from imgalign.recipes import self_npo


def _ddpm_levels(prediction_type="epsilon"):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return self_npo.NoiseLevels(SimpleNamespace(is_flow=False, prediction_type=prediction_type, noise_scheduler=sched))


def test_renoise_matches_the_closed_form_jump():
    """Reference form: x_s = alpha_s (x_t / alpha_t + sqrt(nsr_s^2 - nsr_t^2) z), nsr = sigma / alpha. And the
    marginal: if x_t = alpha_t x0 + sigma_t eps then x_s - alpha_s x0 has standard deviation sigma_s."""
    lv = _ddpm_levels()
    g = torch.Generator().manual_seed(0)
    x_t, z = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    for t, s in [(0, 1), (39, 500), (199, 999), (600, 601)]:
        a_t, s_t, a_s, s_s = lv.alpha[t].double(), lv.sigma[t].double(), lv.alpha[s].double(), lv.sigma[s].double()
        nsr_t, nsr_s = s_t / a_t, s_s / a_s
        expected = a_s * (x_t.double() / a_t + (nsr_s**2 - nsr_t**2).sqrt() * z.double())
        torch.testing.assert_close(self_npo.renoise(x_t.double(), a_t, s_t, a_s, s_s, z.double()), expected)
    # Monte Carlo over eps and z (1-D, 400k draws): mean alpha_s x0, std sigma_s
    x0, n = 0.7, 400_000
    t, s = 120, 700
    eps, zz = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    a_t, s_t, a_s, s_s = (v.double() for v in (lv.alpha[t], lv.sigma[t], lv.alpha[s], lv.sigma[s]))
    x_s = self_npo.renoise(a_t * x0 + s_t * eps, a_t, s_t, a_s, s_s, zz)
    assert float(x_s.mean()) == pytest.approx(float(a_s * x0), abs=4e-3)
    assert float(x_s.std()) == pytest.approx(float(s_s), rel=5e-3)
    # flow levels (alpha = 1 - sigma), including the end of the schedule alpha_s = 0: x_s = z exactly
    one, zero = torch.tensor(1.0), torch.tensor(0.0)
    torch.testing.assert_close(self_npo.renoise(x_t, torch.tensor(0.8), torch.tensor(0.2), zero, one, z), z)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "flow"])
def test_prediction_to_clean_and_noise_estimates(ptype):
    """Build x = alpha x0 + sigma eps and the family's exact prediction; to_x0_eps must return (x0, eps)."""
    if ptype == "flow":
        lv = self_npo.NoiseLevels(SimpleNamespace(is_flow=True, prediction_type="flow", shift=3.0))
    else:
        lv = _ddpm_levels(ptype)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    k = torch.tensor([0, 400, 998])
    a, s = lv.coef(k, x0)
    x = a * x0 + s * eps
    pred = {"epsilon": eps, "v_prediction": a * eps - s * x0, "flow": eps - x0}[ptype]
    got_x0, got_eps = lv.to_x0_eps(pred, x, k)
    torch.testing.assert_close(got_x0, x0, atol=2e-4, rtol=0)
    torch.testing.assert_close(got_eps, eps, atol=2e-4, rtol=0)


def test_pseudo_huber_hand_computed():
    """c = 0.001: d = 0 -> 0; d = 1 -> sqrt(1 + 1e-6) - 1e-3 = 0.9990005; mean over elements per sample."""
    pred, target = torch.tensor([[0.0, 1.0], [2.0, 2.0]]), torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    torch.testing.assert_close(self_npo.pseudo_huber(pred, target, 0.001), torch.tensor([0.9990005 / 2, 0.0]))


def test_pseudo_huber_fits_the_median_and_drops_a_minority_mode():
    """Why npo.loss matters: one prediction fitted to targets that carry a mode on 20 % of samples (1 vs 0). The
    pseudo-Huber loss (c = 0.001, ~L1) is minimised at the median, 0: the mode is gone; l2 at the mean, 0.2."""
    targets = torch.tensor([1.0] * 2 + [0.0] * 8).view(10, 1)
    grid = torch.linspace(0, 1, 101)
    huber = torch.stack([self_npo.pseudo_huber(g.expand(10, 1), targets, 0.001).mean() for g in grid])
    l2 = torch.stack([(g - targets).pow(2).mean() for g in grid])
    assert float(grid[huber.argmin()]) == 0.0
    assert abs(float(grid[l2.argmin()]) - 0.2) < 1e-6


def make_cfg(pipeline: str, out: Path, *extra: str):
    return load_config(self_npo.Config, None, [
        f"model.pretrained={pipeline}", "data.prompts=[a red circle, two blue squares]", "data.num_samples=4",
        "data.sample_steps=1", "data.resolution=32",
        "npo.rollout_steps=2", f"run.output_dir={out}", "run.batch_size=2",
        "run.progress=false", "run.log_with=none", "optim.lr=1e-3", "validation.num_inference_steps=1",
        "validation.images_per_prompt=1", "validation.prompts=[a red circle]", *extra,
    ])


def test_full_finetuning_steps_checkpoint_and_kill_resume(tiny_pipelines, tmp_path, run_killed, assert_same_continuation):
    base_dir = tiny_pipelines("sd15")
    extra = ("run.max_steps=3", "run.checkpoint_every=2", "run.keep_last=0", "npo.ema_decay=0.5")
    full = self_npo.train(make_cfg(base_dir, tmp_path / "full", *extra))
    hist = full["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    assert all(math.isfinite(h["train/loss"]) and h["train/loss"] > 0 for h in hist)
    out = tmp_path / "full"
    assert (out / "checkpoint-2" / "ema_teacher.safetensors").is_file()
    assert (out / "checkpoint-3" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "starting_states.safetensors").is_file()

    # every student parameter moved, and the EMA teacher moved too (but stayed between base and student)
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet").state_dict()
    tuned = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    changed = [not torch.equal(base[k], tuned[k]) for k in base]
    assert sum(changed) / len(changed) > 0.9
    ema = load_file(str(out / "checkpoint-3" / "ema_teacher.safetensors"))
    assert sum(not torch.equal(ema[k], base[k]) for k in ema) / len(ema) > 0.9

    # killed during step 3, resumed from checkpoint-2: the same losses and weights as uninterrupted
    # dies in step 3
    run_killed(self_npo, "_step", 3,
               lambda: self_npo.train(make_cfg(base_dir, tmp_path / "killed", *extra)))
    resumed = self_npo.train(make_cfg(base_dir, tmp_path / "killed", *extra, "run.resume_from=latest"))
    assert [h["step"] for h in resumed["history"]] == [3]
    w = "unet/diffusion_pytorch_model.safetensors"
    assert_same_continuation(hist, resumed["history"], ("train/loss",), [(out / w, tmp_path / "killed" / w)],
                             rel=1e-5)


def test_flow_family_lora_with_negative_guidance(tiny_pipelines, tmp_path):
    """SD3 (flow velocity), LoRA, teacher under negative guidance w = -5 (both branches)."""
    out = tmp_path / "sd3"
    result = self_npo.train(make_cfg(tiny_pipelines("sd3"), out, "lora.enabled=true", "lora.rank=4",
                                     "npo.teacher_guidance=-5", "run.max_steps=2", "run.checkpoint_every=0"))
    assert all(math.isfinite(h["train/loss"]) for h in result["history"])
    w = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k or "lora.up" in k)
    assert (out / "checkpoint-2" / "ema_teacher.safetensors").is_file()


def test_shipped_configs_parse():
    paths = sorted(Path("configs/self_npo").glob("*.yaml"))
    assert paths
    for path in paths:
        cfg = load_config(self_npo.Config, path)
        assert cfg.model.pretrained and cfg.npo.huber_c == 0.001
