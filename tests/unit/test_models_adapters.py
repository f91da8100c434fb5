"""Family adapters on tiny pipelines saved to disk and loaded back by path."""

from __future__ import annotations

import pytest
import torch

from imgalign.models.adapters import adapters_disabled, load_adapter, repeat_cond

FAMILY_OF = {"sd15": "sd", "sd2-v": "sd", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
PREDICTION = {"sd15": "epsilon", "sd2-v": "v_prediction", "sdxl": "epsilon", "sd3": "flow", "flux": "flow"}


@pytest.fixture(scope="module", params=list(FAMILY_OF))
def adapter(request, tiny_pipelines):
    return request.param, load_adapter(tiny_pipelines(request.param))


def test_loads_family_and_prediction_type(adapter):
    name, a = adapter
    assert a.family == FAMILY_OF[name]
    assert a.prediction_type == PREDICTION[name]


def test_noise_and_target_follow_the_prediction_type(adapter):
    """epsilon: target = noise; v: target = sqrt(a_t) noise - sqrt(1 - a_t) x0; flow: x_t = (1-s) x0 + s n,
    target = n - x0. Checked against the closed forms, not the code under test."""
    name, a = adapter
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    n = torch.randn(3, 4, 8, 8, generator=g)
    t = a.sample_timesteps(3, generator=g)
    noisy, target = a.noise_and_target(x0, n, t)
    if a.is_flow:
        assert ((t > 0) & (t < 1)).all()
        s = t.view(-1, 1, 1, 1)
        torch.testing.assert_close(noisy, (1 - s) * x0 + s * n)
        torch.testing.assert_close(target, n - x0)
        return
    assert t.dtype == torch.int64 and ((t >= 0) & (t < 1000)).all()
    ab = a.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, ab.sqrt() * x0 + (1 - ab).sqrt() * n)
    expected = n if name != "sd2-v" else ab.sqrt() * n - (1 - ab).sqrt() * x0
    torch.testing.assert_close(target, expected)


def test_noise_range_restricts_training_timesteps(adapter):
    """noise_range = fractions of the schedule: DDPM t / T in [lo, hi); flow sigma = shift(u), u in [lo, hi]."""
    name, a = adapter
    g = torch.Generator().manual_seed(3)
    full = a.sample_timesteps(4000, generator=g)
    high = a.sample_timesteps(4000, generator=g, noise_range=(0.6, 1.0))
    if a.is_flow:
        s = a.shift
        sigma = lambda u: s * u / (1 + (s - 1) * u)  # noqa: E731
        assert high.min() >= sigma(0.6) - 1e-6 and high.max() <= sigma(1.0) and full.min() < sigma(0.6)
    else:
        assert high.min() == 600 and high.max() == 999 and full.min() < 600
        assert set(a.sample_timesteps(200, generator=g, noise_range=(0.0, 0.002)).tolist()) == {0, 1}
    for bad in ((0.5, 0.5), (-0.1, 1.0), (0.2, 1.5)):
        with pytest.raises(ValueError, match="noise_range"):
            a.sample_timesteps(2, generator=g, noise_range=bad)


def test_predict_shapes_and_fresh_lora_is_identity(adapter):
    """With B = 0 (gaussian init) the LoRA output equals the base; disabling adapters gives the base too."""
    name, a = adapter
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    latents = a.encode_images(pixels, generator=g)
    assert latents.shape[0] == 2 and latents.shape[-1] == 32 // a.pipe.vae_scale_factor
    cond = a.encode_prompts(["a red circle", "two blue squares"])
    t = a.sample_timesteps(2, generator=g)
    noisy, _ = a.noise_and_target(latents, torch.randn(latents.shape, generator=g), t)
    with torch.no_grad():
        base = a.predict(a.denoiser, noisy, t, cond)
        assert base.shape == latents.shape
        if not any("lora" in n for n, _ in a.denoiser.named_parameters()):
            a.add_lora(rank=4)
        fresh = a.predict(a.denoiser, noisy, t, cond)
        with adapters_disabled(a.denoiser):
            off = a.predict(a.denoiser, noisy, t, cond)
    torch.testing.assert_close(fresh, base, rtol=0, atol=0)
    torch.testing.assert_close(off, base, rtol=0, atol=0)
    assert all(p.dtype == torch.float32 for p in a.denoiser.parameters() if p.requires_grad)
    assert all("lora" in n for n, p in a.denoiser.named_parameters() if p.requires_grad)


