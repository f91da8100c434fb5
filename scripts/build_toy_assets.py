"""Build the toy world's model assets in ``assets/toy/``, deterministically, on a CPU.

Stages (in order; `--only` runs a subset, later stages load what earlier ones saved):

    clip      tiny CLIPModel trained contrastively on renders of the train prompts -> assets/toy/clip/
    vae       tiny AutoencoderKL (32 px -> 4x16x16) trained on renders          -> <work-dir>/vae/
    sd        StableDiffusionPipeline, UNet DDPM-trained through SDAdapter     -> assets/toy/sd/
    sd3       StableDiffusion3Pipeline, MMDiT flow-trained through SD3Adapter -> assets/toy/sd3/
    eval      both pipelines on assets/toy/prompts/test.txt with the toy evaluator
    subjects  DreamBench-layout toy subjects                                   -> assets/toy/subjects/

Usage:
    nice -n 19 .venv/bin/python scripts/build_toy_assets.py                      # everything
    nice -n 19 .venv/bin/python scripts/build_toy_assets.py --only sd3,eval --sd3-steps 1500
    nice -n 19 .venv/bin/python scripts/build_toy_assets.py --chain shipped   # how the shipped assets were built

The shipped sd / sd3 came from a phase chain (a first phase, then `--resume --<name>-phase2-steps 3000`
continuations); `--chain shipped` runs it (`shipped_chain`; `--dry-run` prints the commands). Batches are weighted by prompt kind
(`--kind-weights`). The shipped sd's last phase taught it the toy watermark: `--vae-decoder-only` and
`--vae-watermark-fraction` teach the VAE decoder to draw it, `--watermark-fraction` puts it on part of the sd
renders. Everything is seeded (`--seed`); with the same step counts, thread count and no
`--stage-minutes` cap hit, a rebuild gives the same weights on the same machine. One thread by default: on a shared 2-core
machine two OpenMP threads stall whenever another process takes a core (steps measured 10-20x slower).
sd / sd3 save an EMA of the trained weights. `assets/toy/manifest.json` records steps, seeds, losses,
sizes and the measured scores of every stage run.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from imgalign.toy import models as M  # noqa: E402

ASSETS = ROOT / "assets" / "toy"
STAGES = ("clip", "vae", "sd", "sd3", "eval", "subjects")


# ---- helpers -------------------------------------------------------------------------------------------


def _manifest_path() -> Path:
    return ASSETS / "manifest.json"


def read_manifest() -> dict:
    """manifest.json as a dict ({} when missing), read under a shared lock (a lane of ``--chain`` may be writing)."""
    path = _manifest_path()
    if not path.exists():
        return {}
    with open(path) as f:
        fcntl.flock(f, fcntl.LOCK_SH)
        text = f.read()
    return json.loads(text) if text.strip() else {}


def _edit_manifest(edit) -> None:
    """Read, edit and write manifest.json under an exclusive lock (the two lanes of ``--chain`` share it)."""
    path = _manifest_path()
    path.touch()
    with open(path, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        text = f.read()
        data = json.loads(text) if text.strip() else {}
        edit(data)
        f.seek(0)
        f.truncate()
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def update_manifest(key: str, value) -> None:
    def edit(data):
        data[key] = value
        data["total_size_mb"] = round(sum(M.file_size_mb(ASSETS / d) for d in ("clip", "sd", "sd3", "subjects")
                                          if (ASSETS / d).exists()), 2)

    _edit_manifest(edit)


def train_prompts() -> list[str]:
    from imgalign.toy.prompts import load_prompt_set

    return load_prompt_set("train")


def lr_lambda(steps: int, warmup: int):
    return lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def kind_row_weights(prompts: list[str], index: np.ndarray, spec: str) -> torch.Tensor | None:
    """Per-image sampling weights so that each prompt kind gets the batch share given by ``spec``
    ("single=0.3,count=0.25,pair=0.25,relation=0.2"; kinds left out get 0), or None for "uniform" (every
    image equally likely). The prompt sets hold few single-object prompts (144 exist), so uniform sampling
    shows the model almost no single objects."""
    from imgalign.toy.grammar import parse

    if spec.strip() == "uniform":
        return None
    shares = {k.strip(): float(v) for k, v in (item.split("=") for item in spec.split(",") if item.strip())}
    kinds = np.array([parse(p).kind for p in prompts])[index]
    unknown = set(shares) - set(kinds)
    if unknown:
        raise ValueError(f"--kind-weights names kinds {sorted(unknown)} that the train prompts do not have; "
                         f"kinds are {sorted(set(kinds))}")
    weights = np.zeros(len(index))
    for kind, share in shares.items():
        mask = kinds == kind
        weights[mask] = share / mask.sum()
    return torch.from_numpy(weights)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


# ---- stages --------------------------------------------------------------------------------------------


def stage_clip(args) -> None:
    from imgalign.toy.clip import retrieval_accuracy, save_toy_clip, train_clip
    from imgalign.toy.prompts import load_prompt_set

    seed_all(args.seed)
    model, info = train_clip(train_prompts(), steps=args.clip_steps, batch_size=args.clip_batch, seed=args.seed,
                             time_limit_s=_limit(args))
    held = load_prompt_set("validation")[:100]
    images, _ = M.render_dataset(held, 1, seed=args.seed + 99)
    acc = retrieval_accuracy(model, M.tokenizer(), images, held)
    print(f"clip retrieval on 100 held-out validation pairs: {acc}")
    save_toy_clip(model, ASSETS / "clip")
    update_manifest("clip", {**info, "seed": args.seed, "retrieval_100_validation": acc,
                             "size_mb": round(M.file_size_mb(ASSETS / "clip"), 2)})


def stage_vae(args) -> None:
    """Train the VAE from a seeded init, or with ``--vae-decoder-only`` fine-tune the decoder of ``--vae-from``
    with the encoder frozen: the latents of everything the denoisers learned stay where they were, and the
    decoder learns to draw what the old one could not (the toy watermark: the shipped decoder drew none of its
    band). The scaling factor is then kept, since the latent space is unchanged."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    seed_all(args.seed + 1)
    if args.vae_decoder_only:
        vae = AutoencoderKL.from_pretrained(args.vae_from, torch_dtype=torch.float32).train()
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    else:
        vae = M.build_vae(args.seed + 1).train()
    images, _ = M.render_dataset(train_prompts(), 4, seed=args.seed + 2, watermark_fraction=args.vae_watermark_fraction)
    pixels = M.to_pixels(images)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.vae_steps, 20))
    gen = torch.Generator().manual_seed(args.seed + 3)
    start, done, rec = time.time(), 0, float("nan")
    bar = tqdm(range(args.vae_steps), desc="vae")
    for step in bar:
        x = pixels[torch.randint(0, len(pixels), (args.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        out = vae.decode(z).sample
        rec_loss = (out - x).abs().mean() + (out - x).pow(2).mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec_loss + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        rec, done = float(rec_loss), step + 1
        bar.set_postfix(rec=f"{rec:.4f}", kl=f"{float(kl):.3f}")
        if _over(start, args):
            break
    vae.eval()
    with torch.no_grad():
        sample = pixels[:1024]
        post = vae.encode(sample).latent_dist
        mean, std = float(post.mean.mean()), float(post.mean.std())
        # reconstruction fidelity measured with the evaluator itself: renders that still score 1.0, and
        # renders given the watermark whose reconstruction the evaluator still flags as watermarked
        from imgalign.toy.evaluator import evaluate
        from imgalign.toy.render import add_watermark

        prompts = train_prompts()
        idx = np.arange(0, 1024, 8)  # render_dataset is prompt-major: image k shows prompt k // 4

        def reconstruct(x):
            out = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            return ((out + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

        ok = float(np.mean([evaluate(im, prompts[i // 4]).overall for im, i in zip(reconstruct(sample[idx]), idx)]))
        marked = M.to_pixels(add_watermark(images[idx]))
        kept = float(np.mean([evaluate(im, prompts[i // 4]).watermarked for im, i in zip(reconstruct(marked), idx)]))
    if not args.vae_decoder_only:
        vae.register_to_config(scaling_factor=round(1.0 / std, 4), shift_factor=None)
    out = Path(args.work_dir) / "vae"
    vae.save_pretrained(str(out), safe_serialization=True)
    print(f"vae: recon loss {rec:.4f}, latent mean {mean:.3f} std {std:.3f}, evaluator accuracy on recons {ok:.3f}, "
          f"watermark kept on {kept:.3f}")
    previous = read_manifest().get("vae") if args.vae_decoder_only else None
    update_manifest("vae", {"earlier_phase": previous, "steps": done, "batch_size": args.vae_batch,
                            "seed": args.seed + 1, "final_recon_loss": rec, "lr": args.vae_lr, "decoder_only": args.vae_decoder_only,
                            "from": args.vae_from if args.vae_decoder_only else None,
                            "watermark_fraction": args.vae_watermark_fraction,
                            "latent_mean": mean, "latent_std": std, "scaling_factor": vae.config.scaling_factor,
                            "evaluator_overall_on_reconstructions": ok,
                            "watermark_detected_on_reconstructions": kept,
                            "seconds": round(time.time() - start, 1)})


def _load_clip_and_vae(args):
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(str(ASSETS / "clip"), dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(str(Path(args.work_dir) / "vae"), torch_dtype=torch.float32).eval()
    return clip, vae


def _limit(args):
    return args.stage_minutes * 60 if args.stage_minutes else None


def _over(start, args) -> bool:
    return bool(args.stage_minutes) and time.time() - start > args.stage_minutes * 60


class RepeatedTokenJointAttn:
    """SD3 joint attention in which the last context token stands for ``copies`` identical tokens.

    Without T5 the SD3 pipeline appends `max_sequence_length` zero T5 tokens. They enter as the context
    embedder's bias and get the same adaLN modulation, so they stay identical through every block: k copies act
    in attention exactly like one token whose attention logit is raised by log k (the same key and value k times
    in the softmax). Training with one zero token and this bias costs what a 33-token context costs instead of
    up to 288 tokens; `tests/unit/test_build_toy_assets.py` checks it against real copies. Training only: the
    saved model keeps diffusers' processor and sees real zero tokens."""

    def __init__(self, copies: torch.Tensor):
        self.copies = copies  # [B] float: how many zero tokens the last context token stands for

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n_img = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(b, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        bias[:, 0, 0, -1] = self.copies.to(q).log()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * out.shape[-1])
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](img)), ctx


def use_repeated_token_attention(transformer, copies: torch.Tensor) -> RepeatedTokenJointAttn:
    """Route every joint attention of an SD3 transformer through one `RepeatedTokenJointAttn`, returned so that each
    batch sets its copy counts (`proc.copies = ...`)."""
    proc = RepeatedTokenJointAttn(copies)
    for block in transformer.transformer_blocks:
        block.attn.set_processor(proc)
    return proc


def _train_denoiser(name: str, pipe, args, steps: int, batch: int, lr: float, seed: int, extra_zero_tokens=None):
    """Train the pipeline's denoiser through its family adapter; returns the info dict."""
    from tqdm.auto import tqdm

    from imgalign.models.adapters import load_adapter

    work = Path(args.work_dir) / f"{name}_init"
    pipe.save_pretrained(str(work), safe_serialization=True)
    adapter_kw = ({"max_sequence_length": 1, "drop_t5": True, "timestep_sampling": args.sd3_timestep_sampling}
                  if extra_zero_tokens else {})
    adapter = load_adapter(str(work), **adapter_kw)
    seed_all(seed)
    prompts = train_prompts()
    watermark_fraction = args.watermark_fraction
    images, index = M.render_dataset(prompts, args.renders_per_prompt, seed=seed + 1,
                                     watermark_fraction=watermark_fraction)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        latents = torch.cat([adapter.encode_images(M.to_pixels(images[i:i + 256]), generator=gen)
                             for i in range(0, len(images), 256)])
        conds = [adapter.encode_prompts(prompts[i:i + 256]) for i in range(0, len(prompts), 256)]
        cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
        uncond = adapter.encode_prompts([""])
    if extra_zero_tokens:  # SD3 without T5: keep the CLIP tokens, the T5 zeros are added per batch below
        n_clip = M.TEXT_MAX_LENGTH
        cond["encoder_hidden_states"] = cond["encoder_hidden_states"][:, :n_clip]
        uncond["encoder_hidden_states"] = uncond["encoder_hidden_states"][:, :n_clip]
    row_weights = kind_row_weights(prompts, index, args.kind_weights)
    index = torch.from_numpy(index)
    model = adapter.denoiser
    model.train().requires_grad_(True)
    # The saved weights are an exponential moving average of the trained ones (with a warmup of the decay),
    # which matters a lot for short training runs.
    ema = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, max(1, steps // 20)))
    if extra_zero_tokens:
        repeated = use_repeated_token_attention(model, torch.ones(batch))
    start, done, ema_loss = time.time(), 0, None
    bar = tqdm(range(steps), desc=name)
    for step in bar:
        rows = (torch.randint(0, len(latents), (batch,), generator=gen) if row_weights is None
                else torch.multinomial(row_weights, batch, replacement=True, generator=gen))
        x0 = latents[rows]
        drop = torch.rand(batch, generator=gen) < args.prompt_dropout
        c = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), uncond[k].expand_as(v[index[rows]]), v[index[rows]])
             for k, v in cond.items()}
        if extra_zero_tokens:  # one zero token per row standing for k of them (see RepeatedTokenJointAttn)
            copies = torch.tensor(extra_zero_tokens, dtype=torch.float32)[
                torch.randint(0, len(extra_zero_tokens), (batch,), generator=gen)]
            ehs = c["encoder_hidden_states"]
            c["encoder_hidden_states"] = torch.cat([ehs, ehs.new_zeros(batch, 1, ehs.shape[-1])], dim=1)
            repeated.copies = copies
        t = adapter.sample_timesteps(batch, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        noisy, target = adapter.noise_and_target(x0, noise, t)
        pred = adapter.predict(model, noisy, t, c)
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, list(model.parameters()), 1 - min(args.ema_decay, (1 + step) / (10 + step)))
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        done = step + 1
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        if _over(start, args):
            print(f"{name}: stage time limit reached after {done} steps")
            break
    model.eval().requires_grad_(False)
    if extra_zero_tokens:
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        model.set_attn_processor(JointAttnProcessor2_0())
    with torch.no_grad():
        for p, e in zip(model.parameters(), ema):
            p.copy_(e)
    out = ASSETS / name
    M.save_pipeline(adapter.pipe, out)
    return {"steps": done, "batch_size": batch, "lr": lr, "seed": seed, "prompt_dropout": args.prompt_dropout,
            "kind_weights": args.kind_weights, "watermark_fraction": watermark_fraction,
            "ema_decay": args.ema_decay, "prediction_type": adapter.prediction_type,
            "final_loss_ema": ema_loss, "seconds": round(time.time() - start, 1), "storage_dtype": "float16",
            "train_images": len(latents), "size_mb": round(M.file_size_mb(out), 2),
            **({"architecture": {k: model.config[k] for k in ("num_layers", "num_attention_heads",
                                                               "attention_head_dim", "patch_size")},
                "shift": adapter.shift, "timestep_sampling": adapter.timestep_sampling,
                "zero_tokens": list(extra_zero_tokens),
                "text_identity_layers": args.sd3_text_identity_layers} if extra_zero_tokens else {})}


def _denoiser_stage(name: str, args) -> None:
    """Phase 1: train from a seeded init; phase 2 (``--<name>-phase2-steps``): continue from the saved
    fp16 weights at half the learning rate with a fresh warmup + cosine schedule. ``--resume`` runs
    phase 2 only, starting from the shipped ``assets/toy/<name>``."""
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    steps, batch, lr = (getattr(args, f"{name}_{k}") for k in ("steps", "batch", "lr"))
    phase2 = getattr(args, f"{name}_phase2_steps")
    seed = args.seed + (10 if name == "sd" else 20)
    # SD3 without T5: the pipeline appends `max_sequence_length` zero tokens (adapter default 128, pipeline
    # default 256); train with varying counts so the model ignores them.
    extra = ({"extra_zero_tokens": tuple(int(k) for k in args.sd3_zero_tokens.split(","))} if name == "sd3"
             else {})

    def build(denoiser=None):
        clip, vae = _load_clip_and_vae(args)
        if name == "sd":
            return M.build_sd_pipeline(clip, vae, unet=denoiser, seed=seed)
        vae.register_to_config(shift_factor=0.0)  # SD3's decode adds shift_factor; ours is centred
        return M.build_sd3_pipeline(clip, vae, transformer=denoiser, seed=seed, shift=args.sd3_shift,
                                    width=args.sd3_width, layers=args.sd3_layers, patch=args.sd3_patch,
                                    text_identity_layers=args.sd3_text_identity_layers)

    previous = read_manifest().get(name)
    if not args.resume:
        info = _train_denoiser(name, build(), args, steps, batch, lr, seed, **extra)
        update_manifest(name, info)
        previous = info
    if phase2:
        cls, sub = (UNet2DConditionModel, "unet") if name == "sd" else (SD3Transformer2DModel, "transformer")
        denoiser = cls.from_pretrained(str(ASSETS / name), subfolder=sub, torch_dtype=torch.float32)
        info = _train_denoiser(name, build(denoiser), args, phase2, batch, lr / 2, seed + 100, **extra)
        info["phase1"] = previous.get("phase1", previous) if previous and "phase1" in previous else previous
        if previous and "phase1" in previous:  # a resume of a resume: keep the whole history
            info["earlier_phases"] = previous
        info["total_steps"] = (previous or {}).get("total_steps", (previous or {}).get("steps", 0)) + info["steps"]
        update_manifest(name, info)


def stage_sd(args) -> None:
    _denoiser_stage("sd", args)


def stage_sd3(args) -> None:
    _denoiser_stage("sd3", args)


def evaluate_pipeline(path: Path, prompts: list[str], steps: int, cfg: float, seed: int, batch: int = 50,
                      **call_kw) -> dict:
    from imgalign.models.adapters import load_adapter
    from imgalign.toy.evaluator import ToyScore, evaluate
    from imgalign.toy.grammar import parse

    pipe = load_adapter(str(path), drop_t5=True).pipe
    scores = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gen = torch.Generator().manual_seed(seed + i)
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=cfg, generator=gen, output_type="np",
                   height=M.IMAGE_SIZE, width=M.IMAGE_SIZE, **call_kw).images
        scores += [evaluate(im, p) for im, p in zip(out, chunk)]
    summary = {"n": len(prompts), "overall": float(np.mean([s.overall for s in scores])),
               "score": float(np.mean([s.score for s in scores])),
               "preference": float(np.mean([s.preference for s in scores])),  # the toy rater (see the evaluator)
               "watermark": float(np.mean([s.watermark for s in scores])),  # mean band coverage
               "watermarked": float(np.mean([s.watermarked for s in scores]))}
    for name in (*ToyScore.CRITERIA, "taste"):
        vals = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        summary[name] = float(np.mean(vals)) if vals else None
    kinds = [parse(p).kind for p in prompts]
    summary["overall_by_kind"] = {k: float(np.mean([s.overall for s, kk in zip(scores, kinds) if kk == k]))
                                  for k in sorted(set(kinds))}
    summary["score_by_kind"] = {k: float(np.mean([s.score for s, kk in zip(scores, kinds) if kk == k]))
                                for k in sorted(set(kinds))}
    return summary


def stage_eval(args) -> None:
    """Score the models of --eval-models into the manifest's eval_test; the other models' entries stay (the chain
    evaluates sd and sd3 on different lanes)."""
    from imgalign.toy.prompts import load_prompt_set

    prompts = load_prompt_set("test")
    results = {"command": "scripts/build_toy_assets.py --only eval", "prompts": "assets/toy/prompts/test.txt",
               "images_per_prompt": 1, "num_inference_steps": args.eval_steps, "guidance_scale": args.eval_cfg,
               "seed": args.seed}
    for name in args.eval_models:
        if (ASSETS / name).exists():
            t0 = time.time()
            results[name] = evaluate_pipeline(ASSETS / name, prompts, args.eval_steps, args.eval_cfg, args.seed)
            results[name]["seconds"] = round(time.time() - t0, 1)
            print(name, json.dumps(results[name], indent=1))
    _edit_manifest(lambda data: data.setdefault("eval_test", {}).update(results))


def stage_subjects(args) -> None:
    from imgalign.toy.subjects import build_subjects

    out = build_subjects(ASSETS / "subjects", seed=args.seed)
    update_manifest("subjects", {"path": "assets/toy/subjects/dataset", "seed": args.seed,
                                 "size_mb": round(M.file_size_mb(out), 3)})


# ---- the shipped chain ---------------------------------------------------------------------------------


def shipped_chain(work_dir: str, assets: str) -> dict[str, list[tuple[str, str | None, list[str]]]]:
    """How the shipped assets were built (assets/toy/README.md), as two lanes of this script's own commands, one
    per core: lane -> [(step, the step it waits for or None, arguments)]. The watermark phase (the VAE decoder,
    then sd's phase 4) uses its own work dir, so the first VAE stays the one sd and sd3 were trained with."""
    wm = f"{work_dir}_watermark"
    work = ["--work-dir", work_dir]
    sd_phase = ["--only", "sd", "--resume", "--sd-phase2-steps", "3000", *work]
    sd3_phase = ["--only", "sd3", "--resume", "--sd3-phase2-steps", "3000", *work]
    sd3_long = ["--only", "sd3", "--resume", "--sd3-timestep-sampling", "uniform", "--watermark-fraction", "0.3",
                "--sd3-phase2-steps"]
    sd3_text = ["--sd3-text-identity-layers", "1"]
    return {
        "a": [("clip", None, ["--only", "clip", *work]),
              ("sd_1", "vae", ["--only", "sd", "--kind-weights", "uniform", "--sd-steps", "2000", *work]),
              ("sd_2", None, sd_phase), ("sd_3", None, sd_phase),
              ("sd_4_watermark", "vae_watermark", ["--only", "sd", "--resume", "--sd-phase2-steps", "800",
                                                   "--watermark-fraction", "0.4", "--work-dir", wm]),
              ("eval_sd", None, ["--only", "eval", "--eval-models", "sd", *work])],
        "b": [("vae", None, ["--only", "vae", *work]),
              ("sd3_1", "clip", ["--only", "sd3", "--kind-weights", "uniform", "--sd3-steps", "2800", *work]),
              ("sd3_2", None, sd3_phase), ("sd3_3", None, sd3_phase), ("sd3_4", None, sd3_phase),
              # sd3/vae holds the first VAE in fp16, byte for byte the sd/vae that phase 4's decoder started from
              ("vae_watermark", None, ["--only", "vae", "--vae-decoder-only", "--vae-from",
                                       str(Path(assets) / "sd3" / "vae"), "--vae-watermark-fraction", "0.5",
                                       "--vae-steps", "400", "--vae-lr", "3e-4", "--work-dir", wm]),
              # sd3's phases 5-6 (2026-12-07): one zero T5 token standing for k (3.7x cheaper steps), uniform
              # timesteps, the watermark decoder and 30 % watermarked renders; phase 6 on fresh renders (seed 1)
              ("sd3_5_watermark", None, [*sd3_long, "15000", "--work-dir", wm]),
              ("sd3_6_watermark", None, [*sd3_long, "12000", "--seed", "1", "--work-dir", wm]),
              # phases 7-8: SD3 conditioned on the last CLIP layer (an identity layer appended to the towers), then
              # batches weighted towards pair and relation prompts; each on fresh renders
              ("sd3_7_text_layer", None, [*sd3_long, "12000", "--seed", "2", *sd3_text, "--work-dir", wm]),
              ("sd3_8_pairs", None, [*sd3_long, "12000", "--seed", "3", *sd3_text, "--kind-weights",
                                     "single=0.2,count=0.2,pair=0.35,relation=0.25", "--work-dir", wm]),
              ("eval_sd3", None, ["--only", "eval", "--eval-models", "sd3", *work]),
              ("subjects", None, ["--only", "subjects", *work])],
    }


def run_chain(args) -> None:
    """Run `shipped_chain`; each step logs to <work-dir>/logs. Each lane evaluates its own model once its last
    phase is done (lane b also builds the subjects: lane a, sd's phases, is the longer one)."""
    lanes = shipped_chain(args.work_dir, args.assets)
    common = ["--assets", args.assets, "--threads", str(args.threads)]
    if args.dry_run:
        for lane, steps in lanes.items():
            for step, after, argv in steps:
                wait = f"  (after {after})" if after else ""
                print(f"lane {lane}: {step:<15} python scripts/build_toy_assets.py {' '.join(common + argv)}{wait}")
        return
    logs = Path(args.work_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    done = {step: threading.Event() for steps in lanes.values() for step, _, _ in steps}
    failed: list[str] = []
    t0 = time.time()

    def lane(steps):
        for step, after, argv in steps:
            if after:
                done[after].wait()
            if failed:
                return
            print(f"[{time.time() - t0:6.0f} s] start {step}", flush=True)
            with open(logs / f"{step}.log", "w") as log:
                code = subprocess.call([sys.executable, __file__, *common, *argv], stdout=log, stderr=subprocess.STDOUT)
            if code:
                failed.append(f"{step} (exit {code}; see {logs / step}.log)")
                for event in done.values():  # release the other lane's waits so it stops too
                    event.set()
                return
            print(f"[{time.time() - t0:6.0f} s] done  {step}", flush=True)
            done[step].set()

    threads = [threading.Thread(target=lane, args=(steps,)) for steps in lanes.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failed:
        sys.exit(f"build failed: {', '.join(failed)}")
    print(f"shipped chain built in {(time.time() - t0) / 60:.1f} min")


# ---- main ----------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    global ASSETS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default="/tmp/imgalign_toy_build", help="intermediate files (VAE, inits)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--stage-minutes", type=float, default=0.0,
                   help="wall-time cap per training stage (0 = none; hitting it makes the build time-dependent)")
    p.add_argument("--clip-steps", type=int, default=1500)
    p.add_argument("--clip-batch", type=int, default=96)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--vae-watermark-fraction", type=float, default=0.0,
                   help="share of the VAE's training renders that carry the toy watermark (0: the shipped VAE)")
    p.add_argument("--vae-decoder-only", action="store_true",
                   help="fine-tune the decoder of --vae-from (encoder frozen, scaling factor kept) instead of a new VAE")
    p.add_argument("--vae-from", default=str(ASSETS / "sd" / "vae"), help="the VAE that --vae-decoder-only starts from")
    p.add_argument("--watermark-fraction", type=float, default=0.0,
                   help="sd/sd3: share of the training renders that carry the toy watermark, drawn independently of "
                        "the prompt (needs a VAE decoder that draws the band, see --vae-decoder-only)")
    p.add_argument("--renders-per-prompt", type=int, default=8)
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--kind-weights", default="single=0.3,count=0.25,pair=0.25,relation=0.2",
                   help="sd/sd3: share of each prompt kind in a training batch, or 'uniform'")
    p.add_argument("--assets", default=str(ASSETS), help="where the assets are read and written")
    p.add_argument("--ema-decay", type=float, default=0.998, help="EMA of the sd/sd3 weights (what is saved)")
    p.add_argument("--sd-steps", type=int, default=2000)
    p.add_argument("--sd-batch", type=int, default=32)
    p.add_argument("--sd-lr", type=float, default=1e-3)
    p.add_argument("--sd3-steps", type=int, default=2800)
    p.add_argument("--sd3-batch", type=int, default=32)
    p.add_argument("--sd3-lr", type=float, default=1e-3)
    p.add_argument("--sd3-width", type=int, default=64, help="sd3: transformer width (heads of 32 channels)")
    p.add_argument("--sd3-layers", type=int, default=4, help="sd3: joint transformer blocks")
    p.add_argument("--sd3-patch", type=int, default=2, help="sd3: latent patch size")
    p.add_argument("--sd3-shift", type=float, default=1.5, help="sd3: the scheduler's timestep shift (training and sampling)")
    p.add_argument("--sd3-timestep-sampling", choices=["logit_normal", "uniform"], default="logit_normal",
                   help="sd3: training sigmas before the shift")
    p.add_argument("--sd3-zero-tokens", default="1,128,256",
                   help="sd3: counts of zero T5 tokens to train with (drawn per row; the pipeline appends "
                        "max_sequence_length of them)")
    p.add_argument("--sd3-text-identity-layers", type=int, default=0,
                   help="sd3: identity layers appended to the CLIP towers, so that the pipeline's hidden_states[-2] "
                        "is the last trained layer (1) instead of the first of the toy CLIP's two (0)")
    p.add_argument("--sd-phase2-steps", type=int, default=0)
    p.add_argument("--sd3-phase2-steps", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="sd/sd3: run phase 2 only, from assets/toy/<name>")
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--eval-cfg", type=float, default=5.0)
    p.add_argument("--eval-models", nargs="+", choices=["sd", "sd3"], default=["sd", "sd3"], help="eval: which models")
    p.add_argument("--chain", choices=["shipped"], help="run the phase chain that built the shipped assets, two "
                   "lanes (one per core); the stage options above keep their defaults in it")
    p.add_argument("--dry-run", action="store_true", help="with --chain: print its commands only")
    args = p.parse_args(argv)
    ASSETS = Path(args.assets)
    if args.chain:
        return run_chain(args)
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(stages) - set(STAGES)
    if unknown:
        p.error(f"unknown stages {sorted(unknown)}; choose from {','.join(STAGES)}")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    ASSETS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    timings = {}
    for stage in STAGES:
        if stage in stages:
            print(f"=== stage {stage}", flush=True)
            s0 = time.time()
            globals()[f"stage_{stage}"](args)
            timings[stage] = round(time.time() - s0, 1)
    def edit(data):
        data.setdefault("stage_seconds", {}).update(timings)
        data["torch"] = torch.__version__

    _edit_manifest(edit)
    print(f"done in {time.time() - t0:.0f} s: {timings}")


if __name__ == "__main__":
    main()
