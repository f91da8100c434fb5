"""`adapter.encode_uncond` equals the negative embeddings each family's own pipeline builds when no negative prompt
is given (`pipe.encode_prompt` with the family's default arguments), on tiny pipelines loaded by path."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from imgalign.models.adapters import load_adapter

PROMPTS = ["a red circle", "two blue squares"]


@pytest.mark.parametrize("family", ["sd15", "sd2-v"])
def test_sd_uncond_is_the_pipelines_encoded_empty_prompt(family, tiny_pipelines):
    """SD1.x/2.x: negative_prompt None -> uncond_tokens = [""] * batch, encoded by the text encoder."""
    a = load_adapter(tiny_pipelines(family))
    with torch.no_grad():
        _, negative = a.pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    uncond = a.encode_uncond(len(PROMPTS), a.encode_prompts(PROMPTS))
    assert set(uncond) == {"encoder_hidden_states"}
    assert_close(uncond["encoder_hidden_states"], negative, rtol=0, atol=0)
    assert_close(a.encode_uncond(len(PROMPTS))["encoder_hidden_states"], negative, rtol=0, atol=0)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_sdxl_uncond_follows_force_zeros_and_keeps_the_positive_time_ids(force_zeros, tiny_pipelines):
    """SDXL: zeros (sequence and pooled) when force_zeros_for_empty_prompt (the pipeline's default, set in the
    tiny one), else "" through both encoders; the time ids are the positive branch's (negative_add_time_ids =
    add_time_ids in StableDiffusionXLPipeline.__call__ without negative micro-conditioning)."""
    a = load_adapter(tiny_pipelines("sdxl"))
    assert a.pipe.config.force_zeros_for_empty_prompt is True  # the saved tiny pipeline's default
    a.pipe.register_to_config(force_zeros_for_empty_prompt=force_zeros)
    with torch.no_grad():
        _, negative, _, negative_pooled = a.pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                               do_classifier_free_guidance=True)
    cond = a.encode_prompts(PROMPTS, original_sizes=torch.tensor([[600, 400], [32, 48]]),
                            crops_top_left=torch.tensor([[5, 0], [0, 7]]))
    uncond = a.encode_uncond(len(PROMPTS), cond)
    assert set(uncond) == set(cond)
    if force_zeros:
        assert not negative.any() and not negative_pooled.any()
    assert_close(uncond["encoder_hidden_states"], negative, rtol=0, atol=0)
    assert_close(uncond["text_embeds"], negative_pooled, rtol=0, atol=0)
    assert_close(uncond["time_ids"], cond["time_ids"], rtol=0, atol=0)
    # without a positive branch: the default time ids of encode_prompts (resolution of the UNet, no crop)
    alone = a.encode_uncond(len(PROMPTS))
    assert_close(alone["encoder_hidden_states"], negative, rtol=0, atol=0)
    assert alone["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    with pytest.raises(ValueError, match="positive branch of 2 samples"):
        a.encode_uncond(3, cond)


def test_sd3_uncond_is_the_pipelines_encoded_empty_prompt_with_all_three_encoders(tiny_pipelines):
    """SD3: negative_prompt defaults to "" and is encoded by CLIP-L, CLIP-G and T5 (same max_sequence_length)."""
    a = load_adapter(tiny_pipelines("sd3"))
    assert a.pipe.text_encoder_3 is not None
    with torch.no_grad():
        _, negative, _, negative_pooled = a.pipe.encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, device="cpu", do_classifier_free_guidance=True,
            max_sequence_length=a.max_sequence_length)
    uncond = a.encode_uncond(len(PROMPTS), a.encode_prompts(PROMPTS))
    assert set(uncond) == {"encoder_hidden_states", "pooled_projections"}
    assert_close(uncond["encoder_hidden_states"], negative, rtol=0, atol=0)
    assert_close(uncond["pooled_projections"], negative_pooled, rtol=0, atol=0)


def test_flux_uncond_is_what_true_cfg_encodes_for_an_empty_negative_prompt(tiny_pipelines):
    """FluxPipeline.encode_prompt returns no negative embeddings: CFG exists only as true CFG, which encodes the
    negative prompt like a positive one (prompt_2 defaulting to prompt). So encode_uncond == encode_prompts([""])
    == pipe.encode_prompt("" per sample)."""
    a = load_adapter(tiny_pipelines("flux"))
    with torch.no_grad():
        embeds, pooled, _ = a.pipe.encode_prompt([""] * len(PROMPTS), None, device="cpu",
                                                 max_sequence_length=a.max_sequence_length)
    uncond = a.encode_uncond(len(PROMPTS), a.encode_prompts(PROMPTS))
    assert set(uncond) == {"encoder_hidden_states", "pooled_projections"}
    empty = a.encode_prompts([""] * len(PROMPTS))
    for key in uncond:
        assert_close(uncond[key], empty[key], rtol=0, atol=0)
    assert_close(uncond["encoder_hidden_states"], embeds, rtol=0, atol=0)
    assert_close(uncond["pooled_projections"], pooled, rtol=0, atol=0)