def test_cfg_combines_in_one_batched_forward(adapter):
    name, a = adapter
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 16, 16, generator=g)
    t = a.sample_timesteps(1, generator=g)
    cond, uncond = a.encode_prompts(["a red circle"]), a.encode_prompts([""])
    with torch.no_grad():
        c = a.predict(a.denoiser, x, t, cond)
        u = a.predict(a.denoiser, x, t, uncond)
        guided = a.predict_cfg(a.denoiser, x, t, cond, uncond, scale=4.0)
    torch.testing.assert_close(guided, u + 4.0 * (c - u), rtol=1e-4, atol=1e-5)


def test_sdxl_time_ids_use_true_original_size_and_crop(tiny_pipelines):
    a = load_adapter(tiny_pipelines("sdxl"))
    cond = a.encode_prompts(["x", "y"], original_sizes=torch.tensor([[600, 400], [32, 48]]),
                            crops_top_left=torch.tensor([[5, 0], [0, 7]]), target_size=(32, 32))
    assert cond["time_ids"].tolist() == [[600, 400, 5, 0, 32, 32], [32, 48, 0, 7, 32, 32]]
    assert cond["text_embeds"].shape == (2, 32)
    rep = repeat_cond(cond, 2)
    assert rep["time_ids"].shape == (4, 6)
    torch.testing.assert_close(rep["time_ids"][2:], cond["time_ids"])


def test_missing_model_error_names_id_and_local_path_fix(tmp_path):
    with pytest.raises(OSError, match="pass the local directory"):
        load_adapter("no-such-org/no-such-model-xyz", local_files_only=True)


# x = alpha x0 + sigma eps with x0 = 1, eps = 2, written out by hand:
#   VP (alpha = 0.6, sigma = 0.8, alpha^2 + sigma^2 = 1):  x = 0.6 + 1.6 = 2.2
#     epsilon  pred = eps = 2;                x0 = (2.2 - 0.8 * 2) / 0.6 = 1
#     sample   pred = x0 = 1;                 eps = (2.2 - 0.6 * 1) / 0.8 = 2
#     v        pred = 0.6 * 2 - 0.8 * 1 = 0.4; x0 = 0.6 * 2.2 - 0.8 * 0.4 = 1,  eps = 0.8 * 2.2 + 0.6 * 0.4 = 2
#   flow (sigma = 0.25, alpha = 0.75):        x = 0.75 + 0.5 = 1.25
#     flow     pred = eps - x0 = 1;           x0 = 1.25 - 0.25 * 1 = 1,       eps = 1.25 + 0.75 * 1 = 2
HAND = {  # prediction type -> (alpha, sigma, x, pred)
    "epsilon": (0.6, 0.8, 2.2, 2.0),
    "sample": (0.6, 0.8, 2.2, 1.0),
    "v_prediction": (0.6, 0.8, 2.2, 0.4),
    "flow": (0.75, 0.25, 1.25, 1.0),
}


@pytest.mark.parametrize("ptype", list(HAND))
def test_to_x0_eps_hand_computed(ptype):
    from imgalign.sampling.noise import to_x0_eps

    alpha, sigma, x, pred = (torch.tensor(v, dtype=torch.float64) for v in HAND[ptype])
    x0, eps = to_x0_eps(pred, x, alpha, sigma, ptype)
    assert_close = torch.testing.assert_close
    assert_close(x0, torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert_close(eps, torch.tensor(2.0, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        to_x0_eps(pred, x, alpha, sigma, "velocity")


def test_adapter_to_x0_eps_round_trip(adapter):
    """The family's own conversion inverts its prediction: build x from known x0, eps at per-sample (alpha, sigma)
    of the family's schedule, form the exact prediction (epsilon: eps; v: alpha eps - sigma x0; flow: eps - x0)
    and convert back."""
    name, a = adapter
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g,
                                                                                      dtype=torch.float64)
    if a.is_flow:
        sigma = torch.tensor([0.05, 0.5, 0.97], dtype=torch.float64).view(-1, 1, 1, 1)
        alpha = 1 - sigma
    else:
        ab = a.noise_scheduler.alphas_cumprod[torch.tensor([0, 400, 999])].double().view(-1, 1, 1, 1)
        alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    x = alpha * x0 + sigma * eps
    pred = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "flow": eps - x0}[PREDICTION[name]]
    got_x0, got_eps = a.to_x0_eps(pred, x, alpha, sigma)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-9)


