"""Guidance at sampling time: per-step prediction combiners (CFG, RLG, NPO), a pipeline hook that applies
them inside any diffusers pipeline, and weight-space merges for NPO's negative model.

    from imgalign.guidance import RLGuidance, generate
    pipe.load_lora_weights("outputs/dpo-sd15", adapter_name="aligned")
    images = generate(pipe, RLGuidance(weight=1.5, aligned="aligned"), prompt="a red circle").images
"""

from imgalign.guidance.combine import cfg, npo, rlg, rlg_cfg
from imgalign.guidance.merge import (
    clean_state_dict,
    lora_deltas,
    lora_deltas_from_model,
    merge_weights,
    weight_delta,
)
from imgalign.guidance.pipeline import (
    BASE,
    NPOGuidance,
    RLGuidance,
    adapter_rows,
    apply_guidance,
    denoiser_of,
    generate,
    lora_adapter_names,
)

__all__ = [
    "BASE",
    "NPOGuidance",
    "RLGuidance",
    "adapter_rows",
    "apply_guidance",
    "cfg",
    "clean_state_dict",
    "denoiser_of",
    "generate",
    "lora_adapter_names",
    "lora_deltas",
    "lora_deltas_from_model",
    "merge_weights",
    "npo",
    "rlg",
    "rlg_cfg",
    "weight_delta",
]
