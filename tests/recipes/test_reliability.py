"""What a run promises, for every recipe: the non-finite policy, checkpoints that fit the run, kills during pruning.

The mechanics are unit-tested in tests/unit/test_train_loop.py and test_train_checkpoint.py; here each recipe is
run for a few steps on a tiny model so the promise is shown where users meet it.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imgalign.config import load_config
from imgalign.errors import CheckpointError, NonFiniteError
from imgalign.recipes import diffusion_dpo, get_recipe, llm_dpo, pref_grpo, self_npo

COMMON = ["run.progress=false", "run.log_with=none", "run.checkpoint_every=1", "run.keep_last=0",
          "run.max_steps=5", "run.max_nonfinite_steps=2"]


def overrides(method: str, out: Path, tiny_pipelines, tiny_pairs, llm_assets) -> list[str]:
    run = [f"run.output_dir={out}", *COMMON]
    if method == "diffusion-dpo":
        return [f"model.pretrained={tiny_pipelines('sd15')}", f"data.source={tiny_pairs}", "data.resolution=32",
                "run.batch_size=2", "lora.rank=4", "validation.enabled=false", *run]
    if method == "self-npo":
        return [f"model.pretrained={tiny_pipelines('sd15')}", "data.prompts=[a red circle]", "data.num_samples=2",
                "data.sample_steps=1", "data.resolution=32", "npo.rollout_steps=1", "run.batch_size=2",
                "lora.enabled=true", "lora.rank=4", "validation.enabled=false", *run]
    if method == "pref-grpo":
        return [f"model.pretrained={tiny_pipelines('sd15')}", "sample.resolution=32", "sample.num_steps=3",
                "sample.group_size=2", "sample.groups_per_iteration=1", "sample.batch_size=2",
                "reward.rewards=[compressibility]", "lora.rank=4", "validation.enabled=false", *run]
    return [f"model.pretrained={llm_assets['model']}", f"data.source={llm_assets['train']}", "data.max_length=32",
            "data.max_prompt_length=16", "run.batch_size=4", "lora.rank=4", *run]


STEP_FUNCTION = {"diffusion-dpo": (diffusion_dpo, "_step"), "self-npo": (self_npo, "_step"),
                 "llm-dpo": (llm_dpo, "_step"), "pref-grpo": (pref_grpo, "_policy_step")}
WEIGHTS = {"llm-dpo": "adapter_model.safetensors"}


@pytest.mark.parametrize("method", ["diffusion-dpo", "self-npo", "pref-grpo", "llm-dpo"])
def test_nan_loss_skips_then_stops_and_keeps_the_last_good_checkpoint(method, tiny_pipelines, tiny_pairs,
                                                                      llm_assets, tmp_path, monkeypatch):
    """The loss turns NaN from the 3rd optimizer step on (as with optim.lr=1e6): steps 3 and 4 are skipped
    (no update, counted), the 2nd skipped step in a row stops the run with NonFiniteError naming step 4; no
    checkpoint of a skipped step holds other weights than checkpoint-2, all are finite, no final LoRA is written,
    and resume_from=latest would restart from finite weights."""
    module, name = STEP_FUNCTION[method]
    real = getattr(module, name)
    calls = {"n": 0}
    # loss calls per optimizer step with these settings: pref-grpo trains 2 sampler steps of one rollout batch
    per_step = 2 if method == "pref-grpo" else 1

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, m = real(*a, **k)
        if calls["n"] > 2 * per_step:
            loss = loss * float("nan")
        return loss, m

    monkeypatch.setattr(module, name, poisoned)
    out = tmp_path / "run"
    recipe = get_recipe(method)
    with pytest.raises(NonFiniteError, match=r"step 4: .*2 optimizer steps in a row"):
        recipe.train(load_config(recipe.Config, None, overrides(method, out, tiny_pipelines, tiny_pairs,
                                                                 llm_assets)))
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]  # step 3 was skipped: its weights are step 2's
    weights = WEIGHTS.get(method, "pytorch_lora_weights.safetensors")
    w2, w3 = load_file(str(out / "checkpoint-2" / weights)), load_file(str(out / "checkpoint-3" / weights))
    assert all(torch.isfinite(v).all() for v in w3.values())
    assert all(torch.equal(w2[k], w3[k]) for k in w2)
    assert not (out / weights).exists()  # no final weights of a stopped run


def test_a_checkpoint_of_another_recipe_is_refused_before_training(tiny_pipelines, tiny_pairs, tmp_path):
    """A Pref-GRPO checkpoint in the output folder of a Diffusion-DPO run with resume_from=latest: refused, naming
    both recipes (the LoRA layout is the same, so nothing else would stop it)."""
    out = tmp_path / "run"
    pg = overrides("pref-grpo", out, tiny_pipelines, tiny_pairs, None)
    pref_grpo.train(load_config(pref_grpo.Config, None, [*pg, "run.max_steps=1"]))
    dpo = overrides("diffusion-dpo", out, tiny_pipelines, tiny_pairs, None)
    with pytest.raises(CheckpointError, match="pref-grpo.*diffusion-dpo"):
        diffusion_dpo.train(load_config(diffusion_dpo.Config, None, [*dpo, "run.resume_from=latest"]))


def test_a_checkpoint_of_another_lora_rank_is_refused(tiny_pipelines, tiny_pairs, tmp_path):
    out = tmp_path / "run"
    dpo = overrides("diffusion-dpo", out, tiny_pipelines, tiny_pairs, None)
    diffusion_dpo.train(load_config(diffusion_dpo.Config, None, [*dpo, "run.max_steps=1"]))
    with pytest.raises(CheckpointError, match="r=4.*r=8"):
        diffusion_dpo.train(load_config(diffusion_dpo.Config, None, [*dpo, "lora.rank=8", "run.resume_from=latest"]))


def test_kill_during_pruning_then_resume_equals_the_uninterrupted_run(tiny_pipelines, tiny_pairs, tmp_path,
                                                                       monkeypatch):
    """keep_last=1: pruning checkpoint-1 after checkpoint-2 is published is killed mid-delete. The folder holds
    checkpoint-2 (complete) and a `.checkpoint-1.deleting` leftover; resume from latest cleans it up and reproduces
    the uninterrupted run."""
    import imgalign.train.checkpoint as ckpt

    extra = ["run.keep_last=1", "run.max_steps=4"]
    full = diffusion_dpo.train(load_config(diffusion_dpo.Config, None, [
        *overrides("diffusion-dpo", tmp_path / "full", tiny_pipelines, tiny_pairs, None), *extra]))

    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *a, **k):
        if Path(path).name == ".checkpoint-1.deleting":
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    cut = tmp_path / "cut"
    cfg = overrides("diffusion-dpo", cut, tiny_pipelines, tiny_pairs, None)
    with pytest.raises(KeyboardInterrupt):
        diffusion_dpo.train(load_config(diffusion_dpo.Config, None, [*cfg, *extra]))
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    assert sorted(p.name for p in cut.iterdir() if "checkpoint" in p.name) == [".checkpoint-1.deleting",
                                                                               "checkpoint-2"]
    resumed = diffusion_dpo.train(load_config(diffusion_dpo.Config, None, [*cfg, *extra, "run.resume_from=latest"]))
    assert not (cut / ".checkpoint-1.deleting").exists()
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    for a, b in zip(full["history"][2:], resumed["history"]):
        assert a["train/model_err_w"] == pytest.approx(b["train/model_err_w"], rel=1e-6)
        assert math.isfinite(b["train/loss"])
    w_full = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    w_cut = load_file(str(cut / "pytorch_lora_weights.safetensors"))
    for k in w_full:
        torch.testing.assert_close(w_full[k], w_cut[k], rtol=0, atol=1e-6)
