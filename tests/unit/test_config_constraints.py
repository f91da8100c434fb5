"""Config constraints: cfg_field ge/gt/le/lt/exists and Literal choices are checked by load_config before any
recipe starts, each refusal is a ConfigError naming the dotted key; the real recipe schemas refuse bad values
with the key in the message; the CLI turns that into one `error:` line and exit code 2, with no model loaded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from imgalign.config import ConfigError, cfg_field, check_constraints, load_config

# ---- small schemas built here ------------------------------------------------------------------------


@dataclass
class Inner:
    n: int = cfg_field(1, "count", ge=1)
    frac: float = cfg_field(0.5, "fraction", gt=0, lt=1)
    cap: float = cfg_field(1.0, "at most 2", le=2)
    weights: list[float] = cfg_field([1.0, 2.0], "every weight >= 0", ge=0)


@dataclass
class Schema:
    inner: Inner = cfg_field(Inner, "section")
    rate: float = cfg_field(0.1, "rate", gt=0)
    file: str | None = cfg_field(None, "an existing file", exists="file")
    folder: str | None = cfg_field(None, "an existing folder", exists="dir")
    precision: Literal["no", "fp16"] = cfg_field("fp16", "YAML reads `no` as False")
    switch: Literal["on", "off", "auto"] = cfg_field("auto", "YAML reads `on`/`off` as booleans")
    mode: Literal["raise", "skip"] = cfg_field("raise", "no choice spelled like a boolean")
    flag: bool = cfg_field(False, "a real bool stays a bool")


@pytest.mark.parametrize("override, key, words", [
    ("inner.n=0", "inner.n", "must be >= 1"),  # catches: ge checked with `>` (1 refused) or not at all
    ("inner.frac=0", "inner.frac", "must be > 0"),  # catches: gt checked as `>=`
    ("inner.frac=1", "inner.frac", "must be < 1"),  # catches: lt checked as `<=`
    ("inner.cap=2.5", "inner.cap", "must be <= 2"),
    ("inner.weights=[1.0,-0.5]", "inner.weights", "must be >= 0"),  # catches: lists skipped (only scalars checked)
    ("rate=-1", "rate", "must be > 0"),  # catches: top-level fields skipped (prefix bug)
    ("rate=.nan", "rate", "NaN"),  # catches: dropping the NaN check (NaN compares False with every bound)
])
def test_bounds_refused_naming_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(Schema, None, [override])
    msg = str(e.value)
    # catches: a message without the dotted prefix (`f.name` instead of `prefix + f.name`)
    assert f"'{key}'" in msg and words in msg and f"{key}=..." in msg


@pytest.mark.parametrize("override", ["inner.n=1", "inner.frac=0.999", "inner.cap=2", "inner.weights=[0, 3]",
                                      "rate=1e-9"])
def test_bounds_accept_the_edges(override):
    """ge and le accept the bound itself; gt/lt accept anything strictly inside."""
    load_config(Schema, None, [override])


def test_exists_file_and_dir(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    cfg = load_config(Schema, None, [f"file={f}", f"folder={tmp_path}"])
    assert cfg.file == str(f) and cfg.folder == str(tmp_path)
    load_config(Schema, None, ["file=null"])  # None skips the check
    with pytest.raises(ConfigError, match=r"'file'.*must be an existing file;"):
        load_config(Schema, None, [f"file={tmp_path / 'missing.txt'}"])
    # catches: exists="file" checked with `exists()` (a folder would pass)
    with pytest.raises(ConfigError, match=r"'file'.*\(it is a folder\)"):
        load_config(Schema, None, [f"file={tmp_path}"])
    with pytest.raises(ConfigError, match=r"'folder'.*must be an existing folder"):
        load_config(Schema, None, [f"folder={f}"])


def test_check_constraints_on_an_instance():
    """check_constraints also works on a directly built instance: Inner(n=0) nested under Schema."""
    check_constraints(Schema())
    with pytest.raises(ConfigError, match=r"'inner\.n' = 0 must be >= 1"):
        check_constraints(Schema(inner=Inner(n=0)))
    # a bool is not a number here (True == 1 would otherwise be bounds-checked)
    check_constraints(Inner(n=True))


def test_literal_choices_spelled_like_booleans():
    """YAML 1.1 reads no/off/on as booleans; a Literal with that word gets its word back."""
    cfg = load_config(Schema, None, ["precision=no", "switch=off"])
    # catches: dropping the Literal-bool normalisation (OmegaConf would refuse False for Literal['no','fp16'])
    assert cfg.precision == "no" and cfg.switch == "off"
    assert load_config(Schema, None, ["switch=on"]).switch == "on"
    assert load_config(Schema, None, ["flag=yes"]).flag is True  # a bool field keeps the bool
    # a Literal without such a word still refuses the boolean, naming the key
    with pytest.raises(ConfigError, match=r"'mode'.*one of 'raise', 'skip'"):
        load_config(Schema, None, ["mode=yes"])
    with pytest.raises(ConfigError, match=r"'mode'.*'maybe'"):
        load_config(Schema, None, ["mode=maybe"])


# ---- the real recipe schemas ------------------------------------------------------------------------


@pytest.fixture
def pairs(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"caption": "a", "jpg_0": "0.png", "jpg_1": "1.png", "label_0": 1}\n')
    return str(p)


def _dpo(pairs, *overrides):
    from imgalign.recipes.diffusion_dpo import Config

    return load_config(Config, None, ["model.pretrained=x", f"data.source={pairs}", *overrides])


@pytest.mark.parametrize("override, key", [
    ("run.batch_size=0", "run.batch_size"),
    ("run.grad_accum=0", "run.grad_accum"),
    ("optim.lr=-1", "optim.lr"),
    ("run.max_steps=-5", "run.max_steps"),
    ("run.checkpoint_every=-1", "run.checkpoint_every"),
    ("run.keep_last=-1", "run.keep_last"),
    ("loss.beta=0", "loss.beta"),
    ("loss.loss_type=[nope]", "loss.loss_type"),
    ("loss.noise_range=[0.9,0.1]", "loss.noise_range"),
    ("data.on_error=maybe", "data.on_error"),
    ("run.resume_from=/nonexistent", "run.resume_from"),
    ("data.source=/nonexistent/pairs.jsonl", "data.source"),
    ("validation.prompts=[]", "validation.prompts"),
])
def test_diffusion_dpo_refuses_bad_values_naming_the_key(pairs, override, key):
    _dpo(pairs)  # the base config itself is valid: only the override is bad
    with pytest.raises(ConfigError) as e:
        _dpo(pairs, override)
    assert key in str(e.value)


def test_diffusion_dpo_unknown_loss_type_is_refused_at_load(pairs):
    """The weaker promise that does hold: an unknown loss name fails at config time, with the name."""
    with pytest.raises(ConfigError, match="unknown loss type 'nope'"):
        _dpo(pairs, "loss.loss_type=[nope]")


def test_diffusion_dpo_values_that_load(pairs):
    cfg = _dpo(pairs, "run.mixed_precision=no", "loss.params={f_divergence: js_divergence}")
    # YAML reads `no` as False; the Literal['no', 'fp16', 'bf16'] gets the string back
    assert cfg.run.mixed_precision == "no" and isinstance(cfg.run.mixed_precision, str)
    assert cfg.loss.params == {"f_divergence": "js_divergence"}
    assert _dpo(pairs, "run.mixed_precision=bf16").run.mixed_precision == "bf16"


def test_pref_grpo_refuses_grad_accum():
    from imgalign.recipes.pref_grpo import Config

    load_config(Config, None, ["model.pretrained=x"])
    with pytest.raises(ConfigError, match=r"run\.grad_accum") as e:
        load_config(Config, None, ["model.pretrained=x", "run.grad_accum=2"])
    assert "sample.groups_per_iteration" in str(e.value)


def test_self_npo_needs_starting_states():
    from imgalign.recipes.self_npo import Config

    with pytest.raises(ConfigError, match=r"data\.prompts"):
        load_config(Config, None, ["model.pretrained=x"])
    assert load_config(Config, None, ["model.pretrained=x", "data.prompts=[a cat]"]).data.prompts == ["a cat"]


# ---- the command line -----------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, key", [
    (["data.source=/nonexistent.jsonl"], "data.source"),  # a __post_init__ check
    (["data.source={pairs}", "run.batch_size=0"], "run.batch_size"),  # a constraint (check_constraints)
])
def test_cli_refuses_before_loading_a_model(monkeypatch, capsys, pairs, extra, key):
    import imgalign.models.adapters
    import imgalign.recipes.common
    import imgalign.recipes.diffusion_dpo
    from imgalign.cli import main

    def boom(*a, **kw):
        raise AssertionError("a model was loaded before the config was checked")

    for mod, name in [(imgalign.recipes.common, "load_model"), (imgalign.recipes.diffusion_dpo, "load_model"),
                      (imgalign.recipes.common, "load_adapter"), (imgalign.models.adapters, "load_adapter")]:
        monkeypatch.setattr(mod, name, boom)
    monkeypatch.delenv("IMGALIGN_DEBUG", raising=False)
    argv = ["train", "diffusion-dpo", "model.pretrained=x", *(a.format(pairs=pairs) for a in extra)]
    # catches: main() not catching UserError (a traceback and exit 1), or load_config after load_model
    assert main(argv) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and key in error_lines[0]
    assert "Traceback" not in err


def test_shipped_config_paths_resolve_from_another_folder(tmp_path, monkeypatch):
    """configs/pref_grpo/toy.yaml names assets/toy/... relative to the repository: it loads from any folder, and a
    path that exists in the current folder wins."""
    from imgalign.recipes import pref_grpo

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(tmp_path)
    cfg = load_config(pref_grpo.Config, repo / "configs" / "pref_grpo" / "toy.yaml")
    assert Path(cfg.model.pretrained).is_absolute() and Path(cfg.model.pretrained).is_dir()
    assert Path(cfg.model.pretrained) == repo / "assets" / "toy" / "sd"
    (tmp_path / "assets" / "toy" / "sd").mkdir(parents=True)  # a local folder of the same name is taken instead
    cfg = load_config(pref_grpo.Config, repo / "configs" / "pref_grpo" / "toy.yaml")
    assert cfg.model.pretrained == "assets/toy/sd"
