"""Every recipe under 2 processes (torch.distributed.run, gloo on CPU) equals 1 process with the same effective
batch, checkpoints hold every rank's state even when one rank is slow, and a 2-process resume continues exactly.

Why they can be equal: data is dealt by position in the effective batch (train.data_order), and every sample's
noise, timesteps and choices are seeded by (seed, step, position) (train.seeding), so a run is a function of the
data, the seed and the effective batch, not of how processes and micro-steps split it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgalign.config import load_config
from imgalign.recipes import get_recipe

ENTRY = Path(__file__).with_name("mp_entry.py")
LORA = "pytorch_lora_weights.safetensors"


def torchrun(method: str, overrides: list[str], delay: str | None = None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MP_TEST_SAVE_DELAY": delay or ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ENTRY),
           method, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "x 2 procs" in proc.stdout or "x 2 procs" in proc.stderr or method == "pref-grpo", proc.stdout[-2000:]
    out = Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("run.output_dir=")))
    return json.loads((out / "history-0.json").read_text())


def one_process(method: str, overrides: list[str]) -> list[dict]:
    recipe = get_recipe(method)
    return recipe.train(load_config(recipe.Config, None, overrides))["history"]


def assert_same_run(h1: list[dict], h2: list[dict], w1: dict, w2: dict, keys=("train/loss",)) -> None:
    """Same metrics per step (rel 1e-5: the reduction order of the gradient differs, DDP's all-reduce vs the
    accumulation sum) and the same final weights to 1e-5 absolute: a hundredth of one lr-1e-3 update, where a
    different noise draw or data item per sample moves weights by ~1e-3 (measured: 6e-3 before per-sample seeds)."""
    assert [h["step"] for h in h1] == [h["step"] for h in h2]
    for a, b in zip(h1, h2):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (key, a, b)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=0, atol=1e-5)


# Adam divides by sqrt(v) + eps: with the default eps 1e-8, an element whose gradient is ~1e-9 moves by a full lr
# step in a direction that fp32 rounding of the gradient decides. A larger eps keeps the comparison of weights
# meaningful (it changes the optimizer, not the equality being tested).
ADAM_EPS = "optim.adam_eps=1e-4"

# Diffusion-DPO's loss multiplies error differences by beta / 2 = 2500, so fp32 rounding in the weights shows in
# the loss at 1e-4; the errors themselves are the exact comparison.
DPO_KEYS = ("train/model_err_w", "train/model_err_l", "train/ref_err_w", "train/ref_err_l", "train/rewards/accuracies")


def assert_complete_checkpoints(out: Path) -> None:
    ckpts = sorted(out.glob("checkpoint-*"))
    assert ckpts
    for c in ckpts:
        assert (c / "random_states_0.pkl").is_file() and (c / "random_states_1.pkl").is_file(), c
        assert (c / "trainer_state.json").is_file()
    assert not list(out.glob(".checkpoint-*")), "a temporary or doomed checkpoint folder survived"


def dpo_overrides(tiny_pipelines, tiny_pairs, out: Path, batch: int, accum: int, *extra: str) -> list[str]:
    return [f"model.pretrained={tiny_pipelines('sd15')}", f"data.source={tiny_pairs}", "data.resolution=32",
            f"run.output_dir={out}", "run.max_steps=3", f"run.batch_size={batch}", f"run.grad_accum={accum}",
            "run.checkpoint_every=1", "run.keep_last=2", "run.progress=false", "run.log_with=none",
            "optim.lr=1e-3", ADAM_EPS, "lora.rank=4", "data.hflip=true", "data.random_crop=true", "validation.enabled=false",
            *extra]


def test_diffusion_dpo_two_processes_equal_one_with_accumulation_and_a_slow_rank(tiny_pipelines, tiny_pairs,
                                                                                 tmp_path):
    """8 pairs, 4 per step: 3 steps cross an epoch. Rank 1 is delayed inside every save."""
    h2 = torchrun("diffusion-dpo", dpo_overrides(tiny_pipelines, tiny_pairs, tmp_path / "two", 2, 1), delay="inside")
    h1 = one_process("diffusion-dpo", dpo_overrides(tiny_pipelines, tiny_pairs, tmp_path / "one", 2, 2))
    w = "pytorch_lora_weights.safetensors"
    assert_same_run(h1, h2, load_file(str(tmp_path / "one" / w)), load_file(str(tmp_path / "two" / w)), DPO_KEYS)
    assert_complete_checkpoints(tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


def test_diffusion_dpo_two_process_resume_continues_exactly(tiny_pipelines, tiny_pairs, tmp_path):
    """A 2-process run of 4 steps, and the same run resumed in 2 processes from its checkpoint-2 (rank 1 slow
    to enter every save, so it would find a folder rank 0 had already published without the barrier)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = ("run.max_steps=4", "run.checkpoint_every=2", "run.keep_last=0")
    h_full = torchrun("diffusion-dpo", dpo_overrides(tiny_pipelines, tiny_pairs, full, 2, 1, *extra), delay="before")
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoint-4")
    (cut / "pytorch_lora_weights.safetensors").unlink()
    h_res = torchrun("diffusion-dpo", dpo_overrides(tiny_pipelines, tiny_pairs, cut, 2, 1, *extra,
                                                    "run.resume_from=latest"), delay="before")
    assert [h["step"] for h in h_res] == [3, 4]
    w = "pytorch_lora_weights.safetensors"
    assert_same_run(h_full[2:], h_res, load_file(str(full / w)), load_file(str(cut / w)), DPO_KEYS)
    assert_complete_checkpoints(cut)


