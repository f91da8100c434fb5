"""RLG and NPO guidance inside any diffusers pipeline (SD1.x/2.x, SDXL, SD3, FLUX), by hooking its denoiser.

Design: while `apply_guidance(pipe, guidance)` is active, the pipeline's denoiser (`pipe.unet` or
`pipe.transformer`) has its `forward` replaced by one that computes the guidance branches and returns the
combined prediction. Everything else (prompt encoding, SDXL micro-conditioning, latent packing, the
scheduler, its timestep/sigma conversion, the pipeline's own CFG) stays diffusers' code. Why this route:
a hand-written loop per family would re-implement four pipelines and could drift from them; a hook keeps
the guarantee that w = 0 gives *exactly* the base pipeline's images.

How each call is split. SD/SDXL/SD3 pipelines with CFG call the denoiser once per step on a batch
[uncond rows; cond rows] and then apply CFG themselves. FLUX calls it once per branch, announcing the
branch through `transformer.cache_context("cond" | "uncond")` (true CFG only; FLUX.1-dev normally runs
its guidance-embedded prediction alone).

  RLG  every row:   out = base(row) + w (aligned(row) - base(row)); the pipeline's CFG then gives
                    cfg(out_u, out_c) = rlg(cfg(base_u, base_c), cfg(aligned_u, aligned_c), w) -- CFG inside
                    each model first, as in the reference, because both rules are affine (equal up to float
                    rounding; tests check). FLUX: the two guidance-embedded predictions are combined.
  NPO  uncond rows come from the negative model, cond rows from the positive model; the pipeline's CFG
       then computes neg(x, empty) + s (pos(x, c) - neg(x, empty)). FLUX: needs true CFG
       (negative_prompt="" and true_cfg_scale = s).

A branch is either a separate network (`nn.Module`, e.g. a fully fine-tuned UNet) or the *name of a peft
LoRA adapter* of the pipeline's own denoiser ("__base__" = no adapter). By default each branch is one
forward (adapters switched off for the base, the ordinary LoRA forward for the active adapter). With
`batched=True`, adapter branches run in ONE forward over the concatenated rows with peft's per-sample
adapter selection (`adapter_names`, mixed-batch inference): fewer, larger calls, which pays off where a
call is latency-bound (GPU, small batch); on CPU it measured slower (2.38x vs 2.00x plain CFG CPU time,
scripts/bench_guidance.py speed) because every LoRA layer gathers and scatters its rows. RLG evaluates
four predictions per step, so it costs ~2x plain CFG when compute-bound; NPO costs ~1x.
Cheaper RLG: `shared_uncond=True` (3 evaluations, ~1.5x, an approximation) or `zero_init_steps` (the
aligned model alone, 2 evaluations, for the first steps; the reference's own option).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor, nn

from imgalign.guidance.combine import rlg

Branch = Union[nn.Module, str]  # noqa: UP007  a network, or an adapter name of the pipeline's denoiser
BASE = "__base__"  # peft's name for "no adapter" in mixed-batch inference
_UNBATCHED_ARGS = {"img_ids", "txt_ids"}  # FLUX position ids: [seq, 3], no batch dimension


@dataclass
class RLGuidance:
    """Reinforcement Learning Guidance: pred = pred_base + weight * (pred_aligned - pred_base)."""

    weight: float = 1.0
    aligned: Branch = "default"
    base: Branch = BASE
    zero_init_steps: int = 0  # use the aligned model alone for the first N sampler steps
    batched: bool = False  # adapter branches in one mixed-batch forward (measured slower on CPU, see below)
    shared_uncond: bool = False  # approximation, 3 instead of 4 evaluations: the base model's unconditional
    # prediction serves both models: pred = b_u + s (b_c - b_u) + w s (a_c - b_c)  (drops (1 - s) w (a_u - b_u));
    # w = 0 is still the base pipeline exactly, w = 1 is no longer the aligned pipeline


@dataclass
class NPOGuidance:
    """NPO guidance: the negative model computes the unconditional branch of CFG."""

    negative: Branch = "default"
    positive: Branch = BASE
    batched: bool = False


Guidance = Union[RLGuidance, NPOGuidance]  # noqa: UP007


def lora_adapter_names(net: nn.Module) -> set[str]:
    """Names of the peft LoRA adapters attached to `net`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: set[str] = set()
    for m in net.modules():
        if isinstance(m, BaseTunerLayer):
            names |= set(getattr(m, "lora_A", {}).keys())
    return names


