"""Distillation distances between a student's and a teacher's estimates: pure tensor math, no models."""

from __future__ import annotations

from torch import Tensor


def pseudo_huber(pred: Tensor, target: Tensor, c: float) -> Tensor:
    """Pseudo-Huber distance (consistency models, Song & Dhariwal 2023, arXiv 2310.14189; Self-NPO's loss),
    per sample, in fp32:

        loss_b = mean_i( sqrt((pred_bi - target_bi)^2 + c^2) - c )      -> [B]

    ~ (pred - target)^2 / (2c) for |pred - target| << c, ~ |pred - target| for |pred - target| >> c: for small c it
    behaves like L1, whose minimiser over a set of targets is their median.
    """
    return ((pred.float() - target.float()) ** 2 + c * c).sqrt().sub(c).flatten(1).mean(1)
