"""Diffusion-DRO on tiny pipelines: the replay buffer, the lagged sampler, steps on every family, kill and resume.
The hinge itself is tested on hand-computed values in tests/unit/test_losses_diffusion.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgalign.config import load_config
from imgalign.recipes import diffusion_dro

FAMILIES = ("sd15", "sd2-v", "sdxl", "sd3", "flux")


def make_cfg(pipeline: str, pairs: str, out: Path, *extra: str):
    return load_config(diffusion_dro.Config, None, [
        f"model.pretrained={pipeline}", f"data.source={pairs}", "data.resolution=32", f"run.output_dir={out}",
        "run.max_steps=3", "run.batch_size=2", "run.checkpoint_every=1", "run.keep_last=2", "run.progress=false",
        "run.log_with=none", "optim.lr=1e-3", "lora.rank=4", "dro.sample_steps=3", "dro.buffer_batch=2",
        "validation.num_inference_steps=1", "validation.images_per_prompt=1", *extra,
    ])


def test_buffer_fifo_sampling_and_save_restore(tmp_path):
    """FIFO keeps the newest `size` trajectories; a sampled item's x, level and prediction come from the same step of
    one trajectory, with that trajectory's row and prompt; save/load restores it exactly (serials and ages too)."""
    buf = diffusion_dro.ReplayBuffer(size=3)
    for n in range(4):  # trajectory n: row n, x = n + s at step s, k = 10 n + s, pred = -(n + s)
        x = torch.stack([torch.full((1, 2, 2), float(n + s)) for s in range(5)])[None]
        buf.add([n], [f"prompt {n}"], x, torch.tensor([[10 * n + s for s in range(5)]]), -x)
    assert [it["row"] for it in buf.items] == [1, 2, 3] and buf.added == 4
    gens = [torch.Generator().manual_seed(i) for i in range(16)]
    batch = buf.sample(gens)
    for row, prompt, x, k, pred, age in zip(batch["rows"], batch["prompts"], batch["x"], batch["k"], batch["pred"],
                                            batch["age"]):
        s = int(k) - 10 * row
        assert prompt == f"prompt {row}" and 0 <= s < 5
        assert torch.equal(x, torch.full((1, 2, 2), float(row + s))) and torch.equal(pred, -x)
        assert age == 3 - row
    buf.save(tmp_path)
    other = diffusion_dro.ReplayBuffer(size=3)
    other.load(tmp_path)
    again = other.sample([torch.Generator().manual_seed(i) for i in range(16)])
    assert again["rows"] == batch["rows"] and again["age"] == batch["age"]
    assert torch.equal(again["x"], batch["x"]) and torch.equal(again["pred"], batch["pred"])