@contextmanager
def adapter_rows(net: nn.Module, names: list[str]):
    """Per-row adapter selection for one forward: row i uses adapter `names[i]` ("__base__": none)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    def hook(module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in net.modules() if isinstance(m, BaseTunerLayer)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _take_rows(value, n: int, idx: Tensor, name: str = ""):
    """Select rows `idx` of every batch-first tensor (dim 0 == n) inside args; leave the rest as is."""
    if isinstance(value, Tensor):
        if name in _UNBATCHED_ARGS or value.dim() == 0 or value.shape[0] != n:
            return value
        return value[idx.to(value.device)]
    if isinstance(value, dict):
        return {k: _take_rows(v, n, idx, k) for k, v in value.items()}
    return value


class _GuidedForward:
    """The replacement `forward` of the pipeline's denoiser while guidance is active."""

    def __init__(self, pipe, net: nn.Module, guidance: Guidance):
        self.pipe, self.net, self.guidance = pipe, net, guidance
        self.orig_forward = net.forward  # bound method (or accelerate's hook-wrapped forward)
        self.signature = inspect.signature(self.orig_forward)
        self.branch_role: str | None = None  # FLUX: "cond" / "uncond" from cache_context
        self.step, self.last_t = -1, None
        self.forward_calls = 0
        adapters = lora_adapter_names(net)
        for b in self._branches():
            if isinstance(b, str) and b != BASE and b not in adapters:
                raise ValueError(f"guidance branch {b!r} is not a LoRA adapter of the pipeline's denoiser "
                                 f"(adapters: {sorted(adapters) or 'none'}); load one with "
                                 f"pipe.load_lora_weights(path, adapter_name={b!r}) or pass a network")
        self.has_lora = bool(adapters)
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.tuner_layers = [m for m in net.modules() if isinstance(m, BaseTunerLayer)]

    def _branches(self) -> list[Branch]:
        g = self.guidance
        return [g.base, g.aligned] if isinstance(g, RLGuidance) else [g.negative, g.positive]

    # -- which rows are unconditional -------------------------------------------------------------
    def _roles(self, n: int) -> list[str]:
        if self.branch_role is not None:  # FLUX true-CFG calls announce their branch
            return [self.branch_role] * n
        if getattr(self.pipe, "do_classifier_free_guidance", False):  # [uncond; cond] batch
            return ["uncond"] * (n // 2) + ["cond"] * (n - n // 2)
        return ["cond"] * n

    def _count_step(self, timestep) -> None:
        t = float(timestep.flatten()[0]) if isinstance(timestep, Tensor) else float(timestep)
        if self.last_t is not None and t > self.last_t:  # noise level went up: a new sampling run
            self.step = -1
        if t != self.last_t:
            self.step, self.last_t = self.step + 1, t

    # -- running branches --------------------------------------------------------------------------
    def _run(self, arguments: dict, n: int, requests: list[tuple[Branch, list[int]]]) -> list[Tensor]:
        """requests: (branch, rows) -> one prediction [len(rows), ...] per request, in order."""
        out: list[Tensor | None] = [None] * len(requests)
        # requests of the same branch always share one forward; different adapter branches share one only
        # when batched (mixed-adapter batch); separate networks always run on their own
        groups: dict = {}
        for i, (b, _) in enumerate(requests):
            key = ("adapters" if self.guidance.batched else b) if isinstance(b, str) else id(b)
            groups.setdefault(key, []).append(i)
        for group in groups.values():
            branch = requests[group[0]][0]
            rows = [r for i in group for r in requests[i][1]]
            if isinstance(branch, str):
                names = [requests[i][0] for i in group for _ in requests[i][1]]
                pred = self._forward(self.orig_forward, arguments, n, rows, names if self.has_lora else None)
            else:
                pred = self._forward(branch, arguments, n, rows, None)
            start = 0
            for i in group:
                k = len(requests[i][1])
                out[i], start = pred[start:start + k], start + k
        return out  # type: ignore[return-value]

    def _forward(self, fn, arguments: dict, n: int, rows: list[int], names: list[str] | None) -> Tensor:
        idx = torch.tensor(rows, dtype=torch.long)
        same = rows == list(range(n))
        args = dict(arguments) if same else {k: _take_rows(v, n, idx, k) for k, v in arguments.items()}
        args["return_dict"] = False
        self.forward_calls += 1
        if names is None:
            return fn(**args)[0]
        layers, unique = self.tuner_layers, set(names)
        was_disabled = [m.disable_adapters for m in layers]
        if unique == {BASE}:  # plain base forward: switch the adapters off (no per-row indexing)
            for m in layers:
                m._disable_adapters = True
            try:
                return fn(**args)[0]
            finally:
                for m, d in zip(layers, was_disabled):
                    m._disable_adapters = d
        if any(was_disabled):
            raise RuntimeError("the denoiser's LoRA adapters are disabled; call enable_adapters() before guidance")
        if len(unique) == 1 and list(layers[0].active_adapters) == names[:1]:
            return fn(**args)[0]  # the only active adapter: the ordinary LoRA forward
        with adapter_rows(self.net, names):
            return fn(**args)[0]

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        extra = arguments.pop(next((k for k, p in self.signature.parameters.items() if p.kind == p.VAR_KEYWORD), ""), {})
        arguments.update(extra)
        return_dict = arguments.get("return_dict", True)
        sample = next(iter(arguments.values()))  # first argument: sample / hidden_states [N, ...]
        n = sample.shape[0]
        self._count_step(arguments.get("timestep"))
        everything = list(range(n))
        g = self.guidance
        if isinstance(g, RLGuidance):
            if g.weight == 1 or self.step < g.zero_init_steps:
                (pred,) = self._run(arguments, n, [(g.aligned, everything)])
            elif g.weight == 0:
                (pred,) = self._run(arguments, n, [(g.base, everything)])
            elif g.shared_uncond and "uncond" in (roles := self._roles(n)):
                cond = [i for i, r in enumerate(roles) if r == "cond"]
                base, aligned_c = self._run(arguments, n, [(g.base, everything), (g.aligned, cond)])
                pred = base.clone()  # uncond rows: b_u; cond rows: b_c + w (a_c - b_c)
                rows = torch.tensor(cond, device=pred.device)
                pred[rows] = rlg(base[rows], aligned_c, g.weight)
            else:
                base, aligned = self._run(arguments, n, [(g.base, everything), (g.aligned, everything)])
                pred = rlg(base, aligned, g.weight)
        else:
            roles = self._roles(n)
            uncond = [i for i, r in enumerate(roles) if r == "uncond"]
            cond = [i for i, r in enumerate(roles) if r == "cond"]
            requests = [(g.negative, uncond)] if uncond else []
            requests += [(g.positive, cond)] if cond else []
            preds = self._run(arguments, n, requests)
            if len(preds) == 1:
                pred = preds[0]
            else:  # put rows back in the caller's order
                pred = torch.empty((n, *preds[0].shape[1:]), dtype=preds[0].dtype, device=preds[0].device)
                pred[torch.tensor(uncond, device=pred.device)] = preds[0]
                pred[torch.tensor(cond, device=pred.device)] = preds[1]
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=pred)
        return (pred,)


