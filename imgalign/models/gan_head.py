"""The GAN branch of DMD2 / Flash-DMD on a denoiser's bottleneck: a forward hook that captures the bottleneck features
and stops the forward there, and the classification head of DMD2 (tianweiy/DMD2) on them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from imgalign.config import ConfigError


class _StopForward(Exception):
    pass


class BottleneckFeatures:
    """Features of the fake network's bottleneck through a forward hook; the forward stops there (DMD2 runs only the
    encoder and mid block). UNet: the mid-block output [B, C, h, w]. SD3/FLUX transformers (no mid block): the image
    tokens after the middle block of the whole stack (FLUX: dual- then single-stream blocks), [B, L, D] laid out on
    their sqrt(L) x sqrt(L) grid as [B, D, s, s]; a choice of ours, DMD2 has only UNets. A transformer stops at the
    start of the next block, outside the middle block's gradient-checkpointing region (stopping inside it would break
    its recomputation in the backward pass)."""

    def __init__(self, net: nn.Module):
        net = getattr(net, "module", net)
        self._unet = getattr(net, "mid_block", None) is not None
        if self._unet:
            block, stop = net.mid_block, None
        else:
            blocks = list(getattr(net, "transformer_blocks", [])) + list(getattr(net, "single_transformer_blocks", []))
            if not blocks:
                raise ConfigError(f"the GAN head needs a mid block or transformer blocks; {type(net).__name__} has "
                                  "neither: set dmd.gan_weight=0")
            i = (len(blocks) - 1) // 2
            block, stop = blocks[i], blocks[i + 1] if i + 1 < len(blocks) else None
        self._armed, self._value = False, None
        block.register_forward_hook(self._capture)
        if stop is not None:
            stop.register_forward_pre_hook(self._stop)

    def _capture(self, module, args, output):
        if self._armed and self._value is None:  # unarmed (other forwards, recomputation): a plain pass-through
            self._value = output if isinstance(output, Tensor) else output[1]  # blocks return (text, image) tokens
            if self._unet:  # the UNet's mid block is never inside a checkpointed region
                raise _StopForward

    def _stop(self, module, args):
        if self._armed and self._value is not None:
            raise _StopForward

    def __call__(self, forward) -> Tensor:
        self._armed, self._value = True, None
        try:
            forward()  # a transformer whose middle block is its last one runs to the end
        except _StopForward:
            pass
        finally:
            self._armed = False
        value, self._value = self._value, None
        if value is None:
            raise RuntimeError("the bottleneck hook did not fire")
        if value.dim() == 3:  # tokens [B, L, D] -> [B, D, s, s]
            b, n, dim = value.shape
            s = math.isqrt(n)
            if s * s != n:
                raise ConfigError(f"GAN head: {n} image tokens are not a square grid; train at a square resolution")
            value = value.transpose(1, 2).reshape(b, dim, s, s)
        return value


class GANHead(nn.Module):
    """DMD2's classification branch: [Conv4x4 stride 2, GroupNorm, SiLU] until the map is at most 4 x 4, a conv over
    the whole remaining map (DMD2: 4x4 stride 4), GroupNorm, SiLU, Conv1x1 -> one logit per sample [B, 1]."""

    def __init__(self, channels: int, size: int, width: int | None = None):
        super().__init__()
        width = width or channels
        # GroupNorm as DMD2's GroupNorm(32, C), with at least 4 channels per group: at 1 x 1 a group of one channel
        # would normalise every logit to the same value
        groups = max(g for g in range(1, 33) if width % g == 0 and width // g >= 4) if width >= 4 else 1
        layers, c, s = [], channels, size
        while s > 4:
            layers += [nn.Conv2d(c, width, 4, 2, 1), nn.GroupNorm(groups, width), nn.SiLU()]
            c, s = width, (s - 2) // 2 + 1
        layers += [nn.Conv2d(c, width, s, s), nn.GroupNorm(groups, width), nn.SiLU(), nn.Conv2d(width, 1, 1)]
        self.net = nn.Sequential(*layers)
        self.shape = (channels, size, size)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features.float()).flatten(1)


class PixelDiscriminator(nn.Module):
    """A pixel-space discriminator: trainable heads on the hidden states of a frozen image encoder (Flash-DMD's
    "Pixel-GAN" with SAM's image encoder; ADD, arXiv 2311.17042, uses DINOv2 with heads on several of its layers).

    Images in [-1, 1] are resized to the encoder's input size and normalised by its image processor's mean and std;
    each chosen hidden state ([B, N, C] tokens, or SAM's [B, H, W, C] map) goes through its head, LayerNorm ->
    Linear(C, width) -> LeakyReLU(0.2) -> Linear(width, 1) per token, averaged over tokens; the logit [B, 1] is the
    mean over layers. ASSUMPTIONS (Flash-DMD's discriminator is not public): these token heads, no text conditioning,
    four evenly spaced layers by default. Only the heads are parameters of this module (what the critic trains and
    saves); the encoder is held outside the module tree, frozen."""

    def __init__(self, source: str, layers: list[int] | None = None, width: int = 256, device=None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(source)
        encoder = AutoModel.from_pretrained(source, dtype=torch.float32)
        for attr in ("vision_model", "vision_encoder"):  # CLIPModel / SamModel -> their image towers
            encoder = getattr(encoder, attr, encoder)
        vision = getattr(config, "vision_config", config)
        self.size = int(vision.image_size)
        mean, std = self._normalisation(source)
        encoder = encoder.eval().requires_grad_(False).to(device)
        with torch.no_grad():
            states = self._states(encoder, torch.zeros(1, 3, self.size, self.size, device=device))
        n = len(states) - 1  # hidden_states[0]: the embeddings
        self.layers = list(layers) if layers else sorted({math.ceil(n * (i + 1) / 4) for i in range(4)})
        bad = [i for i in self.layers if not -n <= i <= n or i == 0]
        if bad:
            raise ConfigError(f"dmd.pixel_layers {bad}: {source} has hidden states 1..{n} (or -{n}..-1)")
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(states[i].shape[-1]), nn.Linear(states[i].shape[-1], width),
                                                 nn.LeakyReLU(0.2), nn.Linear(width, 1)) for i in self.layers).to(device)
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1), persistent=False)
        self._encoder = (encoder,)  # a tuple: not a submodule, so not trained, saved or moved with the heads
        self.shape = f"{type(encoder).__name__} layers {self.layers} of {n}, {self.size} px"

    @staticmethod
    def _normalisation(source: str) -> tuple[list[float], list[float]]:
        try:
            from transformers import AutoImageProcessor

            proc = AutoImageProcessor.from_pretrained(source)
            return list(proc.image_mean), list(proc.image_std)
        except (OSError, ValueError, AttributeError, TypeError):
            return [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # no processor: [-1, 1] as is

    @staticmethod
    def _states(encoder, pixels: Tensor) -> tuple[Tensor, ...]:
        return encoder(pixel_values=pixels, output_hidden_states=True).hidden_states

    def forward(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> logits [B, 1]."""
        x = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True,
                          align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        states = self._states(self._encoder[0], x)
        logits = []
        for i, head in zip(self.layers, self.heads):
            h = states[i].float()
            h = h.flatten(1, 2) if h.dim() == 4 else h  # SAM: [B, H, W, C] -> tokens
            logits.append(head(h).mean(dim=1))
        return sum(logits) / len(logits)
