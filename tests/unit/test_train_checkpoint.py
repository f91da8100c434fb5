"""Checkpoints: numeric listing, resume resolution, atomic publish, re-save, pruning (also interrupted),
trainer_state.json checks, compatibility, load errors, fingerprint and the finite-weights guard.

No model is needed: `FakeAccelerator` stands in for accelerate. Its `save_state(path)` writes
`random_states_0.pkl` and one `save-<k>.txt` file per call, so a test can tell which save a folder holds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import imgalign.train.checkpoint as ckpt_mod
from imgalign.errors import CheckpointError
from imgalign.train.checkpoint import (
    check_compatible,
    check_finite_weights,
    clean_stale,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
    trainable_fingerprint,
)


class FakeAccelerator:
    is_main_process = True

    def __init__(self, load_error: Exception | None = None):
        self.saves = 0
        self.waits = 0
        self.loaded: list[str] = []
        self.load_error = load_error

    def wait_for_everyone(self):
        self.waits += 1

    def save_state(self, path):
        self.saves += 1
        p = Path(path)
        (p / "random_states_0.pkl").write_bytes(b"rng")
        (p / f"save-{self.saves}.txt").write_text(str(self.saves))

    def load_state(self, path):
        if self.load_error is not None:
            raise self.load_error
        self.loaded.append(path)


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def _make_ckpt(d: Path, step: int, **state) -> Path:
    p = d / f"checkpoint-{step}"
    p.mkdir(parents=True)
    (p / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
    return p


def _complete(p: Path) -> bool:
    """A published checkpoint holds the rank state and trainer_state.json with its own step."""
    state = json.loads((p / "trainer_state.json").read_text())
    return (p / "random_states_0.pkl").is_file() and state["step"] == int(p.name.split("-")[1])


# ---- listing and resume resolution ------------------------------------------------------------------


def test_list_checkpoints_numeric_order_ignores_temp_deleting_and_files(tmp_path):
    """checkpoint-{10, 9, 100} -> [9, 10, 100]; lexicographic order would give [10, 100, 9]."""
    for s in (10, 9, 100):
        _make_ckpt(tmp_path, s)
    (tmp_path / ".checkpoint-200.tmp").mkdir()
    (tmp_path / ".checkpoint-3.deleting").mkdir()
    (tmp_path / "checkpoint-300").write_text("a file, not a folder")
    (tmp_path / "checkpoint-x").mkdir()
    # catches: `sorted(found, key=str)` / sorting by path name; dropping `p.is_dir()`; a regex without `^`/`$`
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_resolve_resume_latest_none_and_bad_folder(tmp_path):
    """latest -> checkpoint-10 (newest, not checkpoint-9 which sorts last as a string); None/"" -> None."""
    _make_ckpt(tmp_path, 9)
    _make_ckpt(tmp_path, 10)
    # catches: `ckpts[0]` instead of `ckpts[-1]`
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-10"
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path / "empty", "latest") is None  # fresh run when nothing was saved yet
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoint-10")) == tmp_path / "checkpoint-10"
    bad = tmp_path / "not-a-ckpt"
    bad.mkdir()
    # catches: dropping the trainer_state.json check (a half folder would be resumed)
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        resolve_resume(tmp_path, str(bad))


# ---- saving -------------------------------------------------------------------------------------------


def test_save_publishes_atomically_with_state(tmp_path):
    """save_checkpoint(step=5, {"recipe": "r"}) -> checkpoint-5/ with trainer_state {"step": 5, "recipe": "r"}
    and the accelerator's files; no `.checkpoint-*` folder is left over."""
    acc = FakeAccelerator()
    out = save_checkpoint(acc, tmp_path, 5, {"recipe": "r", "layout": "full"}, keep_last=0)
    assert out == tmp_path / "checkpoint-5"
    # catches: writing {**state} without "step", or step taken from somewhere else
    assert json.loads((out / "trainer_state.json").read_text()) == {"step": 5, "recipe": "r", "layout": "full"}
    assert (out / "random_states_0.pkl").is_file() and (out / "save-1.txt").is_file()
    # catches: copying instead of renaming the tmp folder (tmp left behind)
    assert _names(tmp_path) == ["checkpoint-5"]
    assert acc.waits >= 2  # every rank waits before publishing


def test_resave_same_step_replaces_contents(tmp_path):
    """Saving step 3 twice: the folder holds save 2's files only (save-2.txt, no save-1.txt)."""
    acc = FakeAccelerator()
    save_checkpoint(acc, tmp_path, 3, {"v": "old"}, keep_last=0)
    save_checkpoint(acc, tmp_path, 3, {"v": "new"}, keep_last=0)
    p = tmp_path / "checkpoint-3"
    # catches: skipping the rename when `final` exists (old contents kept), or merging the folders
    assert json.loads((p / "trainer_state.json").read_text())["v"] == "new"
    assert (p / "save-2.txt").is_file() and not (p / "save-1.txt").exists()
    assert _names(tmp_path) == ["checkpoint-3"]


