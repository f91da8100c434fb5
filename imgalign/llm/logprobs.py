"""Sequence log-likelihoods of a causal LM over the response tokens only (prompt and padding masked).

For one sequence x = [prompt tokens, response tokens, padding] the model's logits at position t predict
token t+1, so with shifted labels
    l = sum_{t in response} log p(x_t | x_<t)      (summed log-likelihood, TRL's default)
    n = number of response tokens                  (for the length-normalised losses: lbar = l / n)
Chosen and rejected responses go through the model in ONE forward: the batch is [chosen_1..chosen_B,
rejected_1..rejected_B] (TRL's layout), right-padded to a common length, and split with `.chunk(2)`.
Right padding keeps the default position ids correct for every real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def token_logps(logits: Tensor, input_ids: Tensor) -> Tensor:
    """logits [N, T, V], input_ids [N, T] -> log p(x_{t+1} | x_<=t) [N, T-1] (token t+1 predicted at t).

    Computed as gathered logit - logsumexp (no [N, T, V] log-softmax tensor is kept), in fp32.
    """
    logits = logits[:, :-1].float()  # [N, T-1, V]
    labels = input_ids[:, 1:]  # [N, T-1]
    picked = torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1)  # [N, T-1]
    return picked - torch.logsumexp(logits, dim=-1)


def masked_sequence_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(summed response log-likelihood [N], response token count [N]) of each sequence.

    completion_mask [N, T] is 1 on response tokens and 0 on prompt and padding; the first token of a
    sequence has no prediction and is never counted.
    """
    mask = completion_mask[:, 1:].to(torch.float32)  # [N, T-1], aligned with the shifted labels
    per_token = token_logps(logits, input_ids)  # [N, T-1]
    return (per_token * mask).sum(dim=1), mask.sum(dim=1)


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> tuple[Tensor, Tensor]:
    """One forward of `model` (a transformers causal LM, possibly peft-wrapped) -> (sum [N], count [N])."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # [N, T, V]
    return masked_sequence_logps(logits, input_ids, completion_mask)


@dataclass
class PairLogps:
    """Log-likelihoods of B preference pairs from one concatenated forward; every tensor is [B]."""

    chosen: Tensor  # l_w, summed over response tokens
    rejected: Tensor  # l_l
    chosen_lengths: Tensor  # n_w
    rejected_lengths: Tensor  # n_l

    @property
    def chosen_mean(self) -> Tensor:
        return self.chosen / self.chosen_lengths.clamp(min=1)

    @property
    def rejected_mean(self) -> Tensor:
        return self.rejected / self.rejected_lengths.clamp(min=1)


def concatenated_pair_logps(model, batch: dict[str, Tensor]) -> PairLogps:
    """batch from `imgalign.llm.data.collate_pairs`: input_ids, attention_mask, completion_mask, each
    [2B, T] with the chosen sequences first -> PairLogps. One forward for both halves."""
    total, count = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    chosen, rejected = total.chunk(2)  # [B], [B]
    n_w, n_l = count.chunk(2)
    return PairLogps(chosen, rejected, n_w, n_l)
