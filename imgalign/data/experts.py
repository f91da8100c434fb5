"""Expert demonstrations for Diffusion-DRO: the top-k images of a dataset by a reward, written where a user can look
at them (the reference, basiclab/DiffusionDRO tools/pickapic.py, keeps the top 500 Pick-a-Pic v2 images by HPSv2 or
PickScore over every image of every pair).

    imgalign select-experts --source pairs.parquet --reward pickscore --top 500 --out experts/
writes experts/experts.jsonl ({image, caption, label: true, score, source_row}, best first) and the images beside
it; `imgalign train diffusion-dro data.source=experts/experts.jsonl` trains on them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def select_experts(source: str, reward: str, top: int, out: str | Path, split: str = "train",
                   image_root: str | None = None, batch_size: int = 32, reward_kwargs: dict | None = None,
                   progress: bool = True) -> dict:
    """Score every image of `source` (Pick-a-Pic pairs: both images of each pair; an unpaired JSONL: every row) with
    `reward` against its caption and write the best `top` distinct images as an unpaired JSONL -> a summary dict."""
    from tqdm.auto import tqdm

    from imgalign.data import load_preference_pairs
    from imgalign.data.unpaired import detect_layout, load_unpaired_images, split_pairs, write_unpaired_jsonl
    from imgalign.rewards import build_reward

    if top < 1:
        from imgalign.errors import UserError

        raise UserError(f"--top {top}: keep at least one expert image")
    data = (load_unpaired_images(source, image_root=image_root) if detect_layout(source) == "unpaired"
            else split_pairs(load_preference_pairs(source, split=split, image_root=image_root)))
    scorer = build_reward(reward, **(reward_kwargs or {}))
    scores = []
    for start in tqdm(range(0, len(data), batch_size), desc=f"scoring with {reward}", disable=not progress):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        with torch.no_grad():
            values = scorer.score([it["image"] for it in items], [it["caption"] for it in items])
        scores += values.float().cpu().tolist()
    order = sorted(range(len(data)), key=lambda i: -scores[i])
    chosen, seen = [], set()
    for i in order:  # a pair's two images, or duplicate rows, may be the same picture: keep it once
        item = data[i]
        key = (item["caption"], item["image"].tobytes()[:4096], item["image"].size)
        if key in seen:
            continue
        seen.add(key)
        chosen.append((i, item))
        if len(chosen) == top:
            break
    out = Path(out)
    path = write_unpaired_jsonl(out / "experts.jsonl", out / "images",
                                [(item["caption"], item["image"], True) for _, item in chosen])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    with open(path, "w", encoding="utf-8") as fh:  # add each image's score and where it came from
        for row, (i, _) in zip(rows, chosen):
            fh.write(json.dumps({**row, "score": scores[i], "source_row": data.where(i)}) + "\n")
    summary = {"source": str(source), "reward": reward, "images_scored": len(data), "kept": len(chosen),
               "score_best": scores[chosen[0][0]], "score_last_kept": scores[chosen[-1][0]],
               "score_mean_all": sum(scores) / len(scores), "out": str(path)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
