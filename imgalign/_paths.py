"""Where the shipped toy assets live: inside the package (`imgalign/assets`), so a plain `pip install .` has them
too; the repository's top-level `assets` is a link to this folder, so documented paths like `assets/toy/sd` work
from a checkout."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
TOY_ASSETS = ASSETS / "toy"