def test_save_clears_a_stale_tmp_of_the_same_step(tmp_path):
    """A killed save of step 4 left `.checkpoint-4.tmp/junk`; the next save of step 4 does not publish junk."""
    stale = tmp_path / ".checkpoint-4.tmp"
    stale.mkdir()
    (stale / "junk").write_text("x")
    save_checkpoint(FakeAccelerator(), tmp_path, 4, {}, keep_last=0)
    # catches: dropping the `shutil.rmtree(tmp)` before mkdir (mkdir would fail or junk would be published)
    assert not (tmp_path / "checkpoint-4" / "junk").exists()


@pytest.mark.parametrize(
    "keep_last, expected",
    [
        (2, ["checkpoint-3", "checkpoint-4"]),  # the two newest
        (0, ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]),  # 0 keeps all
        (None, ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]),
        (1, ["checkpoint-4"]),  # the one just written survives
    ],
)
def test_keep_last(tmp_path, keep_last, expected):
    """Saves at steps 1..4 with keep_last K keep steps max(1, 5-K)..4 (K=0: all)."""
    acc = FakeAccelerator()
    for s in (1, 2, 3, 4):
        save_checkpoint(acc, tmp_path, s, {}, keep_last)
    # catches: `[:-keep_last]` -> `[:keep_last]` or `[keep_last:]` (keeps the oldest / deletes the newest);
    # `if not keep_last` removed (keep_last=0 -> `[:-0]` == [] deletes nothing, but None would crash)
    assert _names(tmp_path) == expected
    assert all(_complete(tmp_path / n) for n in expected)


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """The docstring of save_checkpoint: "the checkpoint just written is never pruned". A run resumed from
    checkpoint-2 while checkpoint-5 (an abandoned continuation) is still there, keep_last=1: saving step 3
    lists [2, 3, 5], keeps [5] and so deletes checkpoint-3, the one it returns."""
    acc = FakeAccelerator()
    save_checkpoint(acc, tmp_path, 2, {}, keep_last=0)
    save_checkpoint(acc, tmp_path, 5, {}, keep_last=0)
    out = save_checkpoint(acc, tmp_path, 3, {}, keep_last=1)
    assert out.is_dir(), "save_checkpoint returned a path it had just pruned"


