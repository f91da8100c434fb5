"""Pref-GRPO / Flow-GRPO / DDPO end to end on tiny SD1.5, SDXL, SD3 and FLUX pipelines loaded by path.

Rewards: JPEG compressibility (pointwise, cheap, and it varies between random images, so groups carry signal);
as a pairwise reward through its win rates. The toy evaluator scores 0 on every image of a random tiny model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgalign.config import load_config
from imgalign.recipes import pref_grpo
from imgalign.rewards.base import PairwiseReward


def make_cfg(pipeline: str, out: Path, *extra: str):
    return load_config(pref_grpo.Config, None, [
        f"model.pretrained={pipeline}", f"run.output_dir={out}", "run.max_steps=2", "run.checkpoint_every=1",
        "run.keep_last=2", "run.progress=false", "sample.resolution=32", "sample.num_steps=3", "sample.group_size=2",
        "sample.groups_per_iteration=2", "sample.batch_size=2", "reward.rewards=[compressibility]",
        "optim.lr=1e-3", "lora.rank=4", "validation.num_inference_steps=1", "validation.images_per_prompt=1",
        *extra,
    ])


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


FAMILY_OPTIONS = {
    # Pref-GRPO win rates with DDIM (eta 1); random per-sample steps (DDPO / Pref-GRPO style)
    "sd15": ("train.timestep_order=random", "train.beta=0.04"),
    # DDPO: pointwise reward, DDIM, two optimizer steps per iteration, per-prompt reward history
    "sdxl": ("reward.mode=pointwise", "train.updates_per_iteration=2", "sample.batch_size=1",
             "advantage.buffer_size=4", "advantage.min_count=2"),
    # Flow-GRPO: pointwise, global std, KL in Flow-GRPO's form, EMA
    "sd3": ("reward.mode=pointwise", "advantage.std=global", "train.beta=0.04", "train.ema_decay=0.9",
            "train.ema_every=1"),
    # Pref-GRPO on FLUX (no CFG, guidance embedding), CPS sampler, RatioNorm, Flow-GRPO-Fast SDE window
    "flux": ("sample.guidance_scale=1", "sample.sampler=cps", "train.ratio_norm=true", "sample.sde_window_size=2",
             "sample.sde_window_range=[0,3]"),
}


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_iterations_train_lora_log_and_checkpoint(family, tiny_pipelines, tmp_path):
    out = tmp_path / "run"
    base_dir = tiny_pipelines(family)
    result = pref_grpo.train(make_cfg(base_dir, out, *FAMILY_OPTIONS[family]))
    hist = result["history"]
    assert [h["step"] for h in hist] == [1, 2]
    for h in hist:
        # recomputed log-probs equal the rollout's before the first update of each iteration: ratio exactly 1
        assert h["train/ratio_dev_before_update"] == 0.0
        for key in ("reward_mean", "reward_std", "zero_std_ratio", "clip_frac", "approx_kl", "loss", "ratio_mean",
                    "lr", "kept_fraction"):
            assert math.isfinite(h[f"train/{key}"]), key
        assert 0.0 <= h["train/clip_frac"] <= 1.0 and h["train/approx_kl"] >= 0
    if "reward.mode=pointwise" in FAMILY_OPTIONS[family]:
        assert "train/score/compressibility" in hist[0]
    else:  # win rates average 1/2 in every group; the best image of a group of 2 wins its one comparison
        assert hist[0]["train/win_rate/compressibility"] == pytest.approx(0.5)
        assert hist[0]["train/win_rate_best/compressibility"] == pytest.approx(1.0)
    if any(o.startswith("train.beta") for o in FAMILY_OPTIONS[family]):
        assert hist[-1]["train/kl"] >= 0 and math.isfinite(hist[-1]["train/kl"])

    # checkpoints, run record, TensorBoard events, rollout sample grids, validation grids
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert {"config.yaml", "versions.json"} <= {p.name for p in out.iterdir()}
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["iter-000000.png", "iter-000001.png"]
    assert len(list((out / "validation").iterdir())) == 2

    # every LoRA parameter changed (B starts at 0, A at a seeded gaussian)
    from imgalign.models.adapters import load_adapter

    fresh = load_adapter(base_dir)
    fresh.add_lora(rank=4)
    initial = fresh.lora_state_dict()
    trained = lora_weights(out)
    assert {k.split(".", 1)[1] for k in trained} == set(initial)  # saved with the "unet." / "transformer." prefix
    unchanged = [k for k, v in trained.items() if torch.equal(v, initial[k.split(".", 1)[1]])]
    assert not unchanged, f"LoRA params that did not change: {unchanged[:5]}"
    if family == "sd3":  # EMA weights exported next to the raw ones, and different from them
        ema = lora_weights(out / "ema")
        assert any(not torch.equal(ema[k], trained[k]) for k in trained)


def test_kill_and_resume_equals_uninterrupted(tiny_pipelines, tmp_path, run_killed, assert_same_continuation):
    """sd3 with EMA, KL, a cosine schedule and DDPO's per-prompt reward history over 2 prompts (so the history is
    used from iteration 2 on and a lost history changes the advantages): killed in iteration 3 after
    checkpoint-2, resumed from latest."""
    pipe = tiny_pipelines("sd3")
    extra = ("run.max_steps=4", "run.checkpoint_every=2", "run.keep_last=0", "optim.lr_scheduler=cosine",
             "optim.warmup_steps=1", "train.ema_decay=0.5", "train.ema_every=1", "train.beta=0.01",
             "train.timestep_order=random", "sample.batch_size=1", "train.updates_per_iteration=2",
             "reward.mode=pointwise", "data.max_prompts=2", "advantage.buffer_size=8", "advantage.min_count=3")
    full = pref_grpo.train(make_cfg(pipe, tmp_path / "full", *extra))

    # dies in iteration 3
    run_killed(pref_grpo, "_iteration", 3,
               lambda: pref_grpo.train(make_cfg(pipe, tmp_path / "killed", *extra)))
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-2"]
    stats = json.loads(next((tmp_path / "killed" / "checkpoint-2").rglob("prompt_stats.json")).read_text())
    assert sorted(map(len, stats["history"].values())) == [4, 4]  # 2 iterations x 2 images of each prompt

    resumed = pref_grpo.train(make_cfg(pipe, tmp_path / "killed", *extra, "run.resume_from=latest"))
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    w = "pytorch_lora_weights.safetensors"
    assert_same_continuation(full["history"], resumed["history"],
                             ("train/reward_mean", "train/loss", "train/approx_kl", "train/kl", "train/lr"),
                             [(tmp_path / "full" / n / w, tmp_path / "killed" / n / w) for n in ("", "ema")])


def test_full_finetuning_with_frozen_reference(tiny_pipelines, tmp_path):
    out = tmp_path / "full"
    result = pref_grpo.train(make_cfg(tiny_pipelines("sd3"), out, "lora.enabled=false", "run.max_steps=1",
                                      "train.beta=0.04", "optim.lr=1e-4", "reward.mode=pointwise"))
    h = result["history"][0]
    assert h["train/ratio_dev_before_update"] == 0.0
    assert h["train/kl"] == 0.0  # policy == frozen reference before the update
    from diffusers import SD3Transformer2DModel

    base = SD3Transformer2DModel.from_pretrained(tiny_pipelines("sd3"), subfolder="transformer")
    tuned = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer")
    changed = [not torch.equal(a, b) for a, b in zip(base.parameters(), tuned.parameters())]
    assert sum(changed) / len(changed) > 0.5


class _BrightnessJudge(PairwiseReward):
    """A pairwise judge stub: prefers the brighter image; `first_bias` always prefers the first; `fail` raises."""

    name = "brightness_judge"

    def __init__(self, mode="fair"):
        super().__init__()
        self.mode, self.calls = mode, 0

    def _compare(self, a, b, prompts, **kwargs):
        self.calls += 1
        if self.mode == "fail":
            raise RuntimeError("judge server unreachable")
        if self.mode == "first_bias":
            return torch.ones(len(a))
        return (torch.stack(a).mean(dim=(1, 2, 3)) > torch.stack(b).mean(dim=(1, 2, 3))).float()


def test_pairwise_judge_win_rates_swap_and_failures():
    """Through the reward layer (rewards.group.judge_group): all pairs in one call, both orders with swap_order,
    position bias cancelled, a failed call counted and turned into ties."""
    from imgalign.rewards.group import judge_group

    images = torch.stack([torch.full((3, 4, 4), v) for v in (-0.5, 0.5, 0.0)])  # brightness order 1 > 2 > 0
    judge = _BrightnessJudge()
    w, failures = judge_group(judge, images, "p", swap_order=False, hard=True, value_range=(-1, 1))
    assert w.tolist() == [0.0, 1.0, 0.5] and failures == 0 and judge.calls == 1  # all 3 pairs in one call
    w, _ = judge_group(judge, images, "p", swap_order=True, hard=True, value_range=(-1, 1))
    assert w.tolist() == [0.0, 1.0, 0.5] and judge.calls == 3
    w, _ = judge_group(_BrightnessJudge("first_bias"), images, "p", swap_order=True, hard=True, value_range=(-1, 1))
    assert w.tolist() == [0.5, 0.5, 0.5]  # position bias cancels out
    w, failures = judge_group(_BrightnessJudge("fail"), images, "p", swap_order=False, hard=True,
                              value_range=(-1, 1))
    assert w.tolist() == [0.5, 0.5, 0.5] and failures == 1  # failures are ties


def test_shipped_configs_parse():
    paths = sorted(Path("configs/pref_grpo").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"sd15", "sdxl", "sd3", "flux", "toy"}
    for path in paths:
        cfg = load_config(pref_grpo.Config, path)
        assert cfg.model.pretrained and cfg.train.clip_range <= 1e-3 and cfg.sample.group_size >= 2


def test_advantages_group_mode_zeroes_constant_groups_history_mode_does_not():
    """Group 0 is constant (rewards 1, 1); group 1 is [0, 1]. Group mode (std n, eps 0): group 0 -> 0 and dropped,
    group 1 -> -1, +1. History mode, min_count 1 after one earlier reward of 0 for prompt "a": "a"'s history
    [0, 1, 1] has mean 2/3, std sqrt(2)/3, so both constant samples get +(1/3) / (sqrt(2)/3) = +1/sqrt(2), kept."""
    values = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
    groups = torch.tensor([0, 0, 1, 1])
    acfg = pref_grpo.AdvantageConfig(eps=0.0)
    adv, zero, keep = pref_grpo.advantages(values, [1.0], groups, ["a", "a", "b", "b"], acfg, "normalize_then_weight")
    torch.testing.assert_close(adv, torch.tensor([0.0, 0.0, -1.0, 1.0]))
    assert zero.tolist() == [True, True, False, False] and keep.tolist() == [False, False, True, True]

    tracker = pref_grpo.PromptStatTracker(buffer_size=8, min_count=1, eps=0.0)
    tracker.update(["a"], torch.tensor([0.0]))
    adv, zero, keep = pref_grpo.advantages(values, [1.0], groups, ["a", "a", "b", "b"], acfg,
                                           "normalize_then_weight", tracker)
    assert adv[:2].tolist() == pytest.approx([2 ** -0.5] * 2)
    assert zero.tolist() == [True, True, False, False] and keep.all()
