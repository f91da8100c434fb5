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


@pytest.fixture
def assert_same_continuation():
    """check(full, resumed, keys, weights, rel, abs): a resumed run's history equals the uninterrupted run's from the
    resumed step on (each key), and each (full, resumed) pair of safetensors files holds the same tensors (to 1e-6).
    Used by every recipe's kill/resume test."""
    from safetensors.torch import load_file

    def check(full: list[dict], resumed: list[dict], keys, weights=(), rel: float = 1e-6, abs: float = 1e-7) -> None:
        tail = [h for h in full if h["step"] >= resumed[0]["step"]]
        assert [h["step"] for h in tail] == [h["step"] for h in resumed]
        for a, b in zip(tail, resumed):
            for key in keys:
                if key not in a and key not in b:  # e.g. evaluation keys on steps without an evaluation
                    continue
                assert a.get(key) == pytest.approx(b.get(key), rel=rel, abs=abs), key
        for file_full, file_resumed in weights:
            w_full, w_res = load_file(str(file_full)), load_file(str(file_resumed))
            assert w_full.keys() == w_res.keys()
            for k in w_full:
                torch.testing.assert_close(w_full[k], w_res[k], rtol=0, atol=1e-6)

    return check