def test_self_npo_two_processes_equal_one_with_accumulation(tiny_pipelines, tmp_path):
    def overrides(out, accum):
        return [f"model.pretrained={tiny_pipelines('sd15')}", "data.prompts=[a red circle, two blue squares]",
                "data.num_samples=4", "data.sample_steps=1", "data.resolution=32", "npo.rollout_steps=2",
                f"run.output_dir={out}", "run.batch_size=2", f"run.grad_accum={accum}", "run.max_steps=2",
                "run.checkpoint_every=1", "run.progress=false", "run.log_with=none", "optim.lr=1e-3",
                ADAM_EPS, "lora.enabled=true", "lora.rank=4", "npo.ema_decay=0.5", "validation.enabled=false"]

    h2 = torchrun("self-npo", overrides(tmp_path / "two", 1))
    h1 = one_process("self-npo", overrides(tmp_path / "one", 2))
    w = "pytorch_lora_weights.safetensors"
    assert_same_run(h1, h2, load_file(str(tmp_path / "one" / w)), load_file(str(tmp_path / "two" / w)))
    assert_complete_checkpoints(tmp_path / "two")


def test_rpo_two_processes_equal_one_with_accumulation(tiny_pipelines, tmp_path):
    """The main process generates the negatives (the other waits at a barrier) and validates; every pair's draws are
    keyed by its global position, so 2 processes x 2 pairs equal 1 process x 2 pairs x 2 accumulation steps; the
    best-model state is in every checkpoint of both ranks' run."""
    from imgalign._paths import TOY_ASSETS

    def overrides(out, accum):
        return [f"model.pretrained={tiny_pipelines('sd15')}",
                f"data.subject_dir={TOY_ASSETS / 'subjects' / 'dataset' / 'checker_square'}",
                "data.train_prompts=['a {0} {1} left of a red circle','a blue {0} {1}']", "data.resolution=32",
                f"reward.model={TOY_ASSETS / 'clip'}", "rpo.num_negatives=2", "rpo.negatives_steps=2",
                f"run.output_dir={out}", "run.batch_size=2", f"run.grad_accum={accum}", "run.max_steps=2",
                "run.checkpoint_every=1", "run.progress=false", "run.log_with=none", "optim.lr=1e-3", ADAM_EPS,
                "lora.rank=4", "validation.every=1", "validation.images_per_prompt=1",
                "validation.num_inference_steps=1"]

    h2 = torchrun("rpo", overrides(tmp_path / "two", 1))
    h1 = one_process("rpo", overrides(tmp_path / "one", 2))
    w = "pytorch_lora_weights.safetensors"
    assert_same_run(h1, h2, load_file(str(tmp_path / "one" / w)), load_file(str(tmp_path / "two" / w)),
                    ("train/loss", "train/label", "train/sim_loss"))
    assert_complete_checkpoints(tmp_path / "two")
    assert all((c / "rpo_best.json").is_file() for c in (tmp_path / "two").glob("checkpoint-*"))
    assert (tmp_path / "two" / "best" / w).is_file()


def test_pref_grpo_two_processes_split_rollouts_and_equal_one(tiny_pipelines, tmp_path):
    """2 groups of 2 images: each rank samples one group; random per-sample training steps; KL to the reference.
    Group statistics are computed over the gathered rewards, so both layouts give the same advantages."""
    def overrides(out):
        return [f"model.pretrained={tiny_pipelines('sd15')}", f"run.output_dir={out}", "run.max_steps=2",
                "run.checkpoint_every=1", "run.progress=false", "run.log_with=none", "sample.resolution=32",
                "sample.num_steps=3", "sample.group_size=2", "sample.groups_per_iteration=2", "sample.batch_size=2",
                "reward.rewards=[compressibility]", "optim.lr=1e-3", "lora.rank=4", "train.timestep_order=random",
                "train.beta=0.04", "validation.enabled=false"]

    h2 = torchrun("pref-grpo", overrides(tmp_path / "two"))
    h1 = one_process("pref-grpo", overrides(tmp_path / "one"))
    w = "pytorch_lora_weights.safetensors"
    assert_same_run(h1, h2, load_file(str(tmp_path / "one" / w)), load_file(str(tmp_path / "two" / w)))
    for a, b in zip(h1, h2):
        assert a["train/adv_abs_mean"] == pytest.approx(b["train/adv_abs_mean"], rel=1e-6)
        assert a["train/reward_mean"] == pytest.approx(b["train/reward_mean"], rel=1e-6)
    assert_complete_checkpoints(tmp_path / "two")


