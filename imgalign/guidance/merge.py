"""Weight-space merges for NPO: theta_neg = theta_base + delta_neg + (1 - beta) * delta_pos.

Diffusion-NPO trains its negative offset on the *base* model and transfers it onto a preference-tuned
positive model; `beta` (the paper's merge weight) controls how much of the positive model's own offset the
negative model inherits: beta = 0 -> theta_neg = theta_pos + delta_neg; beta = 1 -> theta_base + delta_neg.

Deltas come from full state dicts (`weight_delta(tuned, base)`), from a LoRA file
(`lora_deltas(state_dict)`: delta W = scale * up @ down per module) or from a peft-attached network
(`lora_deltas_from_model(net, adapter_name)`). Keys of a delta are the base network's parameter names.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]

# (down, up) suffix pairs of the LoRA key conventions we read: peft, diffusers, kohya
_LORA_SUFFIXES = ((".lora_A.weight", ".lora_B.weight"), (".lora.down.weight", ".lora.up.weight"),
                  (".lora_down.weight", ".lora_up.weight"))


def weight_delta(tuned: StateDict, base: StateDict) -> StateDict:
    """delta = tuned - base for every floating-point tensor; keys and shapes must match."""
    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise KeyError(f"state dicts differ in {len(missing)} keys, e.g. {missing[:3]}")
    out = {}
    for k, b in base.items():
        t = tuned[k]
        if t.shape != b.shape:
            raise ValueError(f"{k}: tuned shape {tuple(t.shape)} != base shape {tuple(b.shape)}")
        if b.is_floating_point():
            out[k] = t.float() - b.float()
    return out


def lora_deltas(lora: StateDict, scale: float = 1.0, strip_prefix: str | None = None,
                peft_adapter: str | None = None) -> StateDict:
    """LoRA weights -> full weight deltas keyed `<module>.weight`.

    delta W = scale * (alpha / r) * up @ down  (alpha / r = 1 when no `<module>.alpha` key is present, as in
    diffusers-format files saved with alpha == rank). Linear: up [out, r], down [r, in]; conv: up [out, r, 1, 1],
    down [r, in, kh, kw]. `strip_prefix` (e.g. "unet.") is removed from module names; peft keys with an adapter
    name (`lora_A.<name>.weight`) are read for `peft_adapter`.
    """
    if peft_adapter:
        lora = {k.replace(f".lora_A.{peft_adapter}.", ".lora_A.").replace(f".lora_B.{peft_adapter}.", ".lora_B."): v
                for k, v in lora.items()}
    out: StateDict = {}
    for key, down in lora.items():
        for down_sfx, up_sfx in _LORA_SUFFIXES:
            if not key.endswith(down_sfx):
                continue
            module = key[: -len(down_sfx)]
            up_key = module + up_sfx
            if up_key not in lora:
                raise KeyError(f"LoRA key {key} has no matching {up_key}")
            up = lora[up_key].float()
            down = down.float()
            rank = down.shape[0]
            alpha = lora.get(module + ".alpha")
            s = scale * (float(alpha) / rank if alpha is not None else 1.0)
            if down.dim() == 2:
                delta = up @ down  # [out, r] @ [r, in]
            else:  # conv: up [out, r, 1, 1], down [r, in, kh, kw]
                delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
            name = module[len(strip_prefix):] if strip_prefix and module.startswith(strip_prefix) else module
            out[name + ".weight"] = s * delta
            break
    if not out:
        raise ValueError("no LoRA down/up weight pairs found (expected lora_A/lora_B, lora.down/lora.up or "
                         "lora_down/lora_up keys)")
    return out


def lora_deltas_from_model(model: nn.Module, adapter_name: str = "default") -> StateDict:
    """Deltas of one peft adapter attached to `model` (uses peft's own get_delta_weight, scaling included)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out: StateDict = {}
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_A", {}):
            out[name + ".weight"] = module.get_delta_weight(adapter_name).detach().float()
    if not out:
        raise ValueError(f"no LoRA layers with adapter {adapter_name!r} in {type(model).__name__}")
    return out


def clean_state_dict(model: nn.Module) -> StateDict:
    """The network's weights without peft's wrapper names (`x.base_layer.weight` -> `x.weight`, no LoRA params)."""
    sd = {}
    for k, v in model.state_dict().items():
        if re.search(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.", k):
            continue
        sd[k.replace(".base_layer.", ".")] = v
    return sd


def merge_weights(base: StateDict, delta_neg: StateDict | None = None, delta_pos: StateDict | None = None,
                  beta: float = 0.0) -> StateDict:
    """theta = theta_base + delta_neg + (1 - beta) * delta_pos, in each base tensor's dtype."""
    delta_neg, delta_pos = delta_neg or {}, delta_pos or {}
    unknown = sorted((set(delta_neg) | set(delta_pos)) - set(base))
    if unknown:
        raise KeyError(f"{len(unknown)} delta keys are not base parameters, e.g. {unknown[:3]}")
    out = {}
    for k, w in base.items():
        if k not in delta_neg and k not in delta_pos:
            out[k] = w.clone()
            continue
        acc = w.float().clone()
        if k in delta_neg:
            acc += delta_neg[k].to(acc.device)
        if k in delta_pos:
            acc += (1.0 - beta) * delta_pos[k].to(acc.device)
        out[k] = acc.to(w.dtype)
    return out
