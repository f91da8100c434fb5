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