def test_resuming_below_newer_checkpoints_is_refused(tmp_path):
    """Resuming from checkpoint-2 while checkpoint-5 is in the same folder would let `latest` pick the abandoned
    future after a kill: refused, naming the newer folder."""
    acc = FakeAccelerator()
    save_checkpoint(acc, tmp_path, 2, {}, keep_last=0)
    save_checkpoint(acc, tmp_path, 5, {}, keep_last=0)
    with pytest.raises(CheckpointError, match="checkpoint-5"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoint-2"))
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoint-5")) == tmp_path / "checkpoint-5"


def test_interrupted_prune_leaves_only_complete_checkpoints_and_clean_stale_removes_leftovers(tmp_path, monkeypatch):
    """Steps 1, 2, then 3 with keep_last=2: pruning checkpoint-1 renames it to .checkpoint-1.deleting, then
    rmtree is interrupted. Left: checkpoint-2, checkpoint-3 (complete) and .checkpoint-1.deleting."""
    acc = FakeAccelerator()
    save_checkpoint(acc, tmp_path, 1, {}, keep_last=2)
    save_checkpoint(acc, tmp_path, 2, {}, keep_last=2)

    real_rmtree = shutil.rmtree
    calls = {"n": 0}

    def flaky_rmtree(path, *a, **kw):
        if Path(path).name.endswith(".deleting") and calls["n"] == 0:
            calls["n"] += 1
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", flaky_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(acc, tmp_path, 3, {}, keep_last=2)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", real_rmtree)

    # catches: `_delete` doing rmtree(folder) directly (a half-deleted checkpoint-1 would keep its name)
    assert _names(tmp_path) == [".checkpoint-1.deleting", "checkpoint-2", "checkpoint-3"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert all(_complete(p) for p in list_checkpoints(tmp_path))
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-3"

    (tmp_path / ".checkpoint-7.tmp").mkdir()  # a killed save
    (tmp_path / "notes.txt").write_text("kept")
    clean_stale(tmp_path)
    # catches: clean_stale matching only one of the two suffixes
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-3", "notes.txt"]

    # and a later prune of the same name copes with a leftover `.deleting` folder
    (tmp_path / ".checkpoint-2.deleting").mkdir()
    save_checkpoint(acc, tmp_path, 4, {}, keep_last=2)
    assert _names(tmp_path) == ["checkpoint-3", "checkpoint-4", "notes.txt"]


# ---- trainer_state.json, compatibility, loading --------------------------------------------------------


def test_read_trainer_state_missing_step_or_bad_json_names_the_file(tmp_path):
    a = tmp_path / "checkpoint-1"
    a.mkdir()
    (a / "trainer_state.json").write_text(json.dumps({"recipe": "x"}))
    # catches: dropping the "step" check (a KeyError later, naming nothing)
    with pytest.raises(CheckpointError, match="step") as e:
        read_trainer_state(a)
    assert str(a / "trainer_state.json") in str(e.value)

    (a / "trainer_state.json").write_text(json.dumps({"step": "3"}))  # not an int
    with pytest.raises(CheckpointError, match="integer 'step'"):
        read_trainer_state(a)

    (a / "trainer_state.json").write_text("{not json")
    # catches: `except OSError` only (a JSONDecodeError would escape as a bug)
    with pytest.raises(CheckpointError) as e:
        read_trainer_state(a)
    assert str(a / "trainer_state.json") in str(e.value)

    (a / "trainer_state.json").write_text(json.dumps([1, 2]))
    with pytest.raises(CheckpointError):
        read_trainer_state(a)

    (a / "trainer_state.json").write_text(json.dumps({"step": 7, "recipe": "x"}))
    assert read_trainer_state(a) == {"step": 7, "recipe": "x"}


@pytest.mark.parametrize("key, saved, expected", [
    ("recipe", "pref-grpo", "diffusion-dpo"),
    ("layout", "lora r=8 alpha=8 targets=to_q", "full"),
    ("fingerprint", "aaaa", "bbbb"),
])
def test_check_compatible_names_both_values(tmp_path, key, saved, expected):
    base = {"recipe": "diffusion-dpo", "layout": "full", "fingerprint": "bbbb"}
    check_compatible(tmp_path, dict(base), dict(base))  # identical: fine
    check_compatible(tmp_path, {"step": 1}, dict(base))  # an older checkpoint without the keys: fine
    # catches: a loop over ("recipe",) only, or `==` instead of `!=`
    with pytest.raises(CheckpointError) as e:
        check_compatible(tmp_path, {**base, key: saved}, {**base, key: expected})
    msg = str(e.value)
    assert repr(saved) in msg and repr(expected) in msg and key in msg and str(tmp_path) in msg


def test_load_checkpoint_checks_then_restores_and_wraps_errors(tmp_path):
    p = _make_ckpt(tmp_path, 4, recipe="diffusion-dpo")
    acc = FakeAccelerator()
    assert load_checkpoint(acc, p, {"recipe": "diffusion-dpo"}) == {"step": 4, "recipe": "diffusion-dpo"}
    assert acc.loaded == [str(p)]

    acc = FakeAccelerator()
    # catches: check_compatible after load_state (the wrong weights would already be loaded)
    with pytest.raises(CheckpointError, match="pref-grpo"):
        load_checkpoint(acc, p, {"recipe": "pref-grpo"})
    assert acc.loaded == []

    acc = FakeAccelerator(load_error=RuntimeError("truncated optimizer.bin"))
    # catches: dropping the try/except around load_state
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(acc, p)
    assert str(p) in str(e.value) and "truncated optimizer.bin" in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError)


# ---- fingerprint and finite weights -------------------------------------------------------------------


def _two_part_net(trainable_out=3, frozen_out=2):
    net = torch.nn.ModuleDict({"a": torch.nn.Linear(4, trainable_out), "f": torch.nn.Linear(4, frozen_out)})
    net["f"].requires_grad_(False)
    return net


def test_trainable_fingerprint_tracks_trainable_shapes_only():
    base = trainable_fingerprint(_two_part_net())
    assert base == trainable_fingerprint(_two_part_net())  # values do not matter (fresh random init)
    assert len(base) == 16
    # catches: hashing names only (no shape)
    assert trainable_fingerprint(_two_part_net(trainable_out=5)) != base
    # catches: dropping the `if p.requires_grad` filter
    assert trainable_fingerprint(_two_part_net(frozen_out=7)) == base
    net = _two_part_net()
    net["f"].requires_grad_(True)  # a frozen part becomes trainable: another layout
    assert trainable_fingerprint(net) != base


def test_check_finite_weights_trainable_nan_only():
    net = _two_part_net()
    check_finite_weights(net, 1)
    with torch.no_grad():
        net["f"].weight[0, 0] = float("nan")
    # catches: dropping `p.requires_grad` (a frozen NaN would block saving)
    check_finite_weights(net, 2)
    with torch.no_grad():
        net["a"].bias[1] = float("inf")
    # catches: `torch.isnan(p).any()` in place of `not torch.isfinite(p).all()` (inf would pass)
    with pytest.raises(CheckpointError, match=r"step 3: 1 trainable tensors.*a\.bias"):
        check_finite_weights(net, 3)
