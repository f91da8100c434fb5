"""Held-out preference evaluation of a policy against its reference.

For each held-out example, take its best and worst response (for pairs: chosen, rejected) and the
policy log-ratio margin
    m = (l_w - lR_w) - (l_l - lR_l)         (summed response log-likelihoods; lR = reference)
    pref_acc = mean(m > 0) + 0.5 * mean(m == 0)       (ties count one half, so an untouched LoRA gives 0.5)
    margin   = mean(m)
and, for reference-free readers, the policy's own ranking
    logp_acc = the same accuracy on l_w - l_l,   mean_logp_acc on the per-token means l_w/n_w - l_l/n_l.
The reference log-likelihoods never change, so they are computed once and cached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from imgalign.llm.data import collate
from imgalign.llm.logprobs import sequence_logps
from imgalign.losses import implicit_accuracy


def best_worst(values: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """values [B, n], rewards [B, n] -> values of the highest- and lowest-reward response, each [B]."""
    best = rewards.argmax(dim=1, keepdim=True)
    worst = rewards.argmin(dim=1, keepdim=True)
    return values.gather(1, best).squeeze(1), values.gather(1, worst).squeeze(1)


def list_logps(model, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """One forward over a collated batch -> (summed log-likelihoods [B, n], response lengths [B, n])."""
    b, n = batch["rewards"].shape
    total, count = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return total.view(n, b).T, count.view(n, b).T  # rows of the batch are response-major


class HeldOut:
    """Fixed held-out batches; call with the policy and a context manager factory giving the reference."""

    def __init__(self, items: list[dict], pad_token_id: int, batch_size: int, device):
        self.batches = [
            {k: v.to(device) for k, v in collate(items[i:i + batch_size], pad_token_id).items()}
            for i in range(0, len(items), batch_size)
        ]
        self.ref_cache: list[Tensor] | None = None

    @torch.no_grad()
    def evaluate(self, policy, reference_forward: Callable[[dict], Tensor]) -> dict[str, float]:
        """policy: the trainable model; reference_forward(batch) -> reference summed logps [B, n]."""
        if self.ref_cache is None:
            self.ref_cache = [reference_forward(b) for b in self.batches]
        was_training = policy.training
        policy.eval()
        margins, lp_diff, mean_diff = [], [], []
        for batch, ref in zip(self.batches, self.ref_cache):
            logps, counts = list_logps(policy, batch)
            rewards = batch["rewards"]
            l_w, l_l = best_worst(logps, rewards)
            r_w, r_l = best_worst(ref, rewards)
            n_w, n_l = best_worst(counts, rewards)
            margins.append((l_w - r_w) - (l_l - r_l))
            lp_diff.append(l_w - l_l)
            mean_diff.append(l_w / n_w.clamp(min=1) - l_l / n_l.clamp(min=1))
        policy.train(was_training)
        m, d, md = torch.cat(margins), torch.cat(lp_diff), torch.cat(mean_diff)
        zero = torch.zeros_like(m)
        return {
            "pref_acc": float(implicit_accuracy(m, zero)),
            "margin": float(m.mean()),
            "logp_acc": float(implicit_accuracy(d, zero)),
            "mean_logp_acc": float(implicit_accuracy(md, zero)),
        }
