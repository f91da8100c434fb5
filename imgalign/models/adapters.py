"""One adapter per model family: everything a method needs to know about a diffusers pipeline.

Methods never branch on the family. They ask the adapter to
  encode prompts            -> a conditioning dict of batch-first tensors (`Cond`)
  encode the unconditional  -> the `Cond` of CFG's unconditional branch, as the family's pipeline builds it
  encode / decode images    -> latents in the space the denoiser sees
  sample training times     -> the family's own time variable `t`
  noise a batch             -> (noisy latents, the training target of this family's prediction type)
  predict                   -> the denoiser's output for (noisy, t, cond), with or without CFG
  convert a prediction      -> (clean estimate x0, noise estimate eps), by the family's prediction type
and get the family's diffusers pipeline back for generation.

Time variable `t`: integer DDPM timesteps in [0, T) for SD-type models (epsilon or v-prediction);
the noise level sigma in (0, 1) for flow-matching models (SD3, FLUX), where
    x_t = (1 - sigma) x0 + sigma * noise,   target velocity = noise - x0.

The trainable network is passed to `predict` explicitly (`model=`), so a recipe can hand in the
accelerate-wrapped network, the same network with its LoRA adapter disabled (reference), or a frozen copy.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from imgalign.errors import UserError
from imgalign.sampling.noise import to_x0_eps

Cond = dict[str, Tensor]
DEFAULT_LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def repeat_cond(cond: Cond, n: int) -> Cond:
    """[B, ...] -> [n*B, ...], batch order [c_1..c_B, c_1..c_B, ...] (winner/loser halves share the text)."""
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in cond.items()}


def cat_cond(*conds: Cond) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


@contextmanager
def adapters_disabled(model: nn.Module):
    """The reference model of LoRA training: the same network with its adapters switched off."""
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def check_noise_range(noise_range) -> tuple[float, float]:
    lo, hi = (float(v) for v in noise_range)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"noise_range must be [lo, hi] with 0 <= lo < hi <= 1 (fractions of the noise schedule), "
                         f"got {list(noise_range)}")
    return lo, hi


class ModelAdapter:
    family: ClassVar[str]
    is_flow: ClassVar[bool] = False
    denoiser_name: ClassVar[str] = "unet"
    lora_layers_kwarg: ClassVar[str] = "unet_lora_layers"

    def __init__(self, pipe, *, timestep_sampling: str = "logit_normal", flow_shift: float | None = None,
                 flux_guidance: float = 3.5, max_sequence_length: int = 128):
        self.pipe = pipe
        self.timestep_sampling = timestep_sampling
        self.flow_shift = flow_shift
        self.flux_guidance = flux_guidance
        self.max_sequence_length = max_sequence_length

    # ---- components ---------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        # the first parameter's device: diffusers' ModelMixin.device walks every module for group-offloading hooks
        # (about 5 ms on an SD UNet, and recipes ask per sample)
        param = next(self.denoiser.parameters(), None)
        return param.device if param is not None else self.denoiser.device

    @property
    def prediction_type(self) -> str:
        return "flow" if self.is_flow else self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def to(self, device=None, dtype=None) -> ModelAdapter:
        self.pipe.to(device=device, dtype=dtype)
        return self

    def text_encoders(self) -> list[nn.Module]:
        names = ("text_encoder", "text_encoder_2", "text_encoder_3")
        return [m for n in names if (m := getattr(self.pipe, n, None)) is not None]

    def freeze_all(self) -> None:
        for m in [self.vae, self.denoiser, *self.text_encoders()]:
            m.requires_grad_(False)

    # ---- images -------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f] (scaled, and shifted where the VAE has one)."""
        cfg = self.vae.config
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        shift = cfg.get("shift_factor") or 0.0
        return ((latents - shift) * cfg.scaling_factor).float()

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """latents -> pixels [B, 3, H, W] in [-1, 1]."""
        cfg = self.vae.config
        shift = cfg.get("shift_factor") or 0.0
        latents = latents.to(self.vae.device, self.vae.dtype) / cfg.scaling_factor + shift
        return self.vae.decode(latents).sample.clamp(-1, 1).float()

    # ---- text ---------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str], **micro) -> Cond:
        raise NotImplementedError

    def encode_uncond(self, n: int, cond: Cond | None = None) -> Cond:
        """CFG's unconditional branch for n samples, as the family's pipeline builds its negative embeddings when
        no negative prompt is given: the encoded empty prompt "" (SD1.x/2.x, SD3 with all its encoders, FLUX);
        SDXL overrides this. ``cond``, the positive branch of the same n samples, lends its micro-conditioning
        (SDXL time ids) where the family has one."""
        return self.encode_prompts([""] * n)

    # ---- training -----------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None,
                         noise_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
        """n training timesteps. ``noise_range`` = (lo, hi) restricts them to that fraction of the noise schedule,
        0 = clean, 1 = pure noise (DDPM: t / T in [lo, hi); flow: the pre-shift u in [lo, hi])."""
        raise NotImplementedError

    def noise_and_target(self, latents: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha, sigma of x_t = alpha x0 + sigma eps at this family's time values t [B] (those `noise_and_target`
        and `predict` take), shaped [B, 1, ...] like `like` (fp32, on its device)."""
        raise NotImplementedError

    def predict(self, model: nn.Module, noisy: Tensor, t: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def to_x0_eps(self, pred: Tensor, x: Tensor, alpha: Tensor | float, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
        """The denoiser's output at x = alpha x0 + sigma eps -> (clean estimate x0, noise estimate eps), by this
        family's `prediction_type` (epsilon, v_prediction, flow velocity; formulas in `imgalign.sampling.noise`).
        alpha, sigma broadcast against x; flow families use alpha = 1 - sigma."""
        return to_x0_eps(pred, x, alpha, sigma, self.prediction_type)

    def predict_cfg(self, model: nn.Module, noisy: Tensor, t: Tensor, cond: Cond, uncond: Cond, scale: float) -> Tensor:
        """Classifier-free guidance in one batched forward: uncond + scale * (cond - uncond)."""
        if scale == 1.0:
            return self.predict(model, noisy, t, cond)
        pred = self.predict(model, torch.cat([noisy, noisy]), torch.cat([t, t]), cat_cond(uncond, cond))
        pred_u, pred_c = pred.chunk(2)
        return pred_u + scale * (pred_c - pred_u)

    # ---- LoRA ---------------------------------------------------------------------------------
    def add_lora(self, rank: int = 8, alpha: float | None = None, target_modules=DEFAULT_LORA_TARGETS,
                 init: str | bool = "gaussian", dropout: float = 0.0, adapter_name: str = "default") -> None:
        """Attach a peft LoRA adapter to the denoiser; only its parameters require grad, kept in fp32.

        Several named adapters can share one base network (Diffusion-DRO's lagged sampler, Flash-DMD's fake
        score): `adapter_active(name)` selects the one the forward uses, and each is saved and loaded on its own
        (`save_lora(..., adapter_name=)`). The first adapter stays active after adding others. peft makes the
        active adapter's parameters the ones that require grad: an optimizer of another adapter takes that
        adapter's parameters by name (`lora_parameters(name)`) and trains inside `adapter_active(name)`.
        """
        from peft import LoraConfig

        if not getattr(self.denoiser, "_hf_peft_config_loaded", False):
            self.denoiser.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                            init_lora_weights=init, target_modules=list(target_modules))
        active = self.adapter_names()
        self.denoiser.add_adapter(config, adapter_name=adapter_name)
        for name, p in self.denoiser.named_parameters():
            if f".{adapter_name}." in name and "lora_" in name:
                p.requires_grad_(True)
                p.data = p.data.float()  # trainable params in fp32 under mixed precision
        if active:  # add_adapter activates the new adapter: keep the first one active
            self.denoiser.set_adapter(active[0])

    def lora_parameters(self, adapter_name: str = "default") -> list[nn.Parameter]:
        """The parameters of one LoRA adapter (whether or not it is the active one)."""
        return [p for n, p in self.denoiser.named_parameters() if "lora_" in n and f".{adapter_name}." in n]

    def adapter_names(self) -> list[str]:
        config = getattr(self.denoiser, "peft_config", None) or {}
        return list(config)

    @contextlib.contextmanager
    def adapter_active(self, name: str):
        """Forwards inside the block use LoRA adapter `name`; the adapter active before is restored after."""
        net = self.denoiser
        before = net.active_adapters() if hasattr(net, "active_adapters") else ["default"]
        if before == [name]:  # already the one (peft's set_adapter walks every module: ~10 ms on an SD UNet)
            yield
            return
        net.set_adapter(name)
        try:
            yield
        finally:
            net.set_adapter(before[0] if len(before) == 1 else before)

    def lora_state_dict(self, model: nn.Module | None = None, adapter_name: str = "default") -> dict[str, Tensor]:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        model = getattr(model, "module", model) or self.denoiser
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=adapter_name))

    def save_lora(self, out_dir: str | Path, model: nn.Module | None = None, adapter_name: str = "default") -> Path:
        """diffusers-format `pytorch_lora_weights.safetensors`, loadable with `pipe.load_lora_weights(out_dir)`, with the
        adapter's peft config as its metadata, so loading restores lora_alpha too (without it a rank-32 / alpha-64
        LoRA loads at scale 1 instead of 2)."""
        out = Path(out_dir)
        net = getattr(model, "module", model) or self.denoiser
        config = net.peft_config[adapter_name].to_dict()
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        meta_kwarg = self.lora_layers_kwarg.replace("_lora_layers", "_lora_adapter_metadata")
        type(self.pipe).save_lora_weights(out, safe_serialization=True, **{
            self.lora_layers_kwarg: self.lora_state_dict(net, adapter_name), meta_kwarg: meta})
        return out

    def load_lora_into_denoiser(self, lora_dir: str | Path, adapter_name: str = "default") -> None:
        """Load a saved adapter's weights into the attached (trainable) adapter `adapter_name`, for resume."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        sd = load_file(str(Path(lora_dir) / "pytorch_lora_weights.safetensors"))
        prefix = self.denoiser_name + "."
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        from diffusers.utils import convert_unet_state_dict_to_peft

        result = set_peft_model_state_dict(self.denoiser, convert_unet_state_dict_to_peft(sd),
                                           adapter_name=adapter_name)
        if result is not None and getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"unexpected LoRA keys in {lora_dir}: {result.unexpected_keys[:5]}")


