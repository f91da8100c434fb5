"""RLG / NPO guidance inside real diffusers pipelines (tiny SD1.5, SDXL, SD3, FLUX built in code)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from imgalign.guidance import BASE, NPOGuidance, RLGuidance, apply_guidance, cfg, denoiser_of, generate, rlg


@functools.cache
def _pipe_with_lora(family: str):
    """A tiny pipeline whose denoiser carries a random (non-zero) LoRA adapter named 'aligned'."""
    from peft import LoraConfig

    from imgalign.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    for module in pipe.components.values():  # built in code -> train mode; T5 dropout would make runs differ
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    net = denoiser_of(pipe)
    net.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                    adapter_name="aligned")
    torch.manual_seed(1)
    for name, p in net.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.3)
    return pipe


def _kwargs(family):
    kw = dict(prompt=["a red circle", "two blue squares"], num_inference_steps=2, height=32, width=32, output_type="pt")
    if family != "flux":
        kw["guidance_scale"] = 4.0
    return kw


def _run(pipe, guidance=None, adapter_on=True, **kw):
    net = denoiser_of(pipe)
    if not adapter_on:
        net.disable_adapters()
    try:
        return generate(pipe, guidance, generator=torch.Generator().manual_seed(0), **kw).images
    finally:
        net.enable_adapters()


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_rlg_weight_0_and_1_reproduce_base_and_aligned_exactly(family):
    pipe, kw = _pipe_with_lora(family), _kwargs(family)
    base, aligned = _run(pipe, adapter_on=False, **kw), _run(pipe, **kw)
    assert (base - aligned).abs().max() > 1e-3  # the adapter matters
    assert torch.equal(_run(pipe, RLGuidance(weight=0.0, aligned="aligned"), **kw), base)
    assert torch.equal(_run(pipe, RLGuidance(weight=1.0, aligned="aligned"), **kw), aligned)
    # in between, mixed-adapter batch; equal to running the branches one by one (checked on SD1.5)
    mid = _run(pipe, RLGuidance(weight=0.5, aligned="aligned", batched=True), **kw)
    assert (mid - base).abs().max() > 1e-4 and (mid - aligned).abs().max() > 1e-4
    if family == "sd15":
        seq = _run(pipe, RLGuidance(weight=0.5, aligned="aligned"), **kw)
        torch.testing.assert_close(mid, seq, atol=1e-5, rtol=0)


def test_rlg_matches_cfg_inside_each_model_per_step():
    """The hook's per-step output equals rlg(cfg(base_u, base_c), cfg(aligned_u, aligned_c), w) (reference order)."""
    pipe = _pipe_with_lora("sd15")
    unet = pipe.unet
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    emb = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(4))  # [uncond; cond]
    t = torch.tensor(500)
    with torch.no_grad():
        aligned = unet(x, t, encoder_hidden_states=emb).sample
        unet.disable_adapters()
        base = unet(x, t, encoder_hidden_states=emb).sample
        unet.enable_adapters()
        expected = rlg(cfg(base[:1], base[1:], 4.0), cfg(aligned[:1], aligned[1:], 4.0), 1.7)
        pipe._guidance_scale = 4.0  # what the pipeline sets during a call
        with apply_guidance(pipe, RLGuidance(weight=1.7, aligned="aligned", batched=True)) as hook:
            out = unet(x, t, encoder_hidden_states=emb).sample
        assert hook.forward_calls == 1  # base and aligned branches in one mixed-batch forward
    # float32: the mixed batch of 4 takes other BLAS reduction orders than two batches of 2, and CFG (x4) and RLG
    # (x1.7) amplify the rounding; seen up to 1.3e-5 on a busy 2-core machine. A wrong combination is off by O(0.1).
    torch.testing.assert_close(cfg(out[:1], out[1:], 4.0), expected, atol=5e-5, rtol=0)
    # shared_uncond (3 evaluations): b_u + s (b_c - b_u) + w s (a_c - b_c)
    with torch.no_grad(), apply_guidance(pipe, RLGuidance(weight=1.7, aligned="aligned", shared_uncond=True)):
        out = unet(x, t, encoder_hidden_states=emb).sample
    bu, bc, ac = base[:1], base[1:], aligned[1:]
    torch.testing.assert_close(cfg(out[:1], out[1:], 4.0), bu + 4.0 * (bc - bu) + 1.7 * 4.0 * (ac - bc), atol=1e-5, rtol=1e-5)


def test_zero_init_steps_use_the_aligned_model_first():
    pipe, kw = _pipe_with_lora("sd15"), _kwargs("sd15")
    aligned = _run(pipe, **kw)
    # all steps aligned-only -> the aligned pipeline, whatever w is
    assert torch.equal(_run(pipe, RLGuidance(weight=0.0, aligned="aligned", zero_init_steps=2), **kw), aligned)
    part = _run(pipe, RLGuidance(weight=0.0, aligned="aligned", zero_init_steps=1), **kw)
    assert (part - aligned).abs().max() > 1e-4 and (part - _run(pipe, adapter_on=False, **kw)).abs().max() > 1e-4


def test_two_networks_and_npo_with_negative_equal_to_base_is_cfg():
    pipe, kw = _pipe_with_lora("sd15"), _kwargs("sd15")
    base = _run(pipe, adapter_on=False, **kw)
    aligned = _run(pipe, **kw)
    # NPO with the negative model == the base model (adapter name or a separate copy) reproduces plain CFG
    assert torch.equal(_run(pipe, NPOGuidance(negative=BASE, positive=BASE), **kw), base)
    base_copy = copy.deepcopy(pipe.unet)
    base_copy.disable_adapters()
    torch.testing.assert_close(_run(pipe, NPOGuidance(negative=base_copy, positive=BASE), **kw), base, atol=1e-5, rtol=0)
    # a different negative model changes the images; positive = aligned adapter, negative = base copy
    assert (_run(pipe, NPOGuidance(negative="aligned", positive=BASE), **kw) - base).abs().max() > 1e-4
    # RLG with the aligned model as a second network (full fine-tuning case): w = 1 reproduces it
    aligned_net = copy.deepcopy(pipe.unet)  # adapter enabled: this network *is* the aligned model
    torch.testing.assert_close(_run(pipe, RLGuidance(weight=1.0, aligned=aligned_net), **kw), aligned, atol=1e-5, rtol=0)


def test_flux_npo_needs_true_cfg_and_unknown_adapter_is_an_error():
    pipe = _pipe_with_lora("flux")
    with pytest.raises(ValueError, match="true CFG"):
        _run(pipe, NPOGuidance(negative="aligned"), **_kwargs("flux"))
    kw = dict(_kwargs("flux"), negative_prompt="", true_cfg_scale=3.0)
    base = _run(pipe, adapter_on=False, **kw)
    assert torch.equal(_run(pipe, NPOGuidance(negative=BASE, positive=BASE), **kw), base)
    assert (_run(pipe, NPOGuidance(negative="aligned", positive=BASE), **kw) - base).abs().max() > 1e-5
    with pytest.raises(ValueError, match="not a LoRA adapter"):
        _run(pipe, RLGuidance(weight=0.5, aligned="dpo"), **_kwargs("flux"))
