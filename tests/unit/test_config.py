"""imgalign.config: YAML + dotted overrides onto dataclass schemas, strict errors, run info."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

import pytest

from imgalign.config import (
    MISSING,
    ConfigError,
    cfg_field,
    config_help,
    load_config,
    save_run_info,
    to_yaml,
)


@dataclass
class OptimConfig:
    lr: float = cfg_field(1e-4, "Learning rate of AdamW.")
    beta: float = cfg_field(2.0, "DPO beta (KL strength).")
    steps: int = cfg_field(10, "Optimizer steps.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = cfg_field("sigmoid", "DPO-family loss by name.")
    betas: list[float] = cfg_field([0.9, 0.999], "Adam betas.")


@dataclass
class RunConfig:
    model: str = cfg_field(MISSING, "Hub id or local path of the base model.")
    train: OptimConfig = cfg_field(OptimConfig, "Optimisation settings.")
    seed: int | None = cfg_field(None, "Random seed; null picks one.")
    tags: list[str] = cfg_field([], "Free-form run tags.")


def write(tmp_path, text: str, name: str = "x.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_yaml_then_overrides_resolve(tmp_path):
    path = write(tmp_path, "model: toy/sd\ntrain:\n  lr: 2e-5\n  steps: 5\ntags: [a]\n")
    cfg = load_config(RunConfig, path, ["train.steps=7", "seed=3", "train.betas=[0.5, 0.6]"])
    assert isinstance(cfg, RunConfig) and isinstance(cfg.train, OptimConfig)
    assert cfg.model == "toy/sd"
    assert cfg.train.lr == pytest.approx(2e-5)  # YAML 1e-style float
    assert cfg.train.steps == 7  # override wins over the file
    assert cfg.seed == 3
    assert cfg.train.betas == [0.5, 0.6]
    assert cfg.tags == ["a"]
    assert cfg.train.loss_type == "sigmoid"  # default kept


def test_defaults_are_not_shared_between_instances():
    a = load_config(RunConfig, None, ["model=m"])
    b = load_config(RunConfig, None, ["model=m"])
    a.train.betas.append(1.0)
    assert b.train.betas == [0.9, 0.999]


def test_int_for_float_and_string_float():
    cfg = load_config(RunConfig, None, ["model=m", "train.beta=5000", "train.lr=1e-5"])
    assert cfg.train.beta == 5000.0 and isinstance(cfg.train.beta, float)
    assert cfg.train.lr == pytest.approx(1e-5)
    cfg = load_config(RunConfig, None, ["model=m", 'train.lr="3e-4"'])
    assert cfg.train.lr == pytest.approx(3e-4)


def test_optional_accepts_null(tmp_path):
    cfg = load_config(RunConfig, write(tmp_path, "model: m\nseed: null\n"), ["seed=null"])
    assert cfg.seed is None


def test_unknown_key_in_file_names_key_source_and_closest(tmp_path):
    path = write(tmp_path, "model: m\ntrain:\n  lrr: 1e-5\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert "'train.lrr'" in msg and path in msg and "did you mean 'train.lr'" in msg


def test_unknown_key_on_command_line():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train\.stepz' in command line.*'train\.steps'"
    ):
        load_config(RunConfig, None, ["model=m", "train.stepz=3"])


def test_misplaced_leaf_suggests_full_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'lr'.*did you mean 'train\.lr'"):
        load_config(RunConfig, None, ["model=m", "lr=3"])


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"valid keys at the top level: model, seed, tags, train"):
        load_config(RunConfig, None, ["model=m", "qqqqqq=3"])


def test_wrong_type_names_key_type_and_value(tmp_path):
    path = write(tmp_path, "model: m\ntrain:\n  steps: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, path)
    msg = str(e.value)
    assert "'train.steps'" in msg and "expected int" in msg and "'many'" in msg and path in msg


def test_wrong_type_in_list_element():
    with pytest.raises(ConfigError, match=r"'train\.betas\[1\]'.*expected float.*'x'"):
        load_config(RunConfig, None, ["model=m", "train.betas=[0.1, x]"])


def test_value_for_a_section_is_an_error():
    with pytest.raises(ConfigError, match=r"'train'.*is a section"):
        load_config(RunConfig, None, ["model=m", "train=3"])


def test_literal_choice_error():
    with pytest.raises(ConfigError) as e:
        load_config(RunConfig, None, ["model=m", "train.loss_type=sigmod"])
    msg = str(e.value)
    assert "'train.loss_type'" in msg and "'sigmoid', 'ipo', 'hinge'" in msg and "'sigmod'" in msg
    assert load_config(RunConfig, None, ["model=m", "train.loss_type=ipo"]).train.loss_type == "ipo"


def test_missing_required_value_named():
    with pytest.raises(ConfigError, match=r"not set: 'model'"):
        load_config(RunConfig, None, [])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(RunConfig, None, ["model"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(RunConfig, str(tmp_path / "nope.yaml"))


def test_interpolation_resolves(tmp_path):
    path = write(tmp_path, "model: m\ntrain:\n  lr: 0.5\n  beta: ${train.lr}\n")
    assert load_config(RunConfig, path).train.beta == 0.5


def test_help_table_lists_keys_types_defaults_help():
    text = config_help(RunConfig)
    for needle in (
        "train.lr",
        "Learning rate of AdamW.",
        "train.loss_type",
        "'sigmoid', 'ipo', 'hinge'",
        "DPO beta (KL strength).",
        "(required)",
        "int | None",
        "Optimisation settings.",
    ):
        assert needle in text, needle
    line = next(ln for ln in text.splitlines() if ln.startswith("train.steps"))
    assert re.search(r"train\.steps\s+int\s+10\s+Optimizer steps\.", line)


def test_every_field_has_help():
    from imgalign.config import config_keys

    assert all(help_text for *_, help_text in config_keys(RunConfig))


def test_to_yaml_round_trips(tmp_path):
    cfg = load_config(RunConfig, None, ["model=m", "train.lr=0.25"])
    path = write(tmp_path, to_yaml(cfg), "round.yaml")
    assert load_config(RunConfig, path) == cfg


def test_save_run_info_writes_three_files(tmp_path):
    cfg = load_config(RunConfig, None, ["model=m"])
    out = save_run_info(cfg, tmp_path / "run")
    assert load_config(RunConfig, str(out / "config.yaml")) == cfg
    versions = json.loads((out / "versions.json").read_text())
    for key in (
        "python",
        "platform",
        "torch",
        "diffusers",
        "transformers",
        "accelerate",
        "peft",
        "open_clip",
        "imgalign",
    ):
        assert key in versions
    assert versions["python"].count(".") == 2
    rev = (out / "git_revision.txt").read_text().strip()
    assert rev == "unknown" or re.fullmatch(r"[0-9a-f]{40}( \(dirty\))?", rev)


def test_git_revision_outside_a_checkout_is_unknown(tmp_path):
    from imgalign.config import git_revision

    assert git_revision(tmp_path) == "unknown"


@dataclass
class RewardSpec:
    name: str = cfg_field(MISSING, "Reward name from the registry.")
    weight: float = cfg_field(1.0, "Weight in the sum of rewards.")


@dataclass
class MultiRewardConfig:
    rewards: list[RewardSpec] = cfg_field([], "Rewards to combine.")


def test_list_of_sections(tmp_path):
    path = write(tmp_path, "rewards:\n  - {name: clip, weight: 2}\n  - {name: aesthetic}\n")
    cfg = load_config(MultiRewardConfig, path)
    assert cfg.rewards == [RewardSpec("clip", 2.0), RewardSpec("aesthetic", 1.0)]
    path = write(tmp_path, "rewards:\n  - {name: clip, wieght: 2}\n", "bad.yaml")
    with pytest.raises(
        ConfigError, match=r"'rewards\[0\]\.wieght' in .*bad\.yaml; did you mean 'rewards\[0\]\.weight'"
    ):
        load_config(MultiRewardConfig, path)
    assert "rewards[].weight" in config_help(MultiRewardConfig)
