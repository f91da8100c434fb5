"""Diffusion-DPO end to end on tiny SD1.5, SD2 (v-prediction), SDXL, SD3 and FLUX pipelines loaded by path."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgalign.config import ConfigError, load_config
from imgalign.recipes import diffusion_dpo

FAMILIES = ("sd15", "sd2-v", "sdxl", "sd3", "flux")


def make_cfg(pipeline: str, pairs: str, out: Path, *extra: str):
    return load_config(diffusion_dpo.Config, None, [
        f"model.pretrained={pipeline}", f"data.source={pairs}", "data.resolution=32", f"run.output_dir={out}",
        "run.max_steps=3", "run.batch_size=2", "run.checkpoint_every=1", "run.keep_last=2", "run.progress=false",
        "optim.lr=1e-3", "lora.rank=4", "validation.num_inference_steps=2", "validation.images_per_prompt=1",
        *extra,
    ])


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_steps_train_every_lora_param_log_checkpoint_and_load(family, tiny_pipelines, tiny_pairs, tmp_path):
    out = tmp_path / "run"
    base_dir = tiny_pipelines(family)
    result = diffusion_dpo.train(make_cfg(base_dir, tiny_pairs, out, "validation.reward=toy"))
    hist = result["history"]
    assert [v["step"] for v in result["validation"]] == [0, 3]
    assert all(0.0 <= v["val/toy"] <= 1.0 for v in result["validation"])
    assert [h["step"] for h in hist] == [1, 2, 3]

    # step 1 is measured before any update: a fresh LoRA (B = 0) makes policy == reference, so the
    # sigmoid loss is exactly log 2 and every pair's implicit margin is 0 (ties count one half)
    assert hist[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert hist[0]["train/rewards/accuracies"] == pytest.approx(0.5)
    assert hist[0]["train/rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for key in ("model_err_w", "model_err_l", "ref_err_w", "ref_err_l", "rewards/chosen", "rewards/rejected", "lr"):
        assert math.isfinite(hist[-1][f"train/{key}"])

    # checkpoints every step, pruned to the newest 2; run record; TensorBoard events; validation grids
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert {"config.yaml", "versions.json", "git_revision.txt"} <= {p.name for p in out.iterdir()}
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000000.png", "step-000003.png"]

    # every LoRA parameter changed: B starts at 0, A at a seeded gaussian; compare with a fresh adapter
    from imgalign.models.adapters import load_adapter

    fresh = load_adapter(base_dir)
    fresh.add_lora(rank=4)
    trained = lora_weights(out)
    initial = fresh.lora_state_dict()
    assert trained.keys() == {f"{fresh.denoiser_name}.{k}" for k in initial} or trained.keys() == initial.keys()
    unchanged = [k for k, v in trained.items() if torch.equal(v, initial.get(k, initial.get(k.split(".", 1)[1])))]
    assert not unchanged, f"LoRA params that did not change: {unchanged[:5]}"

    # the saved LoRA loads with diffusers' load_lora_weights and changes the pipeline's output
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base_dir)
    kw = dict(prompt="a red square", num_inference_steps=2, height=32, width=32, output_type="pt")
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(str(out))
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert (after - before).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_kill_and_resume_equals_uninterrupted(family, tiny_pipelines, tiny_pairs, tmp_path, run_killed, assert_same_continuation):
    pipe = tiny_pipelines(family)
    extra = ("run.max_steps=4", "run.checkpoint_every=2", "run.grad_accum=2", "run.keep_last=0",
             "optim.lr_scheduler=cosine", "optim.warmup_steps=1", "data.hflip=true", "data.random_crop=true")
    full = diffusion_dpo.train(make_cfg(pipe, tiny_pairs, tmp_path / "full", *extra))

    # the same run killed during step 3 (after checkpoint-2 was written) ...
    # micro-steps 1-4 = steps 1-2; die in step 3
    run_killed(diffusion_dpo, "_step", 6,
               lambda: diffusion_dpo.train(make_cfg(pipe, tiny_pairs, tmp_path / "killed", *extra)))
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]
    (tmp_path / "killed" / ".checkpoint-4.tmp").mkdir()  # a half-written save is never picked up

    # ... and resumed from the latest checkpoint reproduces the uninterrupted run
    resumed = diffusion_dpo.train(make_cfg(pipe, tiny_pairs, tmp_path / "killed", *extra, "run.resume_from=latest"))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    w = "pytorch_lora_weights.safetensors"
    assert_same_continuation(full["history"], resumed["history"], ("train/loss",),
                             [(tmp_path / "full" / w, tmp_path / "killed" / w)], rel=0, abs=1e-6)
    assert_same_continuation(full["history"], resumed["history"], ("train/lr",), rel=1e-9, abs=0)


def test_dpo_gradient_step_moves_toward_the_winner(tiny_pipelines, tiny_pairs):
    """Gradient sign, measured deterministically: one small step along the recipe's gradient on every training
    pair, at fixed noise and timesteps, lowers the DPO loss of those pairs from log 2 and makes the implicit
    margin (winner preferred) positive. (The training loss of a few noisy steps on a random tiny model is not
    a measurement: at beta 5000 its per-batch spread is larger than any trend.)"""
    import contextlib
    import types

    from imgalign.data import PairTransform, collate_pairs, load_preference_pairs
    from imgalign.models.adapters import load_adapter

    pipe = tiny_pipelines("sd15")
    cfg = make_cfg(pipe, tiny_pairs, Path("unused"))
    adapter = load_adapter(pipe)
    adapter.freeze_all()
    adapter.add_lora(rank=4)
    data = load_preference_pairs(tiny_pairs)
    transform = PairTransform(32, hflip=False)
    batch = collate_pairs([transform(data[i], index=i) for i in range(len(data))])
    acc = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext)

    def loss_and_margin():
        gens = [torch.Generator().manual_seed(100 + j) for j in range(len(data))]  # the same draws every call
        return diffusion_dpo._step(adapter, adapter.denoiser, None, batch, gens, cfg, acc)

    loss0, m0 = loss_and_margin()
    assert float(loss0.detach()) == pytest.approx(math.log(2), abs=1e-6) and float(m0["rewards/margins"]) == 0
    loss0.backward()
    params = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    with torch.no_grad():
        for p in params:
            p -= 1e-3 * p.grad / norm
    with torch.no_grad():
        loss1, m1 = loss_and_margin()
    assert float(loss1) < math.log(2)
    assert float(m1["rewards/margins"]) > 0


def test_full_finetuning_uses_a_frozen_reference(tiny_pipelines, tiny_pairs, tmp_path):
    out = tmp_path / "full"
    result = diffusion_dpo.train(make_cfg(tiny_pipelines("sd15"), tiny_pairs, out, "lora.enabled=false",
                                          "run.max_steps=2", "optim.lr=1e-4"))
    # step 1 runs before any update, so the frozen copy and the trained network agree: compare the errors
    # themselves (beta 5000 would magnify fp32 rounding between the two copies in the loss)
    first = result["history"][0]
    for half in ("w", "l"):
        assert first[f"train/model_err_{half}"] == pytest.approx(first[f"train/ref_err_{half}"], rel=1e-6)
    assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-3)
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_pipelines("sd15"), subfolder="unet")
    tuned = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    changed = [not torch.equal(a, b) for a, b in zip(base.parameters(), tuned.parameters())]
    assert sum(changed) / len(changed) > 0.9
    assert (out / "checkpoint-2" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_kept_ties_are_trained_symmetrically():
    """label 0.5: loss = 0.5 L(w, l) + 0.5 L(l, w). With errors (w: 1.0, l: 1.2), reference 0 everywhere and
    beta = 1: L(w, l) = -log sig(-(1/2)(1.0 - 1.2)) = -log sig(0.1) = 0.644397; L(l, w) = -log sig(-0.1) = 0.744397;
    tie loss = 0.694397."""
    cfg = diffusion_dpo.LossConfig(beta=1.0)
    model_err = torch.tensor([1.0, 1.0, 1.2, 1.2])
    losses, _, _ = diffusion_dpo.dpo_losses(model_err, torch.zeros(4), torch.tensor([1.0, 0.5]), cfg)
    torch.testing.assert_close(losses, torch.tensor([0.644397, 0.694397]), atol=1e-6, rtol=0)


def test_noise_range_reaches_the_sampled_timesteps(tiny_pipelines, tiny_pairs, tmp_path, monkeypatch):
    """loss.noise_range=[0.6, 1] trains on t >= 600 only; a bad range fails before any model is loaded."""
    from imgalign.models import adapters

    seen = []
    original = adapters._DDPMAdapter.sample_timesteps

    def recording(self, n, generator=None, noise_range=(0.0, 1.0)):
        t = original(self, n, generator=generator, noise_range=noise_range)
        seen.append(t)
        return t

    monkeypatch.setattr(adapters._DDPMAdapter, "sample_timesteps", recording)
    diffusion_dpo.train(make_cfg(tiny_pipelines("sd15"), tiny_pairs, tmp_path / "r", "run.checkpoint_every=0",
                                 "loss.noise_range=[0.6,1.0]"))
    t = torch.cat(seen)
    assert len(t) == 3 * 2 and t.min() >= 600 and t.max() < 1000
    with pytest.raises(ValueError, match=r"loss\.noise_range.*0 <= lo < hi <= 1"):
        diffusion_dpo.train(make_cfg("no/such/model", tiny_pairs, tmp_path / "bad", "loss.noise_range=[0.9,0.2]"))


def test_unknown_config_key_names_the_closest(tiny_pipelines, tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        load_config(diffusion_dpo.Config, None, ["model.pretrained=x", "data.source=y", "optim.lrr=1e-5"])
    yaml = tmp_path / "bad.yaml"
    yaml.write_text("model:\n  pretrained: x\ndata:\n  source: y\n  resolutoin: 64\n")
    proc = subprocess.run([sys.executable, "-m", "imgalign.cli", "train", "diffusion-dpo", "--config", str(yaml)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "data.resolutoin" in proc.stderr and "data.resolution" in proc.stderr and str(yaml) in proc.stderr
    # overrides after --config, as the README writes them
    yaml.write_text("model:\n  pretrained: x\ndata:\n  source: y\n")
    proc = subprocess.run([sys.executable, "-m", "imgalign.cli", "train", "diffusion-dpo", "--config", str(yaml),
                           "optim.lrr=1e-5"], capture_output=True, text=True)
    assert proc.returncode == 2 and "did you mean 'optim.lr'" in proc.stderr and "command line" in proc.stderr


def test_shipped_configs_parse():
    for path in sorted(Path("configs/diffusion_dpo").glob("*.yaml")):
        cfg = load_config(diffusion_dpo.Config, path)
        assert cfg.loss.resolved_beta > 0 and cfg.model.pretrained


def test_two_process_run_saves_every_rank_state(tiny_pipelines, tiny_pairs, tmp_path):
    """DDP over gloo on CPU (torchrun): collectives and checkpoint saves run on both ranks."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "imgalign.cli", "train",
           "diffusion-dpo", f"model.pretrained={tiny_pipelines('sd15')}", f"data.source={tiny_pairs}",
           "data.resolution=32", f"run.output_dir={out}", "run.max_steps=2", "run.batch_size=2",
           "run.checkpoint_every=1", "run.progress=false", "validation.num_inference_steps=2", "run.log_with=none"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 pairs x 1 accum x 2 procs = 4 pairs/step" in proc.stdout
    ckpt = out / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert (out / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_cached_latents_bf16_and_gradient_checkpointing(family, tiny_pipelines, tiny_pairs, tmp_path):
    out = tmp_path / "cached"
    result = diffusion_dpo.train(make_cfg(tiny_pipelines(family), tiny_pairs, out, "data.cache_latents=true",
                                          "run.mixed_precision=bf16", "run.gradient_checkpointing=true",
                                          "run.max_steps=2", "run.checkpoint_every=0"))
    hist = result["history"]
    assert hist[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-3)  # bf16 forward: equal up to rounding
    assert all(math.isfinite(h["train/loss"]) for h in hist)
    w = lora_weights(out)
    assert all(v.dtype == torch.float32 for v in w.values())
    assert any(v.abs().sum() > 0 for k, v in w.items() if "lora_B" in k or "lora.up" in k)


def test_generate_and_env_commands(tiny_pipelines, tmp_path):
    from imgalign.cli import main

    assert main(["generate", "--model", tiny_pipelines("sd15"), "--prompt", "a red circle", "--prompt", "a blue square",
                 "--out", str(tmp_path / "gen"), "--steps", "2", "--size", "32", "--num-images", "2"]) == 0
    assert len(list((tmp_path / "gen").glob("*.png"))) == 4
    assert (tmp_path / "gen" / "prompts.txt").read_text().splitlines() == ["a red circle"] * 2 + ["a blue square"] * 2
    assert main(["env"]) == 0


# ---- MaPO (reference-free, pairs) and Diffusion-KTO (unpaired images) ------------------------------------------


def assert_every_lora_param_changed(base_dir: str, out: Path, rank: int = 4):
    """B starts at 0, A at a seeded gaussian: compare the saved LoRA with a fresh adapter."""
    from imgalign.models.adapters import load_adapter

    fresh = load_adapter(base_dir)
    fresh.add_lora(rank=rank)
    trained, initial = lora_weights(out), fresh.lora_state_dict()
    assert trained and len(trained) == len(initial)
    unchanged = [k for k, v in trained.items() if torch.equal(v, initial.get(k, initial.get(k.split(".", 1)[1])))]
    assert not unchanged, f"LoRA params that did not change: {unchanged[:5]}"


def test_mapo_is_reference_free_and_trains_every_lora_param(tiny_pipelines, tiny_pairs, tmp_path, monkeypatch, capsys):
    """loss.loss_type=[mapo]: no reference forward (the adapter is never disabled), beta is MaPO's (0.1 by default),
    the banner says so, and 2 steps change every LoRA parameter."""
    from imgalign.models import adapters
    from imgalign.recipes import common

    def no_reference(*args, **kwargs):
        raise AssertionError("MaPO is reference-free: the recipe ran a reference forward")

    monkeypatch.setattr(adapters, "adapters_disabled", no_reference)
    monkeypatch.setattr(common, "adapters_disabled", no_reference)
    base, out = tiny_pipelines("sd15"), tmp_path / "mapo"
    cfg = make_cfg(base, tiny_pairs, out, "loss.loss_type=[mapo]", "loss.params={snr_value: 0.5}", "run.max_steps=2",
                   "run.checkpoint_every=0")
    assert cfg.loss.beta is None and cfg.loss.resolved_beta == pytest.approx(0.1)
    hist = diffusion_dpo.train(cfg)["history"]
    assert "reference-free (no reference forward)" in capsys.readouterr().out
    assert [h["step"] for h in hist] == [1, 2] and all(math.isfinite(h["train/loss"]) for h in hist)
    first = hist[0]
    assert "train/ref_err_w" not in first  # nothing of a reference is logged
    # MaPO's rewards f(err) = s err / (exp(s err) - 1) lie in (0, 1], decreasing in the error
    assert 0 < first["train/rewards/chosen"] <= 1 and 0 < first["train/rewards/rejected"] <= 1
    assert first["train/rewards/margins"] == pytest.approx(
        first["train/rewards/chosen"] - first["train/rewards/rejected"], abs=1e-6)
    # the loss is L_w - beta * logsig(.) >= the winners' error
    assert first["train/loss"] >= first["train/model_err_w"] - 1e-6
    assert_every_lora_param_changed(base, out)


def _square(colour, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = torch.full((40, 48, 3), 255, dtype=torch.uint8)
    arr[8:32, 10:34] = torch.tensor(colour, dtype=torch.uint8)
    arr = (arr.int() + torch.randint(-10, 10, arr.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(arr.numpy())


def test_kto_on_unpaired_images_step0_loss_is_analytic(tiny_pipelines, tmp_path, capsys):
    """Diffusion-KTO on a JSONL of 6 unpaired images (rows 0-3 red, desirable; rows 4-5 blue, undesirable), batch 6:
    step 1 sees every image once, before any update. A fresh LoRA (B = 0) makes the policy the reference, so every
    implicit reward g = err_ref - err is 0 and the reference point z = max(0, mean g) = 0. With lambda_d = 1 and
    lambda_u = 2 a desirable image costs lambda_d (1 - sigma(beta (0 - 0))) = 1 * (1 - 1/2) = 0.5 and an undesirable
    one lambda_u (1 - sigma(-beta (0 - 0))) = 2 * 0.5 = 1.0, so the step-1 loss (the mean over images) is
    (4 * 0.5 + 2 * 1.0) / 6 = 2/3 = 0.666667; every image is on z: rewards/accuracies 0.5, kl 0, margins 0."""
    from imgalign.data import write_unpaired_jsonl

    rows = [("a red square", _square((220, 30, 30), i), True) for i in range(4)]
    rows += [("a red square", _square((30, 30, 220), 10 + i), False) for i in range(2)]
    data = write_unpaired_jsonl(tmp_path / "data" / "unpaired.jsonl", tmp_path / "data" / "images", rows)
    base, out = tiny_pipelines("sd15"), tmp_path / "kto"
    hist = diffusion_dpo.train(make_cfg(base, data, out, "loss.loss_type=[kto]", "run.batch_size=6", "run.max_steps=2",
                                        "run.checkpoint_every=0", "loss.params={lambda_d: 1.0, lambda_u: 2.0}"))["history"]
    banner = capsys.readouterr().out
    assert "kept 4 desirable + 2 undesirable images" in banner and "6 images/step" in banner
    first = hist[0]
    assert first["train/loss"] == pytest.approx(2 / 3, abs=1e-6)
    assert first["train/rewards/accuracies"] == 0.5 and first["train/kl"] == 0.0
    assert first["train/rewards/margins"] == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(hist[1]["train/loss"])
    assert_every_lora_param_changed(base, out)


def test_kto_on_split_pairs_with_cached_latents(tiny_pipelines, tiny_pairs, tmp_path, capsys):
    """Pairs split into unpaired images: the first 4 rows of tiny_pairs (4 decided pairs) give 4 desirable winners and
    4 undesirable losers; batch 8 = all of them in step 1. At a fresh LoRA g = 0 and z = 0 (see above), so with
    lambda_d = 1, lambda_u = 0.5 the step-1 loss is (4 * 1 * 0.5 + 4 * 0.5 * 0.5) / 8 = 3/8 = 0.375."""
    hist = diffusion_dpo.train(make_cfg(tiny_pipelines("sd15"), tiny_pairs, tmp_path / "kto", "loss.loss_type=[kto]",
                                        "data.max_rows=4", "run.batch_size=8", "run.max_steps=2", "run.checkpoint_every=0",
                                        "data.cache_latents=true", "loss.params={lambda_d: 1.0, lambda_u: 0.5}"))["history"]
    assert "split into 4 desirable + 4 undesirable images" in capsys.readouterr().out
    assert hist[0]["train/loss"] == pytest.approx(0.375, abs=1e-6)
    assert hist[0]["train/rewards/accuracies"] == 0.5
    assert all(math.isfinite(h["train/loss"]) for h in hist)


def test_mapo_and_kto_config_errors(tiny_pipelines, tiny_pairs, tmp_path):
    """Names, parameters, ties and layouts are checked before any model loads, naming the key and the fix."""
    from imgalign.data import write_unpaired_jsonl

    def cfg(*extra):
        return load_config(diffusion_dpo.Config, None, ["model.pretrained=x", f"data.source={tiny_pairs}", *extra])

    # beta null: the selected loss's default (the DPO family's paper convention, MaPO's, Diffusion-KTO's)
    assert cfg().loss.resolved_beta == 5000.0 and cfg("loss.loss_type=[kto]").loss.resolved_beta == 1000.0
    assert cfg("loss.loss_type=[mapo]", "loss.beta=0.5").loss.resolved_beta == 0.5
    with pytest.raises(ConfigError, match=r"loss\.loss_type: unknown loss type 'mapoo'; did you mean 'mapo'"):
        cfg("loss.loss_type=[mapoo]")
    with pytest.raises(ConfigError, match=r"loss\.loss_type: kto is trained alone"):
        cfg("loss.loss_type=[kto,sigmoid]")
    with pytest.raises(ConfigError, match=r"loss\.params: parameter 'lambda_w'.*did you mean 'lambda_u'.*lambda_d"):
        cfg("loss.loss_type=[kto]", "loss.params={lambda_w: 1.0}")
    with pytest.raises(ConfigError, match=r"data\.keep_ties=true.*\[kto\].*data\.keep_ties=false"):
        cfg("loss.loss_type=[kto]", "data.keep_ties=true")
    with pytest.raises(ConfigError, match=r"data\.layout=unpaired.*loss\.loss_type=\[kto\]"):
        cfg("data.layout=unpaired")
    # an unpaired JSONL is detected by its keys: with a pair loss it is refused before the model loads
    data = write_unpaired_jsonl(tmp_path / "u.jsonl", tmp_path / "img", [("a red square", _square((220, 30, 30), 0), 1)])
    with pytest.raises(ConfigError, match=r"unpaired images.*loss\.loss_type=\[kto\]"):
        diffusion_dpo.train(make_cfg("no/such/model", str(data), tmp_path / "r"))
