"""Rewards of online RL (pref-grpo): the configured reward list, and the rewards of one iteration's samples
computed across processes: pointwise scores are gathered; for win rates every process sees every image and
judges the groups g with g mod world == rank, then the per-sample values are summed over processes.

`cfg` is any object with the fields of pref-grpo's `reward:` config section (mode, rewards, kwargs, swap_order,
hard_wins).
"""

from __future__ import annotations

import torch

from imgalign.errors import UserError
from imgalign.rewards.group import judge_group


def build_reward_list(cfg, device):
    from imgalign.rewards import RewardSpec

    unknown = set(cfg.kwargs) - {RewardSpec.parse(s).name for s in cfg.rewards}
    if unknown:
        raise UserError(f"reward.kwargs names {sorted(unknown)}, which are not in reward.rewards={cfg.rewards}; "
                        "add them to reward.rewards or remove their arguments")
    specs = [RewardSpec.parse(s, dict(cfg.kwargs.get(RewardSpec.parse(s).name, {}))) for s in cfg.rewards]
    rewards = [s.build() for s in specs]
    for spec, reward in zip(specs, rewards):
        if cfg.mode == "pointwise" and reward.pairwise:
            raise UserError(f"reward.rewards: '{spec.name}' is a pairwise judge; use reward.mode=pairwise")
        if hasattr(reward, "to") and device.type != "cpu":
            reward.to(device)
    return specs, rewards


def compute_rewards(specs, rewards, cfg, images, prompts: list[str], groups: torch.Tensor,
                    accelerator) -> tuple[torch.Tensor, dict]:
    """Images [L, 3, H, W] of this process (global group ids `groups` [L]) -> per-reward values [K, N] of all N
    samples of the iteration (identical on every process) and the raw pointwise scores [K, N] (NaN if pairwise)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    all_groups = accelerator.gather(groups.to(accelerator.device)).cpu()  # [N]
    if cfg.mode == "pointwise":
        local = torch.stack([r.score(images, prompts, value_range=(-1, 1)).float().to(accelerator.device)
                             for r in rewards])  # [K, L]
        values = accelerator.gather(local.T.contiguous()).T.cpu()  # [K, N]
        return values, {"scores": values, "failures": 0.0}
    # pairwise: every process sees all images (uint8), and judges the groups g with g % world == rank
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).to(accelerator.device)
    all_images = accelerator.gather(pixels).cpu().float() / 127.5 - 1.0  # [N, 3, H, W]
    all_prompts = _gather_strings(prompts, accelerator)
    values = torch.zeros(len(rewards), all_groups.shape[0])
    scores = torch.full((len(rewards), all_groups.shape[0]), float("nan"))
    failures = 0
    for g in all_groups.unique().tolist():
        if g % world != rank:
            continue
        idx = torch.nonzero(all_groups == g).flatten()
        for k, reward in enumerate(rewards):
            w, f = judge_group(reward, all_images[idx], all_prompts[int(idx[0])], swap_order=cfg.swap_order,
                               hard=cfg.hard_wins, value_range=(-1, 1))
            values[k, idx], failures = w, failures + f
            if not reward.pairwise:
                scores[k, idx] = reward.score(all_images[idx], [all_prompts[int(idx[0])]] * len(idx),
                                              value_range=(-1, 1)).float().cpu()
    if world > 1:
        values = accelerator.reduce(values.to(accelerator.device), reduction="sum").cpu()
        scores = accelerator.reduce(torch.nan_to_num(scores, nan=0.0).to(accelerator.device), reduction="sum").cpu()
    return values, {"scores": scores, "failures": float(failures)}


def _gather_strings(items: list[str], accelerator) -> list[str]:
    if accelerator.num_processes == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(list(items)))


def reward_logs(specs, values, extra, groups, zero, adv, keep, mode) -> dict:
    """train/ metrics of one iteration's rewards: the combined reward, zero-std groups, kept samples, advantages,
    and per reward its win rates (pairwise) or scores (pointwise)."""
    logs = {}
    combined = sum(w * v for w, v in zip([s.weight for s in specs], values))
    logs["train/reward_mean"] = float(combined.mean())
    logs["train/reward_std"] = float(combined.std(unbiased=False))
    n_groups = int(groups.unique().numel())
    logs["train/zero_std_ratio"] = len(groups[zero].unique()) / n_groups
    logs["train/kept_fraction"] = float(keep.float().mean())
    logs["train/adv_abs_mean"] = float(adv.abs().mean())
    for spec, v, s in zip(specs, values, extra["scores"]):
        name = spec.name
        if mode == "pairwise":
            logs[f"train/win_rate/{name}"] = float(v.mean())  # 0.5 by construction; the spread is what matters
            logs[f"train/win_rate_std/{name}"] = float(v.std(unbiased=False))
            best = [float(v[groups == g].max()) for g in groups.unique()]
            logs[f"train/win_rate_best/{name}"] = sum(best) / len(best)
            if not torch.isnan(s).all():
                logs[f"train/score/{name}"] = float(s.mean())
        else:
            logs[f"train/score/{name}"] = float(v.mean())
    if mode == "pairwise":
        logs["train/judge_failures"] = extra["failures"]
    return logs
