"""Fixed, held-out toy prompt sets: train, validation and test, saved one prompt per line.

The sets are drawn from the grammar's default mixture (`grammar.sample_scene`) with fixed seeds and are
disjoint *by meaning*, not only by text: "a red circle and a blue square" and "a blue square and a red
circle", or "A right of B" and "B left of A", share a `Scene.canonical_key`, and a key used in one set
never appears in another (nor twice in the same set). The test set is drawn first, so its contents do not
depend on how large the train set is.

The shipped files in ``assets/toy/prompts/`` are the output of::

    python -c "from imgalign.toy.prompts import main; main()"   # rewrites assets/toy/prompts/*.txt

and a unit test checks that they still equal what `build_prompt_sets` produces.

Note: because prompts are unique, kinds with few distinct prompts are under-represented relative to the
mixture. There are only 144 single-object prompts (12 objects x 3 size options x 4 background options),
so the test set takes a share of them and the train set gets most of the rest.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from imgalign._paths import TOY_ASSETS
from imgalign.toy.grammar import parse, sample_scene

#: Where the shipped prompt files live in a source checkout.
PROMPT_DIR = TOY_ASSETS / "prompts"
#: Number of prompts per split, in the order the splits are drawn.
SPLIT_SIZES: dict[str, int] = {"test": 200, "validation": 200, "train": 2000}
DEFAULT_SEED = 0


def build_prompt_sets(
    out_dir: str | Path | None = None, seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None
) -> dict[str, list[str]]:
    """Draw disjoint prompt sets and, if ``out_dir`` is given, write them to ``out_dir/<split>.txt``.

    Args:
        out_dir: folder to write ``train.txt``, ``validation.txt`` and ``test.txt`` to (created if missing).
        seed: base seed; split number ``i`` draws from ``np.random.default_rng([seed, i])``.
        sizes: prompts per split, drawn in the dict's order; defaults to `SPLIT_SIZES`.

    Returns:
        {split name: list of prompt texts}, in drawing order.
    """
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    used_keys: set[tuple] = set()
    splits: dict[str, list[str]] = {}
    for index, (split, size) in enumerate(sizes.items()):
        rng = np.random.default_rng([seed, index])
        prompts: list[str] = []
        # The grammar holds ~24k distinct scenes, so this loop ends after a few thousand draws; the cap
        # only turns an impossible request (more prompts than the grammar has) into an error.
        for _ in range(1000 * max(size, 1)):
            if len(prompts) == size:
                break
            scene = sample_scene(rng)
            key = scene.canonical_key()
            if key not in used_keys:
                used_keys.add(key)
                prompts.append(scene.to_text())
        else:
            raise RuntimeError(f"could not draw {size} new distinct prompts for split {split!r}")
        splits[split] = prompts

    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for split, prompts in splits.items():
            (out_dir / f"{split}.txt").write_text(
                "".join(prompt + "\n" for prompt in prompts), encoding="utf-8"
            )
    return splits


def load_prompts(path: str | Path) -> list[str]:
    """Read a prompt file (one toy prompt per line; blank lines are skipped) and validate every line.

    Raises:
        ValueError: naming the file and the 1-based line number of the first line that does not parse.
    """
    path = Path(path)
    prompts = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        try:
            parse(text)
        except ValueError as error:
            raise ValueError(f"{path}:{line_number}: {error}") from None
        prompts.append(text)
    return prompts


def load_prompt_set(split: str, prompt_dir: str | Path = PROMPT_DIR) -> list[str]:
    """Load a shipped split ("train", "validation" or "test") from ``prompt_dir``."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"unknown prompt split {split!r}; expected one of {list(SPLIT_SIZES)}")
    return load_prompts(Path(prompt_dir) / f"{split}.txt")


def main(argv: list[str] | None = None) -> None:
    """Rebuild the shipped prompt files (or write them to the folder given as the only argument)."""
    argv = sys.argv[1:] if argv is None else argv
    target = Path(argv[0]) if argv else PROMPT_DIR
    for name, texts in build_prompt_sets(target).items():
        print(f"wrote {len(texts)} prompts to {target / (name + '.txt')}")
