"""One readable module per method. Each exposes `Config` (its dataclass schema) and `train(cfg) -> dict` (the same
keys for every recipe: steps, history, validation, seconds, output_dir). Config sections are named after their YAML
key (`loss:` -> LossConfig, `data:` -> DataConfig); shared sections live in recipes/common.py and train/setup.py."""

import importlib

# method -> (module, one line for `imgalign train --help`)
RECIPES = {
    "diffusion-dpo": ("imgalign.recipes.diffusion_dpo",
                      "Diffusion-DPO on preference pairs, with every loss of the core (IPO, hinge, robust, f-DPO, ...)"),
    "diffusion-dro": ("imgalign.recipes.diffusion_dro",
                      "Diffusion-DRO: expert demonstrations ranked above the model's own online samples (replay buffer)"),
    "self-npo": ("imgalign.recipes.self_npo",
                 "Self-NPO: a negative model from the model's own samples, for NPO guidance at generation"),
    "rpo": ("imgalign.recipes.rpo",
            "RPO: subject-driven fine-tuning, references preferred over base samples by the lambda-Harmonic reward"),
    "pref-grpo": ("imgalign.recipes.pref_grpo",
                  "Pref-GRPO (pairwise win rates in a group); pointwise Flow-GRPO and DDPO as configurations"),
    "flash-dmd": ("imgalign.recipes.flash_dmd",
                  "Flash-DMD: few-step distillation (DMD2 core, timestep-aware split, GAN head) with joint RL"),
    "llm-dpo": ("imgalign.recipes.llm_dpo", "DPO-family losses on a causal language model (the shared loss core)"),
}


def describe() -> str:
    """Every method with its line, for help texts."""
    width = max(map(len, RECIPES)) + 2
    return "\n".join(f"  {name:<{width}}{line}" for name, (_, line) in RECIPES.items())


def get_recipe(name: str):
    if name not in RECIPES:
        import difflib

        from imgalign.errors import UserError

        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UserError(f"unknown method '{name}'{hint} Available:\n{describe()}")
    return importlib.import_module(RECIPES[name][0])
