"""Entry point of the two-process tests, started by `torch.distributed.run`: one recipe's train() with its
config overrides, each rank's history written to <output_dir>/history-<rank>.json.

MP_TEST_SAVE_DELAY=inside|before delays rank 1 by two seconds inside accelerate's save_state (rank 0 would
publish before rank 1 wrote its state without the barrier) or before it enters the checkpoint save (rank 1
would write into a folder rank 0 already published).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from imgalign.config import load_config
from imgalign.recipes import get_recipe


def _delay_rank_1(where: str) -> None:
    if where == "inside":
        import accelerate

        real = accelerate.Accelerator.save_state

        def slow_save_state(self, *a, **k):
            time.sleep(2)
            return real(self, *a, **k)

        accelerate.Accelerator.save_state = slow_save_state
    elif where == "before":
        import imgalign.train.loop as loop

        real = loop.save_checkpoint

        def slow_save_checkpoint(*a, **k):
            time.sleep(2)
            return real(*a, **k)

        loop.save_checkpoint = slow_save_checkpoint
    else:
        raise SystemExit(f"MP_TEST_SAVE_DELAY={where!r}: use inside or before")


def main() -> None:
    method, *overrides = sys.argv[1:]
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("MP_TEST_SAVE_DELAY") and rank == 1:
        _delay_rank_1(os.environ["MP_TEST_SAVE_DELAY"])
    recipe = get_recipe(method)
    cfg = load_config(recipe.Config, None, overrides)
    result = recipe.train(cfg)
    Path(cfg.run.output_dir, f"history-{rank}.json").write_text(json.dumps(result["history"]))


if __name__ == "__main__":
    main()
