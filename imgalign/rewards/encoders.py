"""Image/text encoders shared by the embedding rewards: open_clip models and transformers dual encoders.

Both return L2-normalised float32 embeddings, preprocess images with a differentiable torch
:class:`~imgalign.rewards.images.Preprocess`, cache text embeddings of repeated prompts, and count the images they
encode (``image_encodings``), which the benchmark uses to show group win rates cost G encodings.

open_clip model directory layout (what open_clip's ``local-dir:`` / ``hf-hub:`` schemas read;
:func:`save_open_clip_dir` writes it)::

    my_clip/
      open_clip_config.json        {"model_cfg": {embed_dim, vision_cfg, text_cfg, ...},
                                    "preprocess_cfg": {size, mean, std, interpolation, resize_mode}}
      open_clip_model.safetensors  the model's state dict
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .images import Preprocess, preprocess_from_hf
from .loading import RewardLoadError, from_pretrained, local_path, looks_like_path, offline_help

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def _open_clip():
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - core dependency
        raise ImportError("the CLIP rewards need open-clip-torch: pip install open-clip-torch") from exc
    return open_clip


def resolve_open_clip(model: str, pretrained: str | None) -> tuple[str, str | None]:
    """Turn (model, pretrained) into what ``open_clip.create_model`` takes; errors name the fix."""
    open_clip = _open_clip()
    model = str(model)
    if model.startswith(("local-dir:", "hf-hub:")):
        if pretrained:
            raise RewardLoadError(f"model={model} carries its own weights; do not also pass pretrained={pretrained}")
        if model.startswith("local-dir:"):
            return resolve_open_clip(model[len("local-dir:") :], None)
        return model, None
    path = local_path(model)
    if path is not None and path.is_dir():
        if not (path / OPEN_CLIP_CONFIG).is_file():
            raise RewardLoadError(
                f"model={model}: a model directory must hold {OPEN_CLIP_CONFIG} (model_cfg + preprocess_cfg) and "
                f"{OPEN_CLIP_WEIGHTS}; found {sorted(p.name for p in path.iterdir())}"
            )
        if pretrained:
            raise RewardLoadError(f"model={model} is a model directory with its own weights; drop pretrained={pretrained}")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")) and not any(path.glob("*.pth")):
            raise RewardLoadError(f"model={model}: no weights in the directory (expected {OPEN_CLIP_WEIGHTS})")
        return f"local-dir:{path.resolve()}", None
    if path is not None and path.is_file() and path.suffix == ".json":
        config = json.loads(path.read_text())
        if "model_cfg" in config:  # a full open_clip_config.json: register only the model part
            raise RewardLoadError(
                f"model={model}: this is an {OPEN_CLIP_CONFIG}; pass the directory that holds it and its weights"
            )
        open_clip.add_model_config(path)
        model = path.stem
    elif path is None and looks_like_path(model):
        raise RewardLoadError(f"model={model}: no such file or directory")
    if model not in open_clip.list_models():
        close = difflib.get_close_matches(model, open_clip.list_models(), n=3)
        raise RewardLoadError(f"unknown open_clip architecture '{model}'" + (f"; did you mean {close}?" if close else ""))
    if not pretrained and "openai" in open_clip.list_pretrained_tags_by_model(model):
        pretrained = "openai"
    if not pretrained:
        raise RewardLoadError(
            f"model={model} needs weights: pass pretrained=TAG (one of "
            f"{open_clip.list_pretrained_tags_by_model(model)}) or pretrained=/path/to/checkpoint.safetensors"
        )
    ckpt = local_path(pretrained)
    if ckpt is not None:
        if not ckpt.is_file():
            raise RewardLoadError(f"pretrained={pretrained} is a directory; pass the checkpoint file")
        return model, str(ckpt)
    if looks_like_path(pretrained):
        raise RewardLoadError(f"pretrained={pretrained}: no such file")
    if pretrained not in open_clip.list_pretrained_tags_by_model(model):
        raise RewardLoadError(
            f"pretrained={pretrained}: neither a file nor a known tag of {model} "
            f"({open_clip.list_pretrained_tags_by_model(model)})"
        )
    return model, pretrained


def _download_hint(model: str, pretrained: str | None) -> str:
    open_clip = _open_clip()
    if model.startswith("hf-hub:"):
        return offline_help(model[len("hf-hub:") :], "model")
    cfg = open_clip.get_pretrained_cfg(model, pretrained or "") or {}
    repo = (cfg.get("hf_hub") or "").strip("/")
    if repo:
        return (
            f"could not download the '{pretrained}' weights of {model} from the Hugging Face Hub repo {repo}. "
            f"Without network, fetch them on a machine that has network (`hf download {repo} --local-dir DIR`), copy "
            f"DIR here and pass the checkpoint file in it (open_clip_model.safetensors or open_clip_pytorch_model.bin):"
            f" model={model}, pretrained=DIR/<file>"
        )
    return f"could not download weights '{pretrained}' for {model}; pass pretrained=/path/to/local/checkpoint"


class OpenCLIPEncoder:
    """An open_clip model with its tokenizer and differentiable preprocessing; embeddings are L2-normalised."""

    def __init__(
        self,
        model: str,
        pretrained: str | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        preprocess: Preprocess | Mapping[str, Any] | None = None,
        text_cache_size: int = 4096,
    ):
        open_clip = _open_clip()
        name, weights = resolve_open_clip(model, pretrained)
        try:
            self.model = open_clip.create_model(
                name, pretrained=weights, device=device, weights_only=True, require_pretrained=True
            )
        except RewardLoadError:
            raise
        except (RuntimeError, OSError) as exc:
            if local_path(weights or "") is None and not name.startswith("local-dir:"):
                raise RewardLoadError(f"{_download_hint(name, weights)} (underlying error: {exc})") from exc
            raise RewardLoadError(f"could not load open_clip model {name} with weights {weights}: {exc}") from exc
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.name = name
        if isinstance(preprocess, Preprocess):
            self.preprocess = preprocess
        else:
            cfg = dict(open_clip.get_model_preprocess_cfg(self.model))
            cfg.update(preprocess or {})
            size = cfg.get("size", 224)
            self.preprocess = Preprocess(
                size=tuple(size) if isinstance(size, (list, tuple)) else int(size),
                resize_mode=cfg.get("resize_mode", "shortest"),
                interpolation=cfg.get("interpolation", "bicubic"),
                mean=tuple(cfg["mean"]),
                std=tuple(cfg["std"]),
                fill=float(cfg.get("fill_color", 0)) / 255.0,
            )
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._text_cache_size = text_cache_size
        self.image_encodings = 0  # images encoded so far (the benchmark counts these)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def logit_scale(self) -> float:
        """exp(learned logit scale): the model's inverse temperature (100 for OpenAI CLIP)."""
        return float(self.model.logit_scale.detach().float().exp())

    def encode_images(self, unit) -> torch.Tensor:
        """[0, 1] images -> normalised embeddings [B, D] (float32)."""
        pixels = self.preprocess(unit, device=self.device, dtype=self.dtype)
        self.image_encodings += pixels.shape[0]
        features = self.model.encode_image(pixels)
        return F.normalize(features.float(), dim=-1)

    def encode_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> normalised embeddings [B, D] (float32); repeated prompts are encoded once and cached."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            with torch.no_grad():
                tokens = self.tokenizer(missing).to(self.device)
                features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
            for prompt, feature in zip(missing, features):
                self._text_cache[prompt] = feature
                if len(self._text_cache) > self._text_cache_size:
                    self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[p] for p in prompts])

    def to(self, device=None, dtype=None) -> OpenCLIPEncoder:
        self.model.to(device=device, dtype=dtype)
        self._text_cache.clear()
        return self


