"""Loading reward weights safely from a Hugging Face Hub id or a local path.

Rules (DESIGN.md, "Safety"):
- a local path always wins; a string that is not an existing path is treated as a hub id;
- without network a hub id fails with an error that names the model id and how to pass a local path;
- safetensors is preferred; ``.pt`` / ``.pth`` / ``.bin`` files are read with ``torch.load(weights_only=True)``;
- ``trust_remote_code`` is never turned on unless the caller asks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class RewardLoadError(RuntimeError):
    """A reward's weights could not be found or read; the message says which and how to fix it."""


def looks_like_path(name: str) -> bool:
    """True for strings the user clearly meant as a filesystem path (so a miss is "file not found")."""
    name = str(name)
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or (len(name) > 1 and name[1] == ":" and name[0].isalpha())  # C:\...
        or name.endswith((".safetensors", *TORCH_SUFFIXES, ".json"))
        or name.count("/") > 1
    )


def local_path(name: str | os.PathLike | None) -> Path | None:
    """The local path ``name`` points to, or None when it is not an existing file or directory."""
    if name is None:
        return None
    path = Path(os.path.expanduser(str(name)))
    return path if path.exists() else None


def offline_help(model_id: str, param: str, filename: str | None = None) -> str:
    target = f"{model_id} (file {filename})" if filename else model_id
    fetch = f"hf download {model_id}" + (f" {filename}" if filename else "") + " --local-dir DIR"
    return (
        f"could not load '{target}' from the Hugging Face Hub. Without network, fetch it on a machine that has "
        f"network (`{fetch}`), copy DIR here and pass the local path instead: {param}=DIR"
        + (f"/{filename}" if filename else "")
    )


def _hub_error(exc: BaseException, model_id: str, param: str, filename: str | None = None) -> RewardLoadError:
    return RewardLoadError(f"{offline_help(model_id, param, filename)}  (underlying error: {type(exc).__name__}: {exc})")


def resolve_file(name: str | os.PathLike, filename: str | None, *, param: str) -> Path:
    """Path of one weight file given a local file, a local directory (+ ``filename``) or a hub repo id."""
    path = local_path(name)
    if path is not None:
        if path.is_file():
            return path
        if filename is None:
            raise RewardLoadError(f"{param}={name} is a directory; pass the weight file inside it")
        candidate = path / filename
        if not candidate.is_file():
            raise RewardLoadError(f"{param}={name}: expected the file {filename} inside that directory")
        return candidate
    if looks_like_path(str(name)):
        raise RewardLoadError(f"{param}={name}: no such file or directory")
    if filename is None:
        raise RewardLoadError(f"{param}={name}: not a local file; to use a hub repo also name the file in it")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(str(name), filename))
    except Exception as exc:  # network, auth, missing file: all become one actionable message
        raise _hub_error(exc, str(name), param, filename) from exc


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict: safetensors, or a torch pickle with ``weights_only=True``.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers and strips a ``module.`` (DDP) prefix.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    elif path.suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RewardLoadError(
                f"{path}: could not be read with torch.load(weights_only=True) ({exc}). imgalign never unpickles "
                "arbitrary objects; convert the file to safetensors (a plain state dict) first."
            ) from exc
    else:
        raise RewardLoadError(f"{path}: unknown weight format; expected .safetensors or one of {TORCH_SUFFIXES}")
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise RewardLoadError(f"{path}: expected a state dict, found {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def from_pretrained(loader: Any, name: str | os.PathLike, *, param: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(name, **kwargs)`` with hub failures turned into :class:`RewardLoadError`.

    ``trust_remote_code`` defaults to False. transformers reads safetensors when the repo has them.
    """
    kwargs.setdefault("trust_remote_code", False)
    path = local_path(name)
    if path is None and looks_like_path(str(name)):
        raise RewardLoadError(f"{param}={name}: no such file or directory")
    try:
        return loader.from_pretrained(str(path or name), **kwargs)
    except (OSError, ValueError) as exc:
        if path is not None:
            raise RewardLoadError(f"{param}={name}: could not load {getattr(loader, '__name__', loader)} ({exc})") from exc
        raise _hub_error(exc, str(name), param) from exc


def require_module(module: str, feature: str, extra: str | None = None) -> Any:
    """Import an optional heavy dependency lazily, with an install hint when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = extra or module
        raise ImportError(f"{feature} needs the '{package}' package: pip install {package}") from exc
