"""Shared helpers of the recipe tests: one torch thread, the tiny LLM task."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models are several times faster on one thread, and the CI machine's 2 cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def llm_assets(tmp_path_factory):
    """A tiny Llama and the synthetic sort-preference task (train and held-out JSONL), built once."""
    from imgalign.llm.synthetic import build_sort_assets

    return build_sort_assets(tmp_path_factory.mktemp("llm"), n_train=32, n_heldout=8, seed=0)


@pytest.fixture
def run_killed(monkeypatch):
    """run_killed(module, name, call, train): run train() with module.name raising KeyboardInterrupt on its
    `call`-th call (as a SIGKILL inside that step: nothing after it runs, no final save); the real function is
    restored afterwards. Used by every recipe's kill/resume test."""

    def run(module, name: str, call: int, train) -> None:
        real, calls = getattr(module, name), {"n": 0}

        def dying(*a, **k):
            calls["n"] += 1
            if calls["n"] == call:
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(module, name, dying)
        try:
            with pytest.raises(KeyboardInterrupt):
                train()
        finally:
            monkeypatch.setattr(module, name, real)

    return run


@pytest.fixture
def in_folder_with_outputs(tmp_path, monkeypatch):
    """in_folder_with_outputs(config): work in a scratch folder holding empty stand-ins for the `outputs/...` paths a
    shipped config reads (written by an earlier documented command, e.g. configs/llm_dpo/tiny.yaml's data), so the
    config loads as shipped; relative assets/ paths still resolve against the repository."""
    from omegaconf import OmegaConf

    def enter(config) -> None:
        stack = [OmegaConf.to_container(OmegaConf.load(config))]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, str) and node.startswith("outputs/"):
                path = tmp_path / node
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.suffix:
                    path.touch()
                else:
                    path.mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path)

    return enter
