"""Held-out preference accuracy of a denoiser: does the model itself find the winner more likely?

For each held-out pair, the winner and loser get the same noise and timestep (several draws); the model
prefers the winner when its denoising error on the winner is lower, i.e. log p(w) > log p(l) under the
Diffusion-DPO reading log p = -err/2. This needs no reference model, so it is meaningful before training
(where the implicit DPO accuracy is 0.5 by construction) and after.
"""

from __future__ import annotations

import numpy as np
import torch

from imgalign.models.adapters import ModelAdapter, repeat_cond


@torch.no_grad()
def pair_error_margins(adapter: ModelAdapter, model, batches, n_draws: int = 4, seed: int = 0) -> torch.Tensor:
    """mean over draws of (err_l - err_w) per pair; > 0 means the model prefers the winner. Returns [N]."""
    margins = []
    for i, batch in enumerate(batches):
        pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]])
        b = batch["pixels_w"].shape[0]
        g = torch.Generator().manual_seed(seed + 7919 * i)
        cond = repeat_cond(adapter.encode_prompts(batch["captions"], original_sizes=batch["original_sizes"],
                                                  crops_top_left=batch["crops_top_left"],
                                                  target_size=pixels.shape[-2:]), 2)
        total = torch.zeros(b)
        for _ in range(n_draws):
            latents = adapter.encode_images(pixels, generator=g)
            noise = torch.randn(latents[:b].shape, generator=g).to(latents.device).repeat(2, 1, 1, 1)
            t = adapter.sample_timesteps(b, generator=g).repeat(2)
            noisy, target = adapter.noise_and_target(latents, noise, t)
            err = (adapter.predict(model, noisy, t, cond).float() - target.float()).pow(2).mean(dim=(1, 2, 3)).cpu()
            total += err[b:] - err[:b]
        margins.append(total / n_draws)
    return torch.cat(margins)


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float, float]:
    """Mean and percentile bootstrap (1 - alpha) interval of the mean of `values`."""
    v = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(n_boot, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(lo), float(hi)