# ------------------------------------------------------------------------------------------------
# SD-type (DDPM) families
# ------------------------------------------------------------------------------------------------
class _DDPMAdapter(ModelAdapter):
    def __init__(self, pipe, **kw):
        super().__init__(pipe, **kw)
        from diffusers import DDPMScheduler

        # Training noise schedule: the same betas as the pipeline's inference scheduler.
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    @property
    def num_train_timesteps(self) -> int:
        return self.noise_scheduler.config.num_train_timesteps

    def sample_timesteps(self, n, generator=None, noise_range=(0.0, 1.0)):
        """t ~ U{lo T, ..., hi T - 1} (T - 1 included when hi = 1), as in the Diffusion-DPO references (no SNR
        weighting); the full range by default."""
        lo, hi = check_noise_range(noise_range)
        t_lo = min(round(lo * self.num_train_timesteps), self.num_train_timesteps - 1)
        t_hi = max(round(hi * self.num_train_timesteps), t_lo + 1)
        return torch.randint(t_lo, t_hi, (n,), generator=generator).to(self.device)

    def alpha_sigma(self, t, like):
        shape = (-1,) + (1,) * (like.dim() - 1)
        ac = self.noise_scheduler.alphas_cumprod.to(like.device)[t.long().to(like.device)].float().view(shape)
        return ac.sqrt(), (1 - ac).sqrt()

    def noise_and_target(self, latents, noise, t):
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.prediction_type == "epsilon":
            return noisy, noise
        if self.prediction_type == "v_prediction":
            return noisy, self.noise_scheduler.get_velocity(latents, noise, t)
        raise ValueError(f"unsupported prediction_type {self.prediction_type!r} (epsilon or v_prediction)")


