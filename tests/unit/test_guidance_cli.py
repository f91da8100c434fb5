"""`imgalign generate` guidance options, through the same loading code as real models (tiny SD1.5 by path)."""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from imgalign.cli import main
from imgalign.guidance.cli import add_guidance_arguments, prepare_guidance
from imgalign.models.adapters import load_adapter


def _parse(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("--lora")
    add_guidance_arguments(p)
    return p.parse_args(list(argv))


def test_cli_rlg_and_npo_with_saved_lora_and_negative_model(tiny_pipelines, tmp_path):
    model = tiny_pipelines("sd15")
    _random_lora(model, tmp_path / "lora")
    kw = dict(prompt="a red circle", num_inference_steps=2, height=32, width=32, guidance_scale=4.0, output_type="pt")

    def images(*argv):
        adapter = load_adapter(model)
        args = _parse(*argv)
        if args.lora:
            adapter.pipe.load_lora_weights(args.lora)
        return prepare_guidance(args, adapter)(generator=torch.Generator().manual_seed(0), **kw).images

    base = images()
    aligned = images("--lora", str(tmp_path / "lora"))
    assert torch.equal(images("--guidance", "rlg", "--aligned", str(tmp_path / "lora"), "--rlg-scale", "1"),
                       aligned)
    # the LoRA fused into a second network: the same aligned model (up to float rounding of the fused weights),
    # and RLG between the two networks matches RLG between the adapter switched on and off
    lora = str(tmp_path / "lora")
    fused = images("--guidance", "rlg", "--aligned", lora, "--rlg-scale", "1", "--rlg-fuse-aligned")
    torch.testing.assert_close(fused, aligned, atol=1e-4, rtol=0)
    assert (fused - base).abs().max() > 1e-2  # the LoRA changes the images, so the check above has teeth
    torch.testing.assert_close(images("--guidance", "rlg", "--aligned", lora, "--rlg-scale", "1.5", "--rlg-fuse-aligned"),
                               images("--guidance", "rlg", "--aligned", lora, "--rlg-scale", "1.5"), atol=1e-4, rtol=0)
    # NPO with the base model itself as the (full) negative model is plain CFG
    torch.testing.assert_close(images("--guidance", "npo", "--negative", model), base, atol=1e-5, rtol=0)
    # weight-space merge: positive = --lora, negative = base + delta_neg + (1 - beta) delta_pos with beta = 1 and
    # delta_neg = the same LoRA -> negative == positive, so NPO is plain CFG of the positive (aligned) model
    merged = images("--lora", str(tmp_path / "lora"), "--guidance", "npo", "--negative", str(tmp_path / "lora"),
                    "--npo-merge-beta", "1")
    torch.testing.assert_close(merged, aligned, atol=1e-4, rtol=0)


def _random_lora(model, out):
    trained = load_adapter(model)
    trained.add_lora(rank=4)
    torch.manual_seed(0)
    for n, p in trained.denoiser.named_parameters():
        if "lora_B" in n:
            p.data.normal_(std=0.3)
    trained.save_lora(out)


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_generate_command_rlg_scale_one_equals_the_aligned_lora(family, tiny_pipelines, tmp_path):
    model = tiny_pipelines(family)
    _random_lora(model, tmp_path / "lora")
    common = ["generate", "--model", model, "--prompt", "a red circle", "--steps", "2", "--size", "32"]

    def pngs(name, *extra):
        assert main([*common, "--out", str(tmp_path / name), *extra]) == 0
        return np.asarray(Image.open(tmp_path / name / "00000_00.png"))

    aligned = pngs("aligned", "--lora", str(tmp_path / "lora"))
    base = pngs("base")
    assert np.array_equal(pngs("rlg1", "--guidance", "rlg", "--aligned", str(tmp_path / "lora"), "--rlg-scale", "1"),
                          aligned)
    assert np.array_equal(pngs("rlg0", "--guidance", "rlg", "--aligned", str(tmp_path / "lora"), "--rlg-scale", "0"),
                          base)
    assert not np.array_equal(aligned, base)


def test_generate_command_rlg_without_aligned_is_a_clear_error(tiny_pipelines, tmp_path):
    with pytest.raises(SystemExit, match="--aligned PATH"):
        main(["generate", "--model", tiny_pipelines("sd15"), "--prompt", "x", "--steps", "1", "--size", "32",
              "--out", str(tmp_path), "--guidance", "rlg"])