def denoiser_of(pipe) -> nn.Module:
    for name in ("unet", "transformer"):
        net = getattr(pipe, name, None)
        if net is not None:
            return net
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")


@contextmanager
def apply_guidance(pipe, guidance: Guidance):
    """Within this block every call of `pipe(...)` samples with RLG or NPO guidance.

    Yields the hook (its `forward_calls` counts network forwards, for benchmarks and tests).
    """
    net = denoiser_of(pipe)
    hook = _GuidedForward(pipe, net, guidance)
    orig_ctx = getattr(net, "cache_context", None)

    @contextmanager
    def cache_context(name, *a, **k):
        hook.branch_role = "uncond" if name == "uncond" else "cond"
        try:
            if orig_ctx is None:
                yield
            else:
                with orig_ctx(name, *a, **k):
                    yield
        finally:
            hook.branch_role = None

    had_forward = "forward" in net.__dict__
    old_forward = net.__dict__.get("forward")
    net.forward = hook
    if orig_ctx is not None:
        net.cache_context = cache_context
    try:
        yield hook
    finally:
        if had_forward:
            net.forward = old_forward
        else:
            del net.forward
        if orig_ctx is not None:
            del net.cache_context


def generate(pipe, guidance: Guidance | None = None, **pipe_kwargs):
    """`pipe(**pipe_kwargs)` with guidance (None: plain pipeline). Resets the step counter per call.

    FLUX + NPO: pass negative_prompt="" and true_cfg_scale=s so that FLUX runs an unconditional branch.
    """
    if guidance is None:
        return pipe(**pipe_kwargs)
    if isinstance(guidance, NPOGuidance) and type(pipe).__name__.startswith("Flux"):
        if pipe_kwargs.get("true_cfg_scale", 1.0) <= 1 or pipe_kwargs.get("negative_prompt") is None:
            raise ValueError("NPO guidance with FLUX needs true CFG: pass negative_prompt='' and true_cfg_scale > 1 "
                             "(FLUX.1-dev otherwise has no unconditional branch for the negative model)")
    with apply_guidance(pipe, guidance):
        return pipe(**pipe_kwargs)
