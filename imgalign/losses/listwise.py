"""Listwise preference losses over n ranked responses per prompt. Pure tensor math.

Shapes: B prompts, n responses each; every input is [B, n], every loss is [B].
Notation as in imgalign.losses.preference (l = log-likelihood, lR = reference, n_i = length).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ListwiseLossOutput:
    losses: Tensor  # [B] per-list loss
    rewards: Tensor  # [B, n] per-response score the loss ranks, detached


def pro_loss(
    policy_logps: Tensor, rewards: Tensor | None = None, lengths: Tensor | None = None
) -> ListwiseLossOutput:
    """PRO, Preference Ranking Optimization (Song et al. 2024, AAAI, arXiv 2306.17492). Reference-free.

    Responses ranked best -> worst, y_1 > ... > y_n, scores s_i = l_i / n_i (per-token mean log-likelihood).
    Plackett-Luce over the shrinking list, with reward gaps as inverse temperatures:
      T_kj = R_k - R_j (j > k),  T_k = max_{j>k} T_kj
      L = sum_{k=1}^{n-1} -log[ exp(s_k T_k) / (exp(s_k T_k) + sum_{j>k} exp(s_j T_kj)) ]
    policy_logps [B, n]: summed log-likelihoods (divided by lengths if given; else taken as means).
    rewards [B, n]: scalar rewards R; when given, responses are sorted by them (descending) first.
    Without rewards the columns must already be in best -> worst order and all T = 1 (plain Plackett-Luce).
    The paper's SFT term on the best response is left to the caller. For n = 2:
    L = -logsig((R_1 - R_2) * (s_1 - s_2)), i.e. reference-free sigmoid DPO with beta = R_1 - R_2.
    """
    scores = policy_logps if lengths is None else policy_logps / lengths.clamp(min=1)  # [B, n]
    if rewards is not None:
        rewards, order = torch.sort(rewards, dim=1, descending=True, stable=True)
        scores = torch.gather(scores, 1, order)
    b, n = scores.shape
    if n < 2:
        raise ValueError(f"PRO needs at least 2 responses per prompt, got n={n}")
    losses = scores.new_zeros(b)
    for k in range(n - 1):
        if rewards is None:
            gap = torch.ones_like(scores[:, k:])  # [B, n-k]
        else:
            gap = rewards[:, k:k + 1] - rewards[:, k:]  # [B, n-k], T_kj; column 0 is T_kk = 0
            gap[:, 0] = gap[:, 1:].max(dim=1).values  # the positive uses T_k = max_j T_kj
        logits = scores[:, k:] * gap  # [B, n-k]
        losses = losses + torch.logsumexp(logits, dim=1) - logits[:, 0]
    return ListwiseLossOutput(losses, scores.detach())


def lipo_lambda_loss(
    policy_logps: Tensor, ref_logps: Tensor | None, labels: Tensor, beta: float = 0.1
) -> ListwiseLossOutput:
    """LiPO-lambda (Liu et al. 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank",
    arXiv 2402.01878, NAACL 2025): LambdaLoss over the implicit rewards.

      s_i = beta * (l_i - lR_i)                              (lR = 0 when ref_logps is None)
      L = sum_{psi_i > psi_j} Delta_ij * -logsig(s_i - s_j)
      Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|,  G_i = 2^psi_i - 1,  D(tau) = log2(1 + tau)
    psi [B, n] = graded labels (higher is better; ties form no pair); tau_i = 1-based rank of response i
    under the current s (descending). The lambda weights Delta are constants (no gradient).
    For n = 2 with labels (1, 0): L = (1 - 1/log2(3)) * DPO sigmoid loss.
    """
    logratios = policy_logps if ref_logps is None else policy_logps - ref_logps
    s = beta * logratios  # [B, n]
    with torch.no_grad():
        order = torch.argsort(s, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(1, s.shape[1] + 1, device=s.device).expand_as(order))
        inv_discount = 1.0 / torch.log2(1.0 + rank.to(s.dtype))  # [B, n]
        gain = torch.pow(2.0, labels.to(s.dtype)) - 1  # [B, n]
        delta = (gain[:, :, None] - gain[:, None, :]).abs() * (
            inv_discount[:, :, None] - inv_discount[:, None, :]
        ).abs()  # [B, n, n]
        pair = (labels[:, :, None] > labels[:, None, :]).to(s.dtype)  # [B, n, n], i better than j
    pairwise = -F.logsigmoid(s[:, :, None] - s[:, None, :])  # [B, n, n]
    losses = (pair * delta * pairwise).sum(dim=(1, 2))
    return ListwiseLossOutput(losses, s.detach())
