"""Command-line options of `imgalign generate` for RLG and NPO guidance.

    imgalign generate --model M --guidance rlg --aligned outputs/dpo --rlg-scale 1.5 --prompt "..." --out D
    imgalign generate --model M --guidance npo --negative outputs/self-npo --prompt "..." --out D
    imgalign generate --model M --lora outputs/dpo --guidance npo --negative outputs/self-npo \
        --npo-merge-beta 0   # negative = base + delta_neg + (1 - beta) delta_pos (Diffusion-NPO's transfer)

`--aligned` and `--negative` take a LoRA folder (with pytorch_lora_weights.safetensors) or a full denoiser
(a pipeline or run folder with unet/ or transformer/, or the denoiser folder itself).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imgalign.guidance.pipeline import BASE, NPOGuidance, RLGuidance, generate, lora_adapter_names


def add_guidance_arguments(parser: argparse.ArgumentParser) -> None:
    grp = parser.add_argument_group("guidance", "RL Guidance (RLG) and NPO guidance on top of CFG")
    grp.add_argument("--guidance", choices=["cfg", "rlg", "npo"], default="cfg",
                     help="cfg: plain pipeline; rlg: base + w (aligned - base); npo: negative model in CFG's "
                          "unconditional branch")
    grp.add_argument("--rlg-scale", type=float, default=1.0,
                     help="RLG w: 0 = base, 1 = aligned, > 1 extrapolates (= KL coefficient beta / w)")
    grp.add_argument("--aligned", help="RLG: the aligned model, a LoRA folder or a full denoiser")
    grp.add_argument("--rlg-zero-init-steps", type=int, default=0,
                     help="RLG: use the aligned model alone for the first N sampler steps")
    grp.add_argument("--negative", help="NPO: the negative model, a LoRA folder or a full denoiser (e.g. a "
                                        "Self-NPO run folder)")
    grp.add_argument("--npo-merge-beta", type=float, default=None,
                     help="NPO with --lora: negative = base + delta_neg + (1 - beta) delta_pos (weight space)")
    grp.add_argument("--true-cfg-scale", type=float, default=None,
                     help="FLUX + NPO: the true-CFG scale s (FLUX needs an unconditional branch); default 4")
    grp.add_argument("--batched-branches", action="store_true",
                     help="LoRA branches in one mixed-adapter batch (peft adapter_names); faster where calls are "
                          "latency-bound (GPU), slower on CPU")
    grp.add_argument("--rlg-shared-uncond", action="store_true",
                     help="RLG approximation with 3 instead of 4 evaluations per step (base unconditional shared)")
    grp.add_argument("--rlg-fuse-aligned", action="store_true",
                     help="RLG with a LoRA --aligned: fuse it into a second copy of the denoiser (one more copy in "
                          "memory; measured 2.00x instead of 2.13x plain CFG on CPU, see scripts/bench_guidance.py)")


def _is_lora(path: str) -> bool:
    return (Path(path) / "pytorch_lora_weights.safetensors").is_file()


def _load_denoiser(adapter, path: str):
    """A denoiser of the pipeline's class from a pipeline/run folder (subfolder unet/ or transformer/) or itself."""
    net = adapter.denoiser
    cls = type(net)
    root = Path(path)
    sub = adapter.denoiser_name if (root / adapter.denoiser_name).is_dir() or not root.exists() else None
    kw = {"subfolder": sub} if sub else {}
    other = cls.from_pretrained(path, torch_dtype=net.dtype, **kw)
    return other.to(net.device).eval().requires_grad_(False)


def _lora_delta(adapter, path: str) -> dict:
    """The weight-space delta of a LoRA folder on the pipeline's denoiser (the adapter is removed again)."""
    from imgalign.guidance.merge import lora_deltas_from_model

    adapter.pipe.load_lora_weights(path, adapter_name="_delta")
    delta = lora_deltas_from_model(adapter.denoiser, "_delta")
    adapter.pipe.delete_adapters("_delta")
    return delta


def _plain_network(adapter, delta_neg: dict | None, delta_pos: dict | None = None, beta: float = 0.0):
    """A separate network (no peft wrappers) with weights base + delta_neg + (1 - beta) delta_pos."""
    from imgalign.guidance.merge import clean_state_dict, merge_weights

    net = adapter.denoiser
    other = type(net).from_config(net.config)
    other.load_state_dict(merge_weights(clean_state_dict(net), delta_neg, delta_pos, beta))
    return other.to(device=net.device, dtype=net.dtype).eval().requires_grad_(False)


def _negative_network(adapter, args, positive: str):
    """A separate negative network: the given model, or the weight-space merge with the positive LoRA."""
    from imgalign.guidance.merge import clean_state_dict, lora_deltas_from_model, weight_delta

    if _is_lora(args.negative):
        delta_neg = _lora_delta(adapter, args.negative)
    else:
        delta_neg = weight_delta(_load_denoiser(adapter, args.negative).state_dict(), clean_state_dict(adapter.denoiser))
    delta_pos = None
    if args.npo_merge_beta is not None:
        if positive == BASE:
            raise SystemExit("error: --npo-merge-beta needs the positive model as --lora")
        delta_pos = lora_deltas_from_model(adapter.denoiser, positive)
    return _plain_network(adapter, delta_neg, delta_pos, args.npo_merge_beta or 0.0)


def prepare_guidance(args, adapter):
    """-> a callable with the pipeline's keyword arguments that samples with the requested guidance."""
    pipe = adapter.pipe
    existing = sorted(lora_adapter_names(adapter.denoiser))  # e.g. the --lora adapter: it is the base/positive
    if len(existing) > 1:
        raise SystemExit(f"error: guidance expects at most one pre-loaded LoRA, found {existing}")
    current = existing[0] if existing else BASE
    batched = args.batched_branches
    guidance = None
    if args.guidance == "rlg":
        if not args.aligned:
            raise SystemExit("error: --guidance rlg needs --aligned PATH (a LoRA folder or a full denoiser)")
        if _is_lora(args.aligned) and args.rlg_fuse_aligned:
            aligned = _plain_network(adapter, _lora_delta(adapter, args.aligned))
        elif _is_lora(args.aligned):
            pipe.load_lora_weights(args.aligned, adapter_name="aligned")
            aligned = "aligned"
        else:
            aligned = _load_denoiser(adapter, args.aligned)
        guidance = RLGuidance(weight=args.rlg_scale, aligned=aligned, base=current,
                              zero_init_steps=args.rlg_zero_init_steps, batched=batched,
                              shared_uncond=args.rlg_shared_uncond)
    elif args.guidance == "npo":
        if not args.negative:
            raise SystemExit("error: --guidance npo needs --negative PATH (a LoRA folder or a full denoiser)")
        if _is_lora(args.negative) and args.npo_merge_beta is None:
            pipe.load_lora_weights(args.negative, adapter_name="negative")
            negative = "negative"
        else:
            negative = _negative_network(adapter, args, current)
        guidance = NPOGuidance(negative=negative, positive=current, batched=batched)
    flux_npo = args.guidance == "npo" and type(pipe).__name__.startswith("Flux")

    def sample(**kwargs):
        if flux_npo:
            kwargs.setdefault("negative_prompt", "")
            kwargs.setdefault("true_cfg_scale", args.true_cfg_scale or 4.0)
        return generate(pipe, guidance, **kwargs)

    return sample