def save_open_clip_dir(
    model: torch.nn.Module,
    model_cfg: Mapping[str, Any],
    directory: str | os.PathLike,
    preprocess_cfg: Mapping[str, Any] | None = None,
) -> Path:
    """Write an open_clip model as a model directory (``open_clip_config.json`` + ``open_clip_model.safetensors``).

    ``model_cfg`` is the architecture dict ``open_clip`` builds from (embed_dim, vision_cfg, text_cfg, ...).
    ``preprocess_cfg`` defaults to the model's own (size, mean, std, interpolation, resize_mode).
    """
    from safetensors.torch import save_file

    open_clip = _open_clip()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if preprocess_cfg is None:
        preprocess_cfg = {
            k: v
            for k, v in dict(open_clip.get_model_preprocess_cfg(model)).items()
            if k in ("size", "mean", "std", "interpolation", "resize_mode", "fill_color")
        }
    config = {"model_cfg": dict(model_cfg), "preprocess_cfg": _jsonable(dict(preprocess_cfg))}
    (directory / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / OPEN_CLIP_WEIGHTS))
    return directory


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def model_features(output) -> torch.Tensor:
    """``get_image_features`` / ``get_text_features`` return a tensor (transformers 4) or an output object whose
    ``pooler_output`` holds the projected features (transformers 5)."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find features in {type(output).__name__}")


def preprocess_from_hf_processor(image_processor: Any) -> Preprocess:
    """:func:`~imgalign.rewards.images.preprocess_from_hf` plus EfficientNet's ``include_top`` (ALIGN's image
    processor; on by default): after the usual normalisation the pixels are divided by ``image_std`` once more,
    i.e. ``(v - mean) / std**2``, or ``v / std`` without normalisation."""
    preprocess = preprocess_from_hf(image_processor)
    if not getattr(image_processor, "include_top", False):
        return preprocess
    extra = tuple(float(s) for s in image_processor.image_std)
    return dataclasses.replace(preprocess, std=tuple(a * b for a, b in zip(preprocess.std, extra)))


def text_max_length(processor: Any, tokenizer: Any, model: Any) -> int | None:
    """How many tokens the model's own processor keeps: the processor's default ``max_length`` (ALIGN's: 64),
    else the tokenizer's ``model_max_length`` (CLIP's: 77); never more than the text tower's positions."""
    limit = None
    defaults = getattr(type(processor), "text_kwargs", None)  # transformers 5: per-processor class defaults
    if not isinstance(defaults, Mapping):  # transformers 4: <Model>ProcessorKwargs._defaults in the processor module
        import sys

        module = vars(sys.modules.get(type(processor).__module__, object))
        defaults = next((d["text_kwargs"] for d in (getattr(v, "_defaults", None) for v in list(module.values()))
                         if isinstance(d, Mapping) and isinstance(d.get("text_kwargs"), Mapping)), {})
    if defaults.get("max_length"):
        limit = int(defaults["max_length"])
    elif 0 < int(getattr(tokenizer, "model_max_length", 0) or 0) < 100_000:  # unset is a huge sentinel
        limit = int(tokenizer.model_max_length)
    config = getattr(model, "config", None)
    positions = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    if positions:
        limit = min(limit or int(positions), int(positions))
    return limit


