"""Hand-computed checks of recipe maths that single-line mutations would break (issue 21).

Each test names the mutation it guards against: ties swapping both error pairs, the lower advantage clamp,
the newest-N reward history, shared noise and timestep per Diffusion-DPO pair, the LoRA reference being the
base model, and zero-std groups in Pref-GRPO advantages.
"""

from __future__ import annotations

import contextlib
import math
import types

import pytest
import torch

from imgalign.losses.policy import PromptStatTracker, clipped_surrogate
from imgalign.recipes import diffusion_dpo, pref_grpo


def _neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


# ---- 1. Diffusion-DPO ties swap the policy AND the reference errors ---------------------------------------
def test_tie_and_loser_preferred_swap_policy_and_reference_errors():
    """Model errors w = 1.0, l = 1.2; reference errors w = 0.7, l = 0.4; beta = 1.

    L(w, l) = -log sig(-(1/2)((1.0 - 1.2) - (0.7 - 0.4))) = -log sig(0.25)  = 0.5759394
    L(l, w) = -log sig(-(1/2)((1.2 - 1.0) - (0.4 - 0.7))) = -log sig(-0.25) = 0.8259394
    label 1 -> 0.5759394; label 0.5 -> 0.5 L(w, l) + 0.5 L(l, w) = 0.7009394; label 0 -> L(l, w) = 0.8259394.
    Swapping only the policy errors would give L(l, w) = -log sig(0.05) and a tie loss of 0.6221995.
    """
    assert _neg_log_sigmoid(0.25) == pytest.approx(0.5759394, abs=1e-7)
    assert _neg_log_sigmoid(-0.25) == pytest.approx(0.8259394, abs=1e-7)
    cfg = diffusion_dpo.LossConfig(beta=1.0)
    model_err = torch.tensor([1.0, 1.0, 1.0, 1.2, 1.2, 1.2])  # winners first: 3 pairs
    ref_err = torch.tensor([0.7, 0.7, 0.7, 0.4, 0.4, 0.4])
    losses, _, _ = diffusion_dpo.dpo_losses(model_err, ref_err, torch.tensor([1.0, 0.5, 0.0]), cfg)
    torch.testing.assert_close(losses, torch.tensor([0.5759394, 0.7009394, 0.8259394]), atol=1e-6, rtol=0)


# ---- 2. the advantage clamp has a lower bound ---------------------------------------------------------------
def test_surrogate_clamps_negative_advantages_to_minus_clip_max():
    """A = -50 with adv_clip_max = 5 behaves as A = -5.

    On-policy (log rho = 0, rho = 1): loss = -A rho = 5, d loss / d log pi = -A rho = 5 (not 50).
    Off-policy log rho = 0.1 inside clip_range 0.2: rho = e^0.1 = 1.1051709, loss = 5 rho = 5.5258546 and
    d loss / d log pi = 5 rho = 5.5258546.
    """
    logp = torch.tensor([0.0, 0.1], requires_grad=True)
    out = clipped_surrogate(logp, torch.zeros(2), torch.tensor([-50.0, -50.0]), clip_range=0.2, adv_clip_max=5.0)
    expected = torch.tensor([5.0, 5.5258546])
    torch.testing.assert_close(out.loss.detach(), expected, atol=1e-5, rtol=0)
    out.loss.sum().backward()
    torch.testing.assert_close(logp.grad, expected, atol=1e-5, rtol=0)


