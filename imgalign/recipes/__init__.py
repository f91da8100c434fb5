"""One readable module per method. Each exposes `Config` (its dataclass schema) and `train(cfg) -> dict`."""

import importlib

RECIPES = {
    "diffusion-dpo": "imgalign.recipes.diffusion_dpo",
    "llm-dpo": "imgalign.recipes.llm_dpo",
    "self-npo": "imgalign.recipes.self_npo",
    "pref-grpo": "imgalign.recipes.pref_grpo",
}


def get_recipe(name: str):
    if name not in RECIPES:
        import difflib

        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SystemExit(f"unknown method '{name}'{hint} Available: {', '.join(RECIPES)}")
    return importlib.import_module(RECIPES[name])
