"""Benchmark the reward layer on tiny random-weight models (CPU, no network).

1. Throughput: images per second of ``score`` for every reward (pairs per second of ``compare`` for the judge).
2. Group win rates (Pref-GRPO): for a group of G images an embedding reward needs G image encodings
   (``reward.group_win_rates``), while comparing every pair with ``compare`` re-encodes both images of each of the
   G(G-1)/2 pairs; a pairwise judge has to look at every pair (twice with order swap).

    python scripts/bench_rewards.py                 # defaults: 64 images of 64x64, batch 16, G = 8
    python scripts/bench_rewards.py --images 128 --group 16 --json bench.json

Timings are the best of several runs (the machine may be shared). Numbers are for the tiny models in ``imgalign.rewards.testing`` (the cost is dominated by preprocessing and
Python overhead, not by the networks), so they measure the layer's overhead, not real reward models.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from imgalign.rewards import build_reward
from imgalign.rewards import testing as tiny


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _time(fn, repeats: int = 3) -> float:
    """Best of ``repeats`` timed runs after one warm-up (the machine is shared: the minimum is the least noisy)."""
    fn()  # warm-up (allocations, caches)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _fast_judge(image_1, image_2, text):
    """A stand-in judge with no model: prefers the brighter image (isolates the layer's own overhead)."""
    return "Image 1 is better." if np.asarray(image_1).mean() >= np.asarray(image_2).mean() else "Image 2 is better."


def build_all(root: Path, with_vlm: bool) -> dict:
    arch, ckpt = tiny.save_tiny_open_clip_arch(root / "arch", checkpoint="pt")
    open_clip_dir = tiny.save_tiny_open_clip_dir(root / "open_clip_dir")
    hf_clip = tiny.save_tiny_hf_clip(root / "hf_clip")
    head = tiny.save_aesthetic_head(root / "aesthetic.pth", in_dim=16)
    imagereward = tiny.save_tiny_imagereward(root / "imagereward")
    dino = tiny.save_tiny_dino(root / "dino")
    refs = _images(4, 32, seed=99)
    rewards = {
        "clip (open_clip)": build_reward("clip", model=str(open_clip_dir)),
        "clip (transformers)": build_reward("clip", model=str(hf_clip)),
        "clip_image": build_reward("clip_image", model=str(open_clip_dir), references=refs),
        "pickscore": build_reward("pickscore", model=str(hf_clip)),
        "hpsv2": build_reward("hpsv2", model=str(arch), checkpoint=str(ckpt)),
        "aesthetic": build_reward("aesthetic", head=str(head), clip_model=str(arch), clip_pretrained=str(ckpt)),
        "imagereward": build_reward("imagereward", checkpoint=str(imagereward), vision_heads=2),
        "dino": build_reward("dino", model=str(dino), references=refs),
        "lambda_harmonic": build_reward("lambda_harmonic", model=str(hf_clip), references=refs),
        "compressibility": build_reward("compressibility"),
        "vlm_judge (stub judge)": build_reward("vlm_judge", backend=_fast_judge, swap=True),
    }
    try:
        rewards["toy"] = build_reward("toy")
        rewards["toy"]._evaluator()
    except ImportError:
        rewards.pop("toy", None)
    if with_vlm:
        vlm = tiny.save_tiny_vlm(root / "vlm")
        rewards["vlm_judge (tiny local VLM)"] = build_reward(
            "vlm_judge", backend="transformers", model=str(vlm), max_new_tokens=8, swap=True)
    return rewards


def _score_all(reward, images, prompts, batch):
    for start in range(0, len(prompts), batch):
        reward.score(images[start : start + batch], prompts[start : start + batch])


def throughput(rewards: dict, n: int, size: int, batch: int) -> dict:
    images = _images(n, size)
    prompts = ["two red circles on a white background"] * n
    results = {}
    for name, reward in rewards.items():
        if reward.pairwise:
            pairs = max(2, n // 4)
            seconds = _time(partial(reward.compare, images[:pairs], images[pairs : 2 * pairs], prompts[:pairs]))
            results[name] = {"unit": "pairs/s", "rate": pairs / seconds}
        else:
            results[name] = {"unit": "images/s", "rate": n / _time(partial(_score_all, reward, images, prompts, batch))}
    return results


def _encodings(reward) -> int:
    holder = getattr(reward, "encoder", reward)
    return holder.image_encodings


def _count(reward, fn) -> int:
    before = _encodings(reward)
    fn()
    return _encodings(reward) - before


def group_costs(rewards: dict, group: int, size: int) -> dict:
    images = _images(group, size, seed=1)
    prompt = "a blue square left of a red circle"
    pairs = [(i, j) for i in range(group) for j in range(i + 1, group)]
    first, second = images[[i for i, _ in pairs]], images[[j for _, j in pairs]]
    out = {}
    for name in ("clip (open_clip)", "pickscore", "hpsv2", "imagereward"):
        reward = rewards[name]
        fast = partial(reward.group_win_rates, images, prompt)
        naive = partial(reward.compare, first, second, [prompt] * len(pairs))
        out[name] = {
            "group_win_rates_encodings": _count(reward, fast),
            "all_pairs_compare_encodings": _count(reward, naive),
            "group_win_rates_ms": 1000 * _time(fast, 5),
            "all_pairs_compare_ms": 1000 * _time(naive, 5),
        }
    judge = rewards["vlm_judge (stub judge)"]
    calls = []

    def counting_judge(image_1, image_2, text):
        calls.append(1)
        return _fast_judge(image_1, image_2, text)

    judge.backend.fn = counting_judge
    judge.group_win_rates(images, prompt)
    out["vlm_judge (stub judge)"] = {"judge_calls": len(calls), "pairs": len(pairs), "swap": judge.swap}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (models resize to 32)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--no-vlm", action="store_true", help="skip the tiny local VLM judge")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        rewards = build_all(Path(tmp), with_vlm=not args.no_vlm)
        rates = throughput(rewards, args.images, args.size, args.batch_size)
        groups = group_costs(rewards, args.group, args.size)

    print(f"# reward throughput, tiny models, {args.images} images of {args.size}x{args.size}, "
          f"batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, {platform.machine()}")
    for name, row in rates.items():
        print(f"{name:>28s}  {row['rate']:9.1f} {row['unit']}")
    g, pairs = args.group, args.group * (args.group - 1) // 2
    print(f"\n# win rates in a group of G={g} images ({pairs} pairs)")
    for name, row in groups.items():
        if "judge_calls" in row:
            print(f"{name:>28s}  judge calls: {row['judge_calls']} = {row['pairs']} pairs x {2 if row['swap'] else 1}"
                  " (order swap)")
            continue
        print(f"{name:>28s}  group_win_rates: {row['group_win_rates_encodings']} encodings, "
              f"{row['group_win_rates_ms']:.1f} ms | compare on all pairs: {row['all_pairs_compare_encodings']} "
              f"encodings, {row['all_pairs_compare_ms']:.1f} ms | "
              f"{row['all_pairs_compare_ms'] / row['group_win_rates_ms']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "throughput": rates, "groups": groups}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