# ---- 3. the per-prompt history keeps the newest buffer_size rewards ------------------------------------------
def test_prompt_stat_tracker_keeps_the_newest_rewards_when_the_buffer_overflows():
    """buffer 2, min_count 2, eps 0, biased std.

    update [0, 2]  -> history [0, 2]:   mean 1, std 1 -> advantages [-1, 1]
    update [10, 12] -> history [10, 12] (the newest 2): mean 11, std 1 -> [-1, 1]  (oldest kept: [10, 12] -> [9, 11])
    update [13]    -> history [12, 13]: mean 12.5, std 0.5 -> (13 - 12.5) / 0.5 = 1  (oldest kept: [0, 2] -> 12)
    """
    tr = PromptStatTracker(buffer_size=2, min_count=2, eps=0.0)
    torch.testing.assert_close(tr.update(["a", "a"], torch.tensor([0.0, 2.0])), torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(tr.update(["a", "a"], torch.tensor([10.0, 12.0])), torch.tensor([-1.0, 1.0]))
    torch.testing.assert_close(tr.update(["a"], torch.tensor([13.0])), torch.tensor([1.0]))
    assert tr.history == {"a": [12.0, 13.0]}


# ---- 6. Pref-GRPO: constant groups get advantage 0 and are dropped with filter_zero_std -----------------------
def test_zero_std_groups_get_zero_advantage_and_are_dropped():
    """Groups: prompt 0 rewards [1, 3] (mean 2, biased std 1), prompt 1 rewards [4, 4] (constant).

    With eps = 0: group 0 -> (1 - 2) / 1 = -1 and (3 - 2) / 1 = 1; group 1 -> 0 / 0 (NaN) unless it is zeroed, so the
    constant group must come out as exactly 0. filter_zero_std=True keeps [T, T, F, F]; False keeps all four.
    """
    values = torch.tensor([[1.0, 3.0, 4.0, 4.0]])
    groups = torch.tensor([0, 0, 1, 1])
    prompts = ["p", "p", "q", "q"]
    for keep_flag, expected_keep in ((True, [True, True, False, False]), (False, [True, True, True, True])):
        acfg = pref_grpo.AdvantageConfig(eps=0.0, filter_zero_std=keep_flag)
        adv, zero, keep = pref_grpo.advantages(values, [1.0], groups, prompts, acfg, "normalize_then_weight")
        assert adv.tolist() == [-1.0, 1.0, 0.0, 0.0]
        assert zero.tolist() == [False, False, True, True]
        assert keep.tolist() == expected_keep


# ---- tiny SD1.5 with a non-zero LoRA ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_sd15(tiny_pipelines):
    """(folder, adapter) of a tiny SD1.5 whose LoRA B weights are set non-zero, so policy != reference."""
    from imgalign.models.adapters import load_adapter

    path = tiny_pipelines("sd15")
    adapter = load_adapter(path)
    adapter.freeze_all()
    adapter.add_lora(rank=4)
    g = torch.Generator().manual_seed(0)
    n_b = 0
    with torch.no_grad():
        for name, p in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
                n_b += 1
    assert n_b > 0
    return path, adapter


# ---- 4. the same noise and the same t for both images of a Diffusion-DPO pair -------------------------------
def test_identical_pair_images_give_identical_errors_and_log2_loss(lora_sd15, tiny_pairs, monkeypatch):
    """Winner and loser images identical (pixels_w == pixels_l). With the same noise and t per pair and a
    deterministic VAE encoding, the two halves of the 2B batch are the same inputs, so model_err_w == model_err_l
    and ref_err_w == ref_err_l, the implicit margin is 0 and the sigmoid loss is -log sig(0) = log 2 = 0.6931472,
    even though the LoRA makes policy != reference. Separate noise or t for the loser breaks all three.
    """
    _, adapter = lora_sd15
    original_encode = adapter.encode_images

    def encode_mode(pixels, generator=None):  # consume the same VAE draws, return the posterior mode
        original_encode(pixels, generator=generator)
        vcfg = adapter.vae.config
        mode = adapter.vae.encode(pixels.to(adapter.vae.device, adapter.vae.dtype)).latent_dist.mode()
        return ((mode - (vcfg.get("shift_factor") or 0.0)) * vcfg.scaling_factor).float()

    monkeypatch.setattr(adapter, "encode_images", encode_mode)
    from imgalign.config import load_config

    cfg = load_config(diffusion_dpo.Config, None, ["model.pretrained=x", f"data.source={tiny_pairs}"])
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {
        "pixels_w": pixels.clone(), "pixels_l": pixels.clone(), "captions": ["a red square", "a blue square"],
        "labels": torch.ones(2), "original_sizes": torch.tensor([[32, 32], [32, 32]]),
        "crops_top_left": torch.zeros(2, 2, dtype=torch.long),
    }
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    accelerator = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)
    model = adapter.denoiser
    with torch.no_grad():
        loss, m = diffusion_dpo._step(adapter, model, None, batch, gens, cfg, accelerator)
    assert m["model_err_w"].item() == m["model_err_l"].item()
    assert m["ref_err_w"].item() == m["ref_err_l"].item()
    assert m["model_err_w"].item() != m["ref_err_w"].item()  # the LoRA is active: policy differs from reference
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


# ---- 5. the LoRA reference (adapter disabled) is the base model -----------------------------------------------
def test_lora_disabled_forward_equals_fresh_base_denoiser(lora_sd15):
    """With the adapter disabled the LoRA UNet's output equals that of the base UNet loaded fresh from the same
    folder without LoRA (to 1e-6); with it enabled (B != 0) the output differs, and leaving the context
    re-enables it."""
    from diffusers import UNet2DConditionModel

    from imgalign.models import adapters

    path, adapter = lora_sd15
    base = UNet2DConditionModel.from_pretrained(path, subfolder="unet").eval()
    model = adapter.denoiser.eval()
    g = torch.Generator().manual_seed(2)
    size = base.config.sample_size
    noisy = torch.randn(2, base.config.in_channels, size, size, generator=g)
    t = torch.tensor([10, 500])
    cond = adapter.encode_prompts(["a red square", "a blue square"])
    with torch.no_grad():
        want = adapter.predict(base, noisy, t, cond)
        enabled = adapter.predict(model, noisy, t, cond)
        with adapters.adapters_disabled(model):
            disabled = adapter.predict(model, noisy, t, cond)
        again = adapter.predict(model, noisy, t, cond)
    torch.testing.assert_close(disabled, want, atol=1e-6, rtol=0)
    assert (enabled - want).abs().max().item() > 1e-3
    torch.testing.assert_close(again, enabled, atol=0, rtol=0)