class HFDualEncoder:
    """A transformers dual encoder (``CLIPModel``, ``AlignModel``, ...) with its processor; normalised embeddings.

    Text is tokenized as the model's processor would (``max_length=None``: its own limit, see
    :func:`text_max_length`) but padded only to the longest prompt; images go through a differentiable copy of the
    processor's preprocessing (:func:`preprocess_from_hf_processor`)."""

    def __init__(
        self,
        model: str | os.PathLike,
        processor: str | os.PathLike | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        param: str = "model",
    ):
        from transformers import AutoModel, AutoProcessor

        self.model = from_pretrained(AutoModel, model, param=param, trust_remote_code=trust_remote_code)
        self.model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        # a local model directory usually holds its processor too
        processor_source = processor if processor is not None else model
        self.processor = from_pretrained(
            AutoProcessor, processor_source, param="processor" if processor is not None else param,
            trust_remote_code=trust_remote_code,
        )
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.preprocess = preprocess_from_hf_processor(getattr(self.processor, "image_processor", self.processor))
        self.max_length = max_length or text_max_length(self.processor, self.tokenizer, self.model)
        self._text_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.image_encodings = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def logit_scale(self) -> float:
        """The model's inverse temperature: exp(logit_scale) (CLIP), 1 / temperature (ALIGN), else 100."""
        if hasattr(self.model, "logit_scale"):
            return float(self.model.logit_scale.detach().float().exp())
        if hasattr(self.model, "temperature"):
            return float(1.0 / self.model.temperature.detach().float())
        return 100.0

    def encode_images(self, unit) -> torch.Tensor:
        pixels = self.preprocess(unit, device=self.device, dtype=self.dtype)
        self.image_encodings += pixels.shape[0]
        return F.normalize(model_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def encode_texts(self, prompts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            kwargs = {"padding": True, "truncation": True, "return_tensors": "pt"}
            if self.max_length:
                kwargs["max_length"] = self.max_length
            tokens = self.tokenizer(missing, **kwargs).to(self.device)
            with torch.no_grad():
                features = self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
                )
            for prompt, feature in zip(missing, F.normalize(model_features(features).float(), dim=-1)):
                self._text_cache[prompt] = feature
                if len(self._text_cache) > 4096:
                    self._text_cache.popitem(last=False)
        return torch.stack([self._text_cache[p] for p in prompts])

    def to(self, device=None, dtype=None) -> HFDualEncoder:
        self.model.to(device=device, dtype=dtype)
        self._text_cache.clear()
        return self