class SDAdapter(_DDPMAdapter):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, epsilon or v-prediction UNet."""

    family = "sd"

    @torch.no_grad()
    def encode_prompts(self, prompts, **micro):
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def predict(self, model, noisy, t, cond):
        return model(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


class SDXLAdapter(_DDPMAdapter):
    """SDXL: two text encoders (penultimate hidden states concatenated), pooled embeds and
    micro-conditioning time ids (original size, crop top-left, target size) per example."""

    family = "sdxl"

    @torch.no_grad()
    def encode_prompts(self, prompts, original_sizes: Tensor | None = None, crops_top_left: Tensor | None = None,
                       target_size: tuple[int, int] | None = None, **micro):
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self.device, do_classifier_free_guidance=False)
        n = len(prompts)
        res = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        target = torch.tensor(target_size or (res, res), dtype=torch.float32).expand(n, 2)
        orig = original_sizes.float() if original_sizes is not None else target
        crop = crops_top_left.float() if crops_top_left is not None else torch.zeros(n, 2)
        time_ids = torch.cat([orig, crop, target], dim=1).to(self.device)  # [B, 6]
        return {"encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids.to(embeds.dtype)}

    @torch.no_grad()
    def encode_uncond(self, n, cond=None):
        """As `StableDiffusionXLPipeline.encode_prompt` without a negative prompt: zero embeddings (sequence and
        pooled) when the pipeline's `force_zeros_for_empty_prompt` is set (SDXL base's default), else the encoded
        "". The time ids are the positive branch's (the pipeline's negative_add_time_ids = add_time_ids), the
        default ones of `encode_prompts` when ``cond`` is None."""
        if cond is not None and len(cond["time_ids"]) != n:
            raise ValueError(f"encode_uncond(n={n}) got a positive branch of {len(cond['time_ids'])} samples")
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            ref = cond if cond is not None else self.encode_prompts([""] * n)
            out = {k: torch.zeros_like(v) for k, v in ref.items() if k != "time_ids"}
            out["time_ids"] = ref["time_ids"]
            return out
        out = self.encode_prompts([""] * n)
        if cond is not None:
            out["time_ids"] = cond["time_ids"]
        return out

    def predict(self, model, noisy, t, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return model(noisy, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample


# ------------------------------------------------------------------------------------------------
# Flow-matching families
# ------------------------------------------------------------------------------------------------
class _FlowAdapter(ModelAdapter):
    is_flow = True
    denoiser_name = "transformer"
    lora_layers_kwarg = "transformer_lora_layers"

    @property
    def shift(self) -> float:
        """Static timestep shift for training sigmas; 1 (none) for schedulers with resolution-dependent
        (dynamic) shifting such as FLUX's, as in diffusers' training scripts."""
        if self.flow_shift is not None:
            return self.flow_shift
        cfg = self.pipe.scheduler.config
        return 1.0 if cfg.get("use_dynamic_shifting") else float(cfg.get("shift", 1.0))

    def sample_timesteps(self, n, generator=None, noise_range=(0.0, 1.0)):
        """sigma = shift*u / (1 + (shift-1)*u) with u ~ logit-normal(0, 1) (SD3 paper) or uniform, then mapped
        linearly into ``noise_range``."""
        lo, hi = check_noise_range(noise_range)
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(n, generator=generator))
        elif self.timestep_sampling == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            raise ValueError(f"timestep_sampling must be logit_normal or uniform, got {self.timestep_sampling!r}")
        u = (lo + (hi - lo) * u).clamp(1e-4, 1 - 1e-4)
        s = self.shift
        return (s * u / (1 + (s - 1) * u)).to(self.device)

    def alpha_sigma(self, t, like):
        s = t.float().view((-1,) + (1,) * (like.dim() - 1)).to(like.device)
        return 1 - s, s

    def noise_and_target(self, latents, noise, t):
        sigma = t.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
        return (1 - sigma) * latents + sigma * noise, noise - latents


class SD3Adapter(_FlowAdapter):
    """SD3 / SD3.5: CLIP-L + CLIP-G (+ optional T5) text encoders, MMDiT velocity model."""

    family = "sd3"

    @torch.no_grad()
    def encode_prompts(self, prompts, **micro):
        prompts = list(prompts)
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompts, prompts, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, model, noisy, t, cond):
        return model(hidden_states=noisy, timestep=t * 1000, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"]).sample


class FluxAdapter(_FlowAdapter):
    """FLUX.1: CLIP pooled + T5 sequence embeddings, packed 2x2 latent patches, guidance embedding (dev)."""

    family = "flux"

    @torch.no_grad()
    def encode_prompts(self, prompts, **micro):
        prompts = list(prompts)
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=self.device,
                                                    max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def encode_uncond(self, n, cond=None):
        """FluxPipeline has no default negative embeddings: it runs CFG only as "true CFG" (true_cfg_scale > 1 and
        a negative prompt given), which encodes the negative prompt with `encode_prompt` like a positive one. So
        the unconditional branch here is what true CFG does with negative_prompt="": encode_prompts([""] * n)."""
        return self.encode_prompts([""] * n)

    def predict(self, model, noisy, t, cond):
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)  # [B, (h/2)(w/2), 4c]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        txt = cond["encoder_hidden_states"]
        txt_ids = torch.zeros(txt.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        net = getattr(model, "module", model)
        guidance = torch.full((b,), self.flux_guidance, device=noisy.device) if net.config.guidance_embeds else None
        out = model(hidden_states=packed, timestep=t, guidance=guidance, pooled_projections=cond["pooled_projections"],
                    encoder_hidden_states=txt, txt_ids=txt_ids, img_ids=img_ids).sample
        # unpack [B, (h/2)(w/2), 4c] -> [B, c, h, w] (inverse of _pack_latents)
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
ADAPTERS: dict[str, type[ModelAdapter]] = {
    "StableDiffusionPipeline": SDAdapter,
    "StableDiffusionXLPipeline": SDXLAdapter,
    "StableDiffusion3Pipeline": SD3Adapter,
    "FluxPipeline": FluxAdapter,
}
FAMILY_NAMES = {"sd": SDAdapter, "sd15": SDAdapter, "sd2": SDAdapter, "sdxl": SDXLAdapter, "sd3": SD3Adapter,
                "flux": FluxAdapter}


def adapter_for_pipeline(pipe, **kw) -> ModelAdapter:
    name = type(pipe).__name__
    if name not in ADAPTERS:
        raise ValueError(f"no imgalign adapter for {name}; supported: {', '.join(ADAPTERS)}")
    return ADAPTERS[name](pipe, **kw)


class ModelLoadError(UserError, OSError):
    """A model that is neither a local folder nor reachable on the hub (or in its cache)."""


def _hub_reachable_or_cached(model: str) -> bool:
    """-> local_files_only for a hub id: True when it is in the local cache; False when the hub answers. Fails
    at once (no minute of download retries) when the id is neither cached nor reachable."""
    import os

    from diffusers import DiffusionPipeline

    try:
        DiffusionPipeline.load_config(model, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - not in the cache: ask the hub below
        pass
    fix = (f"download it where there is network (`huggingface-cli download {model} --local-dir DIR`) and pass "
           "DIR instead of the hub id")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ModelLoadError(f"model {model!r} is not a local folder and not in the Hugging Face cache, and "
                             f"HF_HUB_OFFLINE is set; {fix}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=10)
    except RepositoryNotFoundError:
        raise ModelLoadError(f"model {model!r}: no such local folder, and no such model on the Hugging Face Hub "
                             "(or it is gated: log in with `huggingface-cli login`); check the path or id") from None
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout: offline
        raise ModelLoadError(f"model {model!r} is not a local folder or cached, and the Hugging Face Hub cannot be "
                             f"reached ({type(e).__name__}); {fix}") from None
    return False


def load_adapter(model: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 variant: str | None = None, drop_t5: bool = False, local_files_only: bool | None = None,
                 **adapter_kw) -> ModelAdapter:
    """Load a diffusers pipeline from a hub id or a local directory and wrap it in its family adapter.

    `drop_t5=True` loads SD3 without its T5 encoder (text_encoder_3=None), as the SD3 paper allows; a saved
    SD3 pipeline whose `model_index.json` has no T5 (`text_encoder_3: [null, null]`) loads that way by itself.
    """
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": dtype}
    if variant:
        kwargs["variant"] = variant
    if Path(model).exists():
        local_files_only = True
    elif not local_files_only:
        local_files_only = _hub_reachable_or_cached(model)
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    try:
        config = DiffusionPipeline.load_config(model, local_files_only=kwargs.get("local_files_only", False))
        cls_name = config["_class_name"]
        if cls_name in ("StableDiffusionPipeline",):
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        saved_without_t5 = (config.get("text_encoder_3") or [None])[0] is None
        if cls_name == "StableDiffusion3Pipeline" and (drop_t5 or saved_without_t5):
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        pipe = DiffusionPipeline.from_pretrained(model, **kwargs)
    except OSError as e:
        raise ModelLoadError(
            f"could not load the pipeline {model!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
            "If this machine has no network, download the model elsewhere (e.g. `huggingface-cli download "
            f"{model} --local-dir DIR`) and pass the local directory instead of the hub id."
        ) from e
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for_pipeline(pipe, **adapter_kw)
    adapter.to(device)
    return adapter

