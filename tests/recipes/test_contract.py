"""One contract for every recipe and every shipped config: the config parses against its recipe's schema, trains
one optimizer step (iteration) on the tiny pipeline of its family with the config's own settings (shrunk: sizes,
steps, data and rewards that need downloads replaced), returns the shared result keys, and a fresh LoRA's first
sigmoid-DPO loss equals log 2 (policy == reference)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from imgalign.config import ConfigError, load_config
from imgalign.recipes import RECIPES, get_recipe

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIRS = {"diffusion-dpo": "diffusion_dpo", "diffusion-dro": "diffusion_dro", "self-npo": "self_npo",
               "pref-grpo": "pref_grpo", "llm-dpo": "llm_dpo", "rpo": "rpo", "flash-dmd": "flash_dmd"}
SHIPPED = [(method, path) for method, folder in CONFIG_DIRS.items()
           for path in sorted((REPO / "configs" / folder).glob("*.yaml"))]
FAMILY = {"sd15": "sd15", "sd2": "sd2-v", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"}
TOY_SUBJECT = REPO / "assets" / "toy" / "subjects" / "dataset" / "striped_square"
RESULT_KEYS = {"steps", "history", "validation", "seconds", "output_dir"}


def test_every_recipe_has_shipped_configs():
    assert set(CONFIG_DIRS) == set(RECIPES)
    for method, folder in CONFIG_DIRS.items():
        assert list((REPO / "configs" / folder).glob("*.yaml")), method


def shrink(method: str, config: Path, out: Path, tiny_pipelines, tiny_pairs, llm_assets) -> list[str]:
    """Overrides that keep the config's method settings but make one step cheap and offline."""
    run = [f"run.output_dir={out}", "run.max_steps=1", "run.grad_accum=1", "run.checkpoint_every=0",
           "run.mixed_precision=no", "run.progress=false", "run.log_with=none"]
    if method == "llm-dpo":
        return [f"model.pretrained={llm_assets['model']}", f"data.source={llm_assets['train']}",
                f"data.eval_source={llm_assets['heldout']}", "data.max_length=32", "data.max_prompt_length=16",
                "run.batch_size=2", "eval.batch_size=4", *run]
    model = str(REPO / "assets" / "toy" / "sd") if config.stem == "toy" else tiny_pipelines(FAMILY[config.stem])
    common = [f"model.pretrained={model}", "model.variant=null", "validation.enabled=false", *run]
    if method == "diffusion-dpo":
        return [f"data.source={tiny_pairs}", "data.resolution=32", "run.batch_size=2", *common]
    if method == "diffusion-dro":
        return [f"data.source={tiny_pairs}", "data.resolution=32", "run.batch_size=2", "dro.sample_steps=3",
                "dro.buffer_batch=2", *common]
    if method == "rpo":
        return [f"data.subject_dir={TOY_SUBJECT}",
                "data.train_prompts=['a {0} {1} on a white background']", "data.resolution=32", "rpo.num_negatives=1",
                "rpo.negatives_steps=1", f"reward.model={REPO / 'assets' / 'toy' / 'clip'}", "run.batch_size=2", *common]
    if method == "flash-dmd":  # the toy config keeps its toy renders and toy rater; the others get the tiny pairs
        data = [] if config.stem == "toy" else [f"data.prompts={tiny_pairs}", f"data.real_source={tiny_pairs}",
                                                 "rl.rewards=[compressibility]", "rl.thresholds=[0.0]"]
        return [*data, "data.resolution=32", "run.batch_size=2", *common]
    if method == "self-npo":
        return ["data.num_samples=2", "data.sample_steps=1", "data.resolution=32", "npo.rollout_steps=1",
                "run.batch_size=2", *common]
    return ["sample.resolution=32", "sample.num_steps=6", "sample.group_size=2", "sample.groups_per_iteration=1",
            "sample.batch_size=2", "train.updates_per_iteration=1", "reward.rewards=[compressibility]",
            "reward.kwargs={}", "data.prompts=null", "data.max_prompts=4", "advantage.buffer_size=0", *common]


def placeholder_keys(config: Path) -> list[str]:
    """Dotted keys whose shipped value is a <placeholder> the user must replace."""
    from omegaconf import OmegaConf

    found, stack = [], [("", OmegaConf.to_container(OmegaConf.load(config)))]
    while stack:
        prefix, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{prefix}{k}.", v) for k, v in node.items())
        elif isinstance(node, str) and node.startswith("<") and node.endswith(">"):
            found.append(prefix[:-1])
    return found


def without_reward_arguments(config: Path, tmp_path: Path) -> Path:
    """A copy of a Pref-GRPO config without `reward.kwargs` (arguments of a judge server the test replaces with a
    local reward; an override cannot delete a mapping's keys)."""
    from omegaconf import OmegaConf

    data = OmegaConf.load(config)
    if "reward" not in data or not data.reward.get("kwargs"):
        return config
    del data.reward["kwargs"]
    copy = tmp_path / config.name
    OmegaConf.save(data, copy)
    return copy


@pytest.mark.parametrize("method,config", SHIPPED, ids=[f"{m}:{p.stem}" for m, p in SHIPPED])
def test_shipped_config_trains_one_step_on_its_tiny_family(method, config, tiny_pipelines, tiny_pairs, llm_assets,
                                                           tmp_path, in_folder_with_outputs):
    recipe = get_recipe(method)
    in_folder_with_outputs(config)
    # parses as shipped (nothing loads); a <placeholder> data source is refused at load, naming the key
    given = TOY_SUBJECT if method == "rpo" else tiny_pairs
    placeholders = [f"{key}={given}" for key in placeholder_keys(config)]
    if placeholders:
        with pytest.raises(ConfigError, match="placeholder"):
            load_config(recipe.Config, config)
    load_config(recipe.Config, config, placeholders)
    config = without_reward_arguments(config, tmp_path)
    cfg = load_config(recipe.Config, config, shrink(method, config, tmp_path / "run", tiny_pipelines, tiny_pairs,
                                                     llm_assets))
    result = recipe.train(cfg)
    assert set(result) == RESULT_KEYS
    assert result["steps"] == 1 and [h["step"] for h in result["history"]] == [1]
    first = result["history"][0]
    assert math.isfinite(first["train/loss"]) if "train/loss" in first else math.isfinite(first["train/reward_mean"])
    assert first["train/nonfinite_skipped"] == 0 and math.isfinite(first["train/grad_norm"])
    assert (tmp_path / "run" / "checkpoint-1" / "trainer_state.json").is_file()
    loss = getattr(cfg, "loss", None)
    if method in ("diffusion-dpo", "llm-dpo") and cfg.lora.enabled and list(loss.loss_type) == ["sigmoid"]:
        assert first["train/loss"] == pytest.approx(math.log(2), abs=1e-5)  # fresh LoRA: policy == reference
