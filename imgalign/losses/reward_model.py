"""Reward-model training losses: Bradley-Terry, rating regression, their combination, and the General
Preference Model (GPM). Pure tensor math; every loss is per example, [B].

Notation: r_w, r_l = scalar reward-model outputs for the chosen and rejected response; h = a human rating
(e.g. a Likert helpfulness score); m = annotated preference strength (e.g. 1 = slightly .. 3 = much better).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley-Terry reward-model loss (Bradley & Terry 1952; Ouyang et al. 2022, arXiv 2203.02155):

    P(y_w > y_l) = sigma(r_w - r_l),  L = -logsig(r_w - r_l - m).
    margin m [B] is optional: Llama 2's margin loss (Touvron et al. 2023, arXiv 2307.09288), "Margin BT".
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def scaled_bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, strength: Tensor) -> Tensor:
    """Scaled Bradley-Terry (Wang et al. 2024, "HelpSteer2-Preference: Complementing Ratings with
    Preferences", arXiv 2410.01257): the BT loss weighted by the preference strength,

    L = -m * logsig(r_w - r_l),  m [B] >= 0 (as if the pair were repeated m times).
    """
    return -strength * F.logsigmoid(chosen_rewards - rejected_rewards)


def rating_regression_loss(predicted: Tensor, ratings: Tensor) -> Tensor:
    """Regression reward model (SteerLM regression; Wang et al. 2024, HelpSteer2, arXiv 2406.08673):

    L = mean_k (r_k - h_k)^2 over K attributes. predicted, ratings: [B] (one attribute) or [B, K].
    """
    err = (predicted - ratings) ** 2
    return err if err.dim() == 1 else err.mean(dim=-1)


def combined_reward_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, chosen_ratings: Tensor, rejected_ratings: Tensor,
    strength: Tensor | None = None, bt_weight: float = 1.0, regression_weight: float = 1.0,
) -> Tensor:
    """Bradley-Terry + rating regression on one scalar head (HelpSteer2-Preference, arXiv 2410.01257):

    L = bt_weight * -m * logsig(r_w - r_l) + regression_weight * ((r_w - h_w)^2 + (r_l - h_l)^2) / 2
    m = strength (1 when None, i.e. plain BT). The paper's best model is trained in two stages on this
    same head: helpfulness-only regression first (bt_weight=0), then Scaled BT initialised from it
    (regression_weight=0); non-zero weights on both give a joint objective.
    """
    if strength is None:
        bt = bradley_terry_loss(chosen_rewards, rejected_rewards)
    else:
        bt = scaled_bradley_terry_loss(chosen_rewards, rejected_rewards, strength)
    reg = 0.5 * (rating_regression_loss(chosen_rewards, chosen_ratings)
                 + rating_regression_loss(rejected_rewards, rejected_ratings))
    return bt_weight * bt + regression_weight * reg


def gpm_preference_score(
    embedding_i: Tensor, embedding_j: Tensor, eigenvalues: Tensor | None = None
) -> Tensor:
    """General preference score of GPM (Zhang et al. 2024, "Beyond Bradley-Terry Models: A General
    Preference Model for Language Model Alignment", arXiv 2410.02197):

    s(y_i > y_j) = <R v_i, v_j> with R block-diagonal, one block lambda_k * [[0, -1], [1, 0]] per pair of
    dimensions, i.e.  s = sum_k lambda_k * (v_i[2k] * v_j[2k+1] - v_i[2k+1] * v_j[2k]).
    v [B, 2K] = preference embeddings (GPM L2-normalises them in the model head); eigenvalues lambda [B, K]
    (GPM: softmax of a prompt head) default to 1. R is skew-symmetric, so s(i, j) = -s(j, i), s(i, i) = 0,
    and cyclic preferences (a > b > c > a) are representable, unlike any scalar reward.
    """
    if embedding_i.shape[-1] % 2:
        raise ValueError(f"GPM embeddings need an even dimension, got {embedding_i.shape[-1]}")
    vi = embedding_i.unflatten(-1, (-1, 2))  # [B, K, 2]
    vj = embedding_j.unflatten(-1, (-1, 2))  # [B, K, 2]
    per_block = vi[..., 0] * vj[..., 1] - vi[..., 1] * vj[..., 0]  # [B, K]
    if eigenvalues is not None:
        per_block = per_block * eigenvalues
    return per_block.sum(dim=-1)


def gpm_win_probability(
    embedding_i: Tensor, embedding_j: Tensor, tau: float = 1.0, eigenvalues: Tensor | None = None
) -> Tensor:
    """GPM: P(y_i > y_j) = sigma(s(y_i > y_j) / tau); P(i > j) + P(j > i) = 1 by skew-symmetry."""
    return torch.sigmoid(gpm_preference_score(embedding_i, embedding_j, eigenvalues) / tau)


def gpm_loss(
    chosen_embedding: Tensor, rejected_embedding: Tensor, tau: float = 1.0,
    eigenvalues: Tensor | None = None, margin: Tensor | None = None,
) -> Tensor:
    """GPM training loss (arXiv 2410.02197): L = -logsig((s(y_w > y_l) - m) / tau), m optional [B]."""
    s = gpm_preference_score(chosen_embedding, rejected_embedding, eigenvalues)
    if margin is not None:
        s = s - margin
    return -F.logsigmoid(s / tau)
