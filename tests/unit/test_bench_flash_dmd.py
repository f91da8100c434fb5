"""Pure helpers of scripts/bench_flash_dmd.py --toy: Frechet distance, diversity, convergence."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_SPEC = importlib.util.spec_from_file_location(
    "bench_flash_dmd", Path(__file__).resolve().parents[2] / "scripts" / "bench_flash_dmd.py")
bench = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench)

CROSS = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # mean 0, sample covariance 2/3 I


def test_frechet_distance_is_zero_for_identical_sets():
    x = np.random.default_rng(0).normal(size=(50, 6))
    assert bench.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert bench.frechet_distance(x, x, ridge=0.0) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_two_known_gaussians():
    # a: mean 0, covariance diag(2/3, 2/3); b: x scaled by 2, y by 3, shifted by (3, -1): mean (3, -1),
    # covariance diag(8/3, 6). FD = 10 + sum (sqrt(s_a) - sqrt(s_b))^2 = 10 + 2/3 + (sqrt(2/3) - sqrt(6))^2
    b = CROSS * [2.0, 3.0] + [3.0, -1.0]
    expected = 10 + 2 / 3 + (np.sqrt(2 / 3) - np.sqrt(6)) ** 2
    assert bench.frechet_distance(CROSS, b, ridge=0.0) == pytest.approx(expected, rel=1e-9)
    assert bench.frechet_distance(b, CROSS, ridge=0.0) == pytest.approx(expected, rel=1e-9)
    # the ridge adds r to every variance of both: sum over dims of (sqrt(s_a + r) - sqrt(s_b + r))^2
    r = 0.5
    ridged = 10 + (np.sqrt(2 / 3 + r) - np.sqrt(8 / 3 + r)) ** 2 + (np.sqrt(2 / 3 + r) - np.sqrt(6 + r)) ** 2
    assert bench.frechet_distance(CROSS, b, ridge=r) == pytest.approx(ridged, rel=1e-9)


def test_fd_interval_brackets_a_clear_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 3)), rng.normal(loc=1.0, size=(60, 3))  # FD about 3 (the squared mean shift)
    fd, lo, hi = bench.fd_interval(a, b, n_boot=200)
    assert fd == bench.frechet_distance(a, b)
    assert 1.0 < lo <= hi < 6.0


def test_pairwise_spread_is_zero_for_identical_images_and_the_distance_otherwise():
    same = np.repeat(np.random.default_rng(2).normal(size=(3, 5)), 2, axis=0)  # 3 prompts x 2 identical rows
    np.testing.assert_allclose(bench.pairwise_spread(same, 2), 0.0)
    rows = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]])
    np.testing.assert_allclose(bench.pairwise_spread(rows, 2), [5.0, 0.0, 1.0])
    three = np.array([[0.0], [1.0], [3.0]])  # pairs: 1, 3, 2
    np.testing.assert_allclose(bench.pairwise_spread(three, 3), [2.0])
    assert np.isnan(bench.pairwise_spread(np.array([[0.0, np.nan], [1.0, 1.0]]), 2)[0])


def test_pairwise_disagreement_counts_differing_pairs():
    labels = ["white", "white", "gray", "black", "white", None]
    np.testing.assert_allclose(bench.pairwise_disagreement(labels, 2), [0.0, 1.0, 1.0])
    np.testing.assert_allclose(bench.pairwise_disagreement(["a", "a", "b"], 3), [2 / 3])


def test_first_step_reaching_a_level():
    curve = [(0, 0.2), (50, 0.4), (100, 0.7), (150, 0.6), (200, 0.8)]
    assert bench.first_step_reaching(curve, 0.2) == 0
    assert bench.first_step_reaching(curve, 0.55) == 100
    assert bench.first_step_reaching(curve, 0.8) == 200
    assert bench.first_step_reaching(curve, 0.9) is None
    assert bench.first_step_reaching([], 0.1) is None
