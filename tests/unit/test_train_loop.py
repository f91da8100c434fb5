"""The bookkeeping of a run (imgalign.train.loop.Run) without a diffusion model: a tiny Linear, CPU accelerate.

The non-finite guard: a step whose loss or gradient norm is NaN/inf leaves the weights as they were, is counted
in train/nonfinite_skipped, the learning-rate schedule still moves on, the next finite step updates again and
resets the in-row count; run.max_nonfinite_steps skipped steps in a row stop the run with a NonFiniteError
before any checkpoint of that step. Checkpoints round-trip; one written by another recipe is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from imgalign.errors import CheckpointError, NonFiniteError
from imgalign.train.checkpoint import list_checkpoints, read_trainer_state
from imgalign.train.loop import Run
from imgalign.train.setup import OptimConfig, RunConfig

WEIGHTS = "weights.safetensors"
LR = 1e-2


@dataclass
class Cfg:
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def _cfg(out: Path, **run_kw) -> Cfg:
    kw = dict(output_dir=str(out), log_with="none", progress=False, checkpoint_every=1, keep_last=0, max_steps=6,
              max_nonfinite_steps=2)
    kw.update(run_kw)
    # linear decay over max_steps: after k scheduler steps lr = LR * (max_steps - k) / max_steps
    return Cfg(run=RunConfig(**kw), optim=OptimConfig(lr=LR, lr_scheduler="linear", warmup_steps=0))


def _save(model, folder: Path) -> None:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))


def _load(model, folder: Path) -> None:
    model.load_state_dict(load_file(str(folder / WEIGHTS)))


def _start(cfg: Cfg, recipe: str = "test-recipe", seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    book = Run(cfg, recipe)
    model, _, _ = book.prepare(net, cfg.optim, "full", _save, _load)
    state = book.resume()
    book.start()
    return book, model, state


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


X = torch.linspace(-1, 1, 12).reshape(4, 3)


def _one_step(book, model, step: int, kind: str) -> tuple[dict, bool]:
    """kind: ok | nan (loss * NaN: NaN loss and gradient) | nan_loss (loss + detached NaN: NaN loss, finite
    gradient) | inf_grad (finite loss, one gradient entry set to inf)."""
    base = (model(X) ** 2).mean()
    if kind == "nan":
        loss = base * float("nan")
    elif kind == "nan_loss":
        loss = base + torch.tensor(float("nan"))
    else:
        loss = base
    book.backward(loss)
    if kind == "inf_grad":
        model.weight.grad[0, 0] = float("inf")
    if kind == "nan_loss":
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # only the loss is bad
    updated = book.apply_gradients()
    logs = book.end_step(step, {"train/loss": float(loss.detach())}, {"custom": step})
    return logs, updated


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    """Steps: 1 ok, 2 nan, 3 ok, 4 inf_grad, 5 ok, 6 nan_loss, 7 nan (max_steps=10, max_nonfinite_steps=2).

    skipped after each step: 0, 1, 1, 2, 2, 3, 4; in a row: 0, 1, 0, 1, 0, 1, 2 -> step 7 raises.
    train/lr after step s (linear, 10 steps, the schedule moves on for skipped steps too) = LR * (10 - s) / 10.
    Checkpoints 1..6 are written (checkpoint_every=1), checkpoint-7 is not.
    """
    book, model, state = _start(_cfg(tmp_path / "out", max_steps=10))
    assert state == {}
    plan = ["ok", "nan", "ok", "inf_grad", "ok", "nan_loss"]
    expected_skipped = [0, 1, 1, 2, 2, 3]
    expected_in_row = [0, 1, 0, 1, 0, 1]
    after: dict[int, dict] = {}
    for step, (kind, n_skipped, in_row) in enumerate(zip(plan, expected_skipped, expected_in_row), start=1):
        before = _weights(model)
        logs, updated = _one_step(book, model, step, kind)
        after[step] = _weights(model)
        if kind == "ok":
            assert updated and not _same(before, after[step]), f"step {step} should update"
        else:
            # catches: `if not skip: optimizer.step()` -> unconditional step; dropping the `_bad_loss` check
            # (the nan_loss step has finite gradients, so only the loss flag can skip it)
            assert not updated and _same(before, after[step]), f"step {step} ({kind}) changed the weights"
        # catches: `self.skipped += 1` dropped or `skipped_in_row = 0` not reset on a finite step
        assert logs["train/nonfinite_skipped"] == float(n_skipped)
        assert book.skipped_in_row == in_row
        # catches: `self.scheduler.step()` moved under `if not skip` (skipped steps would not advance lr)
        assert logs["train/lr"] == pytest.approx(LR * (10 - step) / 10)
        assert all(torch.isfinite(v).all() for v in after[step].values())
    assert math.isinf(book.history[3]["train/grad_norm"])  # step 4 logged its inf norm
    assert math.isnan(book.history[5]["train/loss"])

    frozen = _weights(model)
    # catches: `>=` -> `>` in the stop check (a third bad step would be needed)
    with pytest.raises(NonFiniteError) as e:
        _one_step(book, model, 7, "nan")
    msg = str(e.value)
    assert "step 7" in msg and "run.max_nonfinite_steps" in msg and "checkpoint-6" in msg
    assert _same(frozen, _weights(model))

    out = tmp_path / "out"
    # catches: saving before the stop check in end_step (a checkpoint of the failing step)
    assert [p.name for p in list_checkpoints(out)] == [f"checkpoint-{s}" for s in range(1, 7)]
    for s in range(1, 7):
        saved = load_file(str(out / f"checkpoint-{s}" / WEIGHTS))
        assert all(torch.isfinite(v).all() for v in saved.values())
        assert _same(saved, after[s])  # each checkpoint holds the weights after its own step
        ts = read_trainer_state(out / f"checkpoint-{s}")
        assert ts["step"] == s and ts["custom"] == s and ts["recipe"] == "test-recipe" and ts["layout"] == "full"
        assert ts["nonfinite_skipped"] == expected_skipped[s - 1]
    book.accelerator.end_training()

    # resume from the last good checkpoint: weights, step and the skip count come back
    book2, model2, state2 = _start(_cfg(out, max_steps=10, resume_from="latest"), seed=123)
    assert state2["step"] == 6 and book2.start_step == 6 and book2.skipped == 3
    assert _same(_weights(model2), after[6])
    book2.accelerator.end_training()


def test_checkpoint_is_never_written_with_nonfinite_weights(tmp_path):
    """A weight that became NaN outside the guard (e.g. a bad load) blocks the scheduled save of step 1."""
    book, model, _ = _start(_cfg(tmp_path / "out"))
    with torch.no_grad():
        model.bias[0] = float("nan")
    book.backward((model.weight ** 2).sum())  # finite loss and gradient: the step itself is fine
    book.apply_gradients()
    # catches: dropping check_finite_weights from Run.save
    with pytest.raises(CheckpointError, match="step 1"):
        book.end_step(1, {}, {})
    assert list_checkpoints(tmp_path / "out") == []
    book.accelerator.end_training()


def test_finish_writes_the_final_checkpoint_and_returns_the_result(tmp_path):
    """max_steps=3, checkpoint_every=1: the loop saves checkpoint-1 and -2 (never at max_steps), finish saves
    checkpoint-3 and calls save_final once with the unwrapped model."""
    out = tmp_path / "out"
    book, model, _ = _start(_cfg(out, max_steps=3, checkpoint_every=1))
    saves = []
    real_save = book.save
    book.save = lambda step, state: saves.append(step) or real_save(step, state)
    for step in (1, 2, 3):
        _one_step(book, model, step, "ok")
    # catches: `step < run.max_steps` dropped (the loop would save checkpoint-3, then finish again)
    assert saves == [1, 2]
    finals = []
    result = book.finish(3, {"custom": 3}, lambda m: finals.append(_weights(m)))
    assert set(result) == {"steps", "history", "validation", "seconds", "output_dir"}
    assert result["steps"] == 3 and result["output_dir"] == str(out) and result["validation"] == []
    assert [h["step"] for h in result["history"]] == [1, 2, 3] and result["seconds"] >= 0
    assert saves == [1, 2, 3]  # one save per step: the final one only once
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert len(finals) == 1 and _same(finals[0], _weights(model))
    assert _same(load_file(str(out / "checkpoint-3" / WEIGHTS)), _weights(model))
    assert (out / "config.yaml").is_file()  # the run record


def test_resume_refuses_a_checkpoint_of_another_recipe(tmp_path):
    out = tmp_path / "out"
    book, model, _ = _start(_cfg(out, max_steps=1), recipe="other")
    _one_step(book, model, 1, "ok")
    book.finish(1, {}, lambda m: None)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    # catches: Run.resume calling load_checkpoint without self.identity
    with pytest.raises(CheckpointError) as e:
        _start(_cfg(out, max_steps=2, resume_from="latest"), recipe="test-recipe")
    msg = str(e.value)
    assert "'other'" in msg and "'test-recipe'" in msg and "checkpoint-1" in msg


# ---- several trained networks, several optimizers, extra state -----------------------------------------


class _Counter:
    """Extra state with its own file: the number of steps it has seen."""

    def __init__(self):
        self.n = 0

    def save(self, folder: Path) -> None:
        (folder / "counter.txt").write_text(str(self.n))

    def load(self, folder: Path) -> None:
        self.n = int((folder / "counter.txt").read_text())


def _two_network_run(out: Path, max_steps: int, die_at: int | None = None, resume: bool = False):
    """A student and a critic (Flash-DMD's shape): two networks, two optimizers with different learning rates,
    each updated from its own loss every step, and a counter as extra state. -> (history, student, critic)."""
    cfg = _cfg(out, max_steps=max_steps, checkpoint_every=2, resume_from="latest" if resume else None)
    critic_optim = OptimConfig(lr=3e-2, lr_scheduler="constant")
    torch.manual_seed(0)
    student, critic = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    book = Run(cfg, "two-networks")
    student, _, _ = book.prepare(student, cfg.optim, "full", _save, _load)
    critic, _, _ = book.prepare(critic, critic_optim, "full", _save, _load, name="critic")
    counter = _Counter()
    book.add_state("counter", counter.save, counter.load)
    book.resume()
    book.start()
    step = book.start_step
    while step < max_steps:
        if die_at is not None and step + 1 == die_at:
            raise KeyboardInterrupt
        x = X * (step + 1)
        student_loss = (critic(student(x)) ** 2).mean()  # the student moves to lower the critic's output
        book.backward(student_loss)
        book.apply_gradients()
        critic.zero_grad(set_to_none=True)
        critic_loss = ((critic(student(x).detach()) - 1) ** 2).mean()  # the critic fits 1 on the student's output
        book.backward(critic_loss)
        book.apply_gradients("critic")
        counter.n += 1
        step += 1
        book.end_step(step, {"train/loss": float(student_loss), "train/critic_loss": float(critic_loss)}, {})
    book.finish(step, {}, lambda m: _save(m, out))
    return book.history, _weights(student), _weights(critic), counter.n


def test_two_networks_two_optimizers_kill_and_resume_equal_the_uninterrupted_run(tmp_path):
    """Killed during step 4 (after checkpoint-2), resumed from latest: the same losses, both networks' weights and
    the extra state as the run that was never interrupted. The critic lives in checkpoint-N/critic/."""
    full_hist, full_student, full_critic, full_n = _two_network_run(tmp_path / "full", 5)
    with pytest.raises(KeyboardInterrupt):
        _two_network_run(tmp_path / "killed", 5, die_at=4)
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["checkpoint-2"]
    ckpt = tmp_path / "killed" / "checkpoint-2"
    assert (ckpt / WEIGHTS).is_file() and (ckpt / "critic" / WEIGHTS).is_file() and (ckpt / "counter.txt").is_file()
    assert (ckpt / "optimizer.bin").is_file() and (ckpt / "optimizer_1.bin").is_file()
    hist, student, critic, n = _two_network_run(tmp_path / "killed", 5, resume=True)
    assert [h["step"] for h in hist] == [3, 4, 5]
    for a, b in zip(full_hist[2:], hist):
        assert a["train/loss"] == b["train/loss"] and a["train/critic_loss"] == b["train/critic_loss"]
    assert _same(full_student, student) and _same(full_critic, critic) and n == full_n == 5
    # the two networks really trained separately (different parameters, both moved)
    state = read_trainer_state(tmp_path / "full" / "checkpoint-5")
    assert state["layout"] == "model: full; critic: full" and state["recipe"] == "two-networks"


def test_a_checkpoint_with_another_set_of_networks_is_refused(tmp_path):
    _two_network_run(tmp_path / "run", 2)
    cfg = _cfg(tmp_path / "run", max_steps=4, resume_from="latest")
    book = Run(cfg, "two-networks")
    book.prepare(torch.nn.Linear(3, 2), cfg.optim, "full", _save, _load)  # the critic is missing
    with pytest.raises(CheckpointError, match="layout"):
        book.resume()


def test_a_backend_that_returns_no_gradient_norm_still_trains(tmp_path, monkeypatch):
    """DeepSpeed clips inside its engine and accelerate's clip_grad_norm_ returns None: the step is not taken for
    non-finite (the loss alone decides), the logged norm is NaN."""
    book, model, _ = _start(_cfg(tmp_path / "run", max_steps=2))
    monkeypatch.setattr(book.accelerator, "clip_grad_norm_", lambda *a, **k: None)
    before = _weights(model)
    book.backward((model(X) ** 2).mean())
    assert book.apply_gradients()
    logs = book.end_step(1, {}, {})
    assert not _same(before, _weights(model)) and logs["train/nonfinite_skipped"] == 0
    assert math.isnan(logs["train/grad_norm"])


class _TwoIdenticalRanks:
    """An accelerator of 2 processes whose other rank holds the same tensors: reduce(sum) doubles."""
    num_processes = 2

    def reduce(self, t, reduction="mean"):
        return t * 2 if reduction == "sum" else t


def test_average_gradients_keeps_missing_gradients_missing_and_buckets_exactly():
    from imgalign.train.loop import average_gradients

    params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(4)]
    for p in params[:3]:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params[:3]]
    average_gradients(_TwoIdenticalRanks(), params, bucket=7)  # buckets of one or two parameters
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert params[3].grad is None  # AdamW skips it, as on one process


def test_named_networks_refuse_sharded_backends():
    from accelerate.utils import DistributedType

    from imgalign.config import ConfigError
    from imgalign.train.loop import check_reduced_gradients_backend

    class Acc:
        distributed_type = DistributedType.FSDP

    with pytest.raises(ConfigError, match="critic.*FSDP.*DDP config"):
        check_reduced_gradients_backend(Acc(), "critic")
    Acc.distributed_type = DistributedType.MULTI_GPU
    check_reduced_gradients_backend(Acc(), "critic")