@pytest.mark.parametrize("layout", ["lora", "full"])
def test_flash_dmd_two_processes_equal_one_with_accumulation(layout, tiny_pipelines, tmp_path):
    """Student and fake score are two networks of one module (LoRA: two adapters taking turns), so they are not
    DDP-wrapped; their gradients, and the GAN head's, are averaged per optimizer step (train.loop.average_gradients),
    and their initial weights broadcast from rank 0. With the GAN, the split with k per sample (a parameter may have a
    gradient on one rank only) and TTUR 2, 2 processes x 2 samples equal 1 process x 2 samples x 2 accumulation steps:
    both networks and the head. (No RL term here: the offline reward, compressibility, is a JPEG size, which a 1e-8
    change of the weights can step; the RL term is per sample, like the others.)"""
    def overrides(out, accum):
        return [f"model.pretrained={tiny_pipelines('sd15')}", "data.resolution=32", f"run.output_dir={out}",
                "run.max_steps=3", "run.batch_size=2", f"run.grad_accum={accum}", "run.checkpoint_every=3",
                "run.progress=false", "run.log_with=none", "optim.lr=1e-3", "critic_optim.lr=1e-3", ADAM_EPS,
                "critic_optim.adam_eps=1e-4", "lora.rank=4", "dmd.ttur=2", "dmd.gan_weight=1e-2",
                "data.real_source=toy_renders", "dmd.split_threshold=0.5", "dmd.k_per_sample=true",
                "validation.enabled=false",
                *(["lora.enabled=false", "optim.lr=1e-4", "critic_optim.lr=1e-4"] if layout == "full" else [])]

    h2 = torchrun("flash-dmd", overrides(tmp_path / "two", 1))
    h1 = one_process("flash-dmd", overrides(tmp_path / "one", 2))
    w = LORA if layout == "lora" else "unet/diffusion_pytorch_model.safetensors"
    files = [w, f"checkpoint-3/critic/{w}", "checkpoint-3/critic/gan_head.safetensors"]
    for f in files[1:]:
        assert_same_run([], [], load_file(str(tmp_path / "one" / f)), load_file(str(tmp_path / "two" / f)))
    assert_same_run(h1, h2, load_file(str(tmp_path / "one" / w)), load_file(str(tmp_path / "two" / w)),
                    ("train/loss_critic", "train/gan_d", "train/grad_norm_critic"))
    for key in ("train/loss_student", "train/gan_g", "train/dm_share", "train/grad_norm_student"):  # steps 1, 3
        assert h1[-1][key] == pytest.approx(h2[-1][key], rel=1e-5, abs=1e-7), key
    assert h2[-1]["train/student_updates"] == 2
    assert_complete_checkpoints(tmp_path / "two")


def test_llm_dpo_two_processes_equal_one_with_accumulation(llm_assets, tmp_path):
    assets = llm_assets

    def overrides(out, accum):
        return [f"model.pretrained={assets['model']}", f"data.source={assets['train']}",
                f"data.eval_source={assets['heldout']}", "data.max_length=32", "data.max_prompt_length=16",
                f"run.output_dir={out}", "run.max_steps=3", "run.batch_size=4", f"run.grad_accum={accum}",
                "run.checkpoint_every=2", "run.progress=false", "run.log_with=none", "optim.lr=3e-3",
                "lora.rank=4", "eval.batch_size=8"]

    h2 = torchrun("llm-dpo", overrides(tmp_path / "two", 1))
    h1 = one_process("llm-dpo", overrides(tmp_path / "one", 2))
    w = "adapter_model.safetensors"
    assert_same_run(h1, h2, load_file(str(tmp_path / "one" / w)), load_file(str(tmp_path / "two" / w)))
    assert_complete_checkpoints(tmp_path / "two")


def test_accelerate_launch_cpu_starting_one_process_is_reported(llm_assets, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process (accelerate's behaviour): the run says so."""
    assets = llm_assets
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu", "--num_processes", "2", "-m",
           "imgalign.cli", "train", "llm-dpo", f"model.pretrained={assets['model']}", f"data.source={assets['train']}",
           "data.max_length=32", "data.max_prompt_length=16", f"run.output_dir={tmp_path / 'run'}", "run.max_steps=1",
           "run.batch_size=4", "run.progress=false", "run.log_with=none", "lora.rank=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 1 procs" in proc.stdout and "started one" in proc.stdout