def test_trajectory_entries_align_with_the_sampler(tiny_pipelines):
    """Each stored prediction is the sampler's output at the stored latent and level; the grid descends and its
    jitter stays inside one grid cell; the next latent is the DDIM step from that prediction."""
    from imgalign.models.adapters import load_adapter
    from imgalign.sampling.noise import NoiseLevels

    adapter = load_adapter(tiny_pipelines("sd15"))
    adapter.freeze_all()
    levels = NoiseLevels(adapter, 1000)
    cfg = diffusion_dro.DROConfig(sample_steps=4)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    x, k, pred = diffusion_dro.policy_trajectories(adapter, adapter.denoiser, levels, ["a red circle", ""], gens,
                                                   cfg, (4, 4, 4))
    assert x.shape == pred.shape == (2, 4, 4, 4, 4) and k.shape == (2, 4)
    assert (k[:, :-1] > k[:, 1:]).all() and (k[:, -1] < 250).all() and (k[:, 0] >= 750).all()
    with torch.no_grad():
        s = 2
        again = adapter.predict(adapter.denoiser, x[:, s], levels.model_t[k[:, s]],
                                adapter.encode_prompts(["a red circle", ""]))
        torch.testing.assert_close(again.float(), pred[:, s], rtol=1e-5, atol=1e-5)
        x0, eps = levels.to_x0_eps(pred[:, s], x[:, s], k[:, s])
        a, sg = levels.coef(k[:, s + 1], x0)
        torch.testing.assert_close(a * x0 + sg * eps, x[:, s + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_steps_train_lora_log_and_checkpoint_buffer_and_lagged_adapter(family, tiny_pipelines, tiny_pairs, tmp_path):
    out = tmp_path / "run"
    result = diffusion_dro.train(make_cfg(tiny_pipelines(family), tiny_pairs, out))
    hist = result["history"]
    assert [h["step"] for h in hist] == [1, 2, 3]
    # step 1: fresh LoRA, policy == reference == lagged sampler: every difference is 0 and the hinge is the margin
    assert hist[0]["train/diff"] == pytest.approx(0.0, abs=1e-6)
    assert hist[0]["train/loss"] == pytest.approx(0.001, abs=1e-6)
    assert hist[0]["train/policy_err"] == pytest.approx(0.0, abs=1e-8)
    assert [h["train/buffer_size"] for h in hist] == [2.0, 4.0, 4.0]  # 2 per refresh, the newest 4 kept
    for key in ("loss", "expert_err", "expert_err_ref", "policy_err_ref", "buffer_age", "grad_norm"):
        assert math.isfinite(hist[-1][f"train/{key}"]), key
    ckpt = out / "checkpoint-3"
    for name in ("pytorch_lora_weights.safetensors", "replay_buffer.safetensors", "trainer_state.json"):
        assert (ckpt / name).is_file(), name
    assert (ckpt / "lagged" / "pytorch_lora_weights.safetensors").is_file()
    trained = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k or "lora.up" in k)


def test_lagged_sampler_syncs_on_schedule(tiny_pipelines, tiny_pairs, tmp_path):
    """dro.sync_every=2: after step 1 the lagged adapter still holds the initial weights; after step 2 it equals the
    policy; the saved checkpoint-1 and checkpoint-2 show exactly that."""
    out = tmp_path / "run"
    diffusion_dro.train(make_cfg(tiny_pipelines("sd15"), tiny_pairs, out, "dro.sync_every=2", "run.max_steps=2",
                                 "run.keep_last=0"))
    policy1 = load_file(str(out / "checkpoint-1" / "pytorch_lora_weights.safetensors"))
    lagged1 = load_file(str(out / "checkpoint-1" / "lagged" / "pytorch_lora_weights.safetensors"))
    policy2 = load_file(str(out / "checkpoint-2" / "pytorch_lora_weights.safetensors"))
    lagged2 = load_file(str(out / "checkpoint-2" / "lagged" / "pytorch_lora_weights.safetensors"))
    b_keys = [k for k in policy1 if "lora_B" in k or "lora.up" in k]
    assert all(lagged1[k].abs().sum() == 0 for k in b_keys)  # B = 0: the initial adapter
    assert any(policy1[k].abs().sum() > 0 for k in b_keys)
    assert all(torch.equal(policy2[k], lagged2[k]) for k in policy2)


def test_full_finetuning_uses_frozen_copies(tiny_pipelines, tiny_pairs, tmp_path):
    out = tmp_path / "full"
    result = diffusion_dro.train(make_cfg(tiny_pipelines("sd15"), tiny_pairs, out, "lora.enabled=false",
                                          "run.max_steps=2", "optim.lr=1e-4"))
    assert result["history"][0]["train/diff"] == pytest.approx(0.0, abs=1e-5)
    assert (out / "checkpoint-2" / "lagged" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_kill_and_resume_equals_uninterrupted(family, tiny_pipelines, tiny_pairs, tmp_path, run_killed, assert_same_continuation):
    """Killed in step 3 after checkpoint-2: resumed from latest, with the replay buffer, the lagged adapter and the EMA
    of checkpoint-2, the run reproduces the uninterrupted one (losses, final weights and final EMA weights). refresh_every=2 and
    sync_every=2 make the resumed run depend on the restored buffer and lagged weights."""
    pipe = tiny_pipelines(family)
    extra = ("run.max_steps=4", "run.checkpoint_every=2", "run.keep_last=0", "run.grad_accum=2",
             "dro.refresh_every=3", "dro.sync_every=3", "dro.buffer_size=3", "optim.lr_scheduler=cosine",
             "dro.ema_decay=0.5")
    full = diffusion_dro.train(make_cfg(pipe, tiny_pairs, tmp_path / "full", *extra))
    # micro-steps 1-4 = steps 1-2; die in step 3
    run_killed(diffusion_dro, "_step", 6, lambda: diffusion_dro.train(make_cfg(pipe, tiny_pairs, tmp_path / "killed",
                                                                               *extra)))
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = diffusion_dro.train(make_cfg(pipe, tiny_pairs, tmp_path / "killed", *extra, "run.resume_from=latest"))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    w = "pytorch_lora_weights.safetensors"
    assert_same_continuation(full["history"], resumed["history"],
                             ("train/loss", "train/expert_err", "train/policy_err", "train/buffer_age"),
                             [(tmp_path / "full" / n / w, tmp_path / "killed" / n / w) for n in ("", "ema")], abs=1e-9)
    assert (tmp_path / "killed" / "checkpoint-2" / "ema.safetensors").is_file()


def test_sft_baseline_trains_on_the_experts_without_buffer_or_reference(tiny_pipelines, tiny_pairs, tmp_path,
                                                                         monkeypatch):
    import imgalign.recipes.diffusion_dro as dro

    monkeypatch.setattr(dro, "policy_trajectories", lambda *a, **k: pytest.fail("SFT samples no trajectories"))
    monkeypatch.setattr(dro, "adapters_disabled", lambda *a, **k: pytest.fail("SFT needs no reference forward"))
    result = dro.train(make_cfg(tiny_pipelines("sd15"), tiny_pairs, tmp_path / "sft", "dro.objective=sft",
                                "run.max_steps=2"))
    assert all(math.isfinite(h["train/loss"]) and h["train/loss"] > 0 for h in result["history"])


def test_select_experts_keeps_the_top_k_by_reward_with_scores(tiny_pairs, tmp_path):
    """compressibility scores every image of every pair; the kept rows are the best, sorted, each with its score and
    source row, and load as diffusion-dro's experts."""
    import json

    from imgalign.cli import main

    assert main(["select-experts", "--source", tiny_pairs, "--reward", "compressibility", "--top", "3",
                 "--out", str(tmp_path / "experts")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "experts" / "experts.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["label"] is True and "source_row" in r for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    summary = json.loads((tmp_path / "experts" / "summary.json").read_text())
    assert summary["images_scored"] == 16 and summary["score_last_kept"] == scores[-1] >= summary["score_mean_all"]
    data, experts, _ = diffusion_dro.load_experts(diffusion_dro.DataConfig(source=str(tmp_path / "experts" /
                                                                                       "experts.jsonl")))
    assert experts == [0, 1, 2]


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_cached_expert_latents_and_prompts(family, tiny_pipelines, tiny_pairs, tmp_path):
    """data.cache_latents: each expert encoded once (epoch 0's crop), prompts once; step 1 is still the fresh-LoRA
    margin, later steps finite."""
    result = diffusion_dro.train(make_cfg(tiny_pipelines(family), tiny_pairs, tmp_path / "cached",
                                          "data.cache_latents=true", "run.checkpoint_every=0"))
    hist = result["history"]
    assert hist[0]["train/loss"] == pytest.approx(0.001, abs=1e-6)
    assert all(math.isfinite(h["train/loss"]) for h in hist)