def test_two_named_lora_adapters_share_one_base_and_save_separately(tmp_path):
    """A second adapter ("lagged") on the same UNet: the first stays active, each adapter's forward equals diffusers
    loading that adapter's saved file into a fresh pipeline, and the two files differ."""
    import torch
    from diffusers import DiffusionPipeline

    from imgalign.models.adapters import load_adapter
    from imgalign.models.tiny import save_tiny_pipeline

    base = save_tiny_pipeline("sd15", tmp_path / "sd15")
    adapter = load_adapter(base)
    adapter.freeze_all()
    adapter.add_lora(rank=4)
    adapter.add_lora(rank=4, adapter_name="lagged")
    assert adapter.adapter_names() == ["default", "lagged"]
    torch.manual_seed(0)
    with torch.no_grad():
        for name in ("default", "lagged"):
            for p in adapter.lora_parameters(name):
                p.add_(0.05 * torch.randn_like(p))
    assert adapter.denoiser.active_adapters() == ["default"]
    adapter.save_lora(tmp_path / "default")
    adapter.save_lora(tmp_path / "lagged", adapter_name="lagged")

    x = torch.randn(1, 4, 4, 4)
    cond = adapter.encode_prompts(["a red circle"])
    t = torch.tensor([500])
    with torch.no_grad():
        out_default = adapter.predict(adapter.denoiser, x, t, cond)
        with adapter.adapter_active("lagged"):
            out_lagged = adapter.predict(adapter.denoiser, x, t, cond)
        assert torch.equal(adapter.predict(adapter.denoiser, x, t, cond), out_default)  # restored after the block
    assert (out_default - out_lagged).abs().max() > 1e-4
    for name, expected in (("default", out_default), ("lagged", out_lagged)):
        pipe = DiffusionPipeline.from_pretrained(base)
        pipe.load_lora_weights(str(tmp_path / name))
        with torch.no_grad():
            got = adapter.predict(pipe.unet, x, t, cond)  # the adapter's forward, on diffusers' loaded UNet
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_offline_hub_id_fails_at_once_with_one_message(monkeypatch):
    """HF_HUB_OFFLINE set and the id not cached: a ModelLoadError (a user error: exit 2, no traceback) before any
    download is tried, naming the id and the fix."""
    from huggingface_hub import HfApi

    from imgalign.errors import UserError
    from imgalign.models.adapters import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: pytest.fail("the hub was asked while offline"))
    with pytest.raises(ModelLoadError, match="no-such-org/offline-model.*HF_HUB_OFFLINE.*--local-dir") as err:
        load_adapter("no-such-org/offline-model")
    assert isinstance(err.value, UserError)


def test_unreachable_hub_fails_at_once_with_one_message(monkeypatch):
    from huggingface_hub import HfApi

    from imgalign.models.adapters import ModelLoadError

    def refused(*a, **k):
        raise ConnectionError("connection refused")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(HfApi, "model_info", refused)
    with pytest.raises(ModelLoadError, match="cannot be reached \\(ConnectionError\\)"):
        load_adapter("no-such-org/unreachable-model")


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_saved_lora_keeps_its_alpha_in_diffusers(family, tiny_pipelines, tmp_path):
    """rank 4, alpha 8 (scale 2): diffusers' load_lora_weights restores alpha 8 from save_lora's adapter metadata;
    without it diffusers assumes alpha = rank and the LoRA acts at half its trained strength."""
    from diffusers import DiffusionPipeline

    adapter = load_adapter(tiny_pipelines(family))
    adapter.freeze_all()
    adapter.add_lora(rank=4, alpha=8)
    adapter.save_lora(tmp_path / "lora")
    pipe = DiffusionPipeline.from_pretrained(tiny_pipelines(family), **({"text_encoder_3": None, "tokenizer_3": None}
                                                                         if family == "sd3" else {}))
    pipe.load_lora_weights(tmp_path / "lora")
    net = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    (name, config), = net.peft_config.items()
    assert config.r == 4 and config.lora_alpha == 8


def test_alpha_sigma_is_the_noising_of_noise_and_target(adapter):
    """x_t from noise_and_target equals alpha x0 + sigma eps with the family's alpha_sigma at the same t."""
    _, a = adapter
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.cat([a.sample_timesteps(1, generator=g) for _ in range(3)])
    noisy, _ = a.noise_and_target(x0, eps, t)
    alpha, sigma = a.alpha_sigma(t, x0)
    assert alpha.shape == (3, 1, 1, 1)
    torch.testing.assert_close(noisy, alpha * x0 + sigma * eps, rtol=1e-5, atol=1e-5)
