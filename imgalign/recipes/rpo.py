"""RPO: subject-driven generation by preference learning with the lambda-Harmonic reward (Miao et al., NeurIPS 2024,
arXiv 2407.12164; reference code andrew-miao/RPO), on any family.

Before training, once: the frozen base model draws `rpo.num_negatives` images for each of the novel training
prompts ("a sks dog on the Moon"), saved with their rewards in `<output_dir>/negatives/` (or `rpo.negatives_dir`)
and reused by every later or resumed run with the same settings. Each reward is R_lambda with `rpo.label_lambda`
(RPO: 0, text alignment only) of the image against that novel prompt, the identifier removed.

One micro-step, read top to bottom:
  1. B pairs; pair b draws from its own generator a reference image j of the subject, a negative i, and a label
     l ~ Bernoulli(sigma(R(ref_j, c_i) - R(gen_i, c_i))) (Bradley-Terry, drawn anew each time; l = 1: the reference
     image is preferred), both rewards against the negative's prompt c_i
  2. the reference image is conditioned on the instance prompt ("a photo of sks dog"), the negative on c_i; each
     image gets its OWN timestep and noise (RPO's code; Diffusion-DPO shares them)
  3. one trainable forward over the 2B images, one no-grad reference forward (LoRA: adapter off; full: a frozen copy)
  4. loss = sim_weight * err_theta[ref] + the core's sigmoid DPO on the implicit rewards, its side picked by l
     (imgalign.losses.rpo_loss; beta in the toolkit's convention: beta = 2 x RPO's, whose SD script ignores it)

Model selection: every `validation.every` steps (and at the start and the end) the training prompts are sampled at a
fixed seed, scored with R_lambda at `validation.lambda_val` (0.5 as RPO's headline) against the subject's images,
and the weights are saved to `best/` whenever that mean rises; the grid's first row shows the subject's references.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch

from imgalign.config import MISSING, ConfigError, cfg_field
from imgalign.data.errors import DataError
from imgalign.losses import rpo_loss
from imgalign.recipes.common import (
    LoraConfig,
    ModelConfig,
    denoising_errors,
    load_model,
    load_weights,
    make_trainable,
    read_generated_record,
    reference_errors,
    save_weights,
    validation_images,
)
from imgalign.train.loop import Run, lora_layout
from imgalign.train.seeding import derive_seed, global_positions, randn_per_sample, sample_generators
from imgalign.train.setup import OptimConfig, RunConfig, captioned_grid, count_params

# RPO's novel training prompts, 8 for objects and 8 for live subjects, written after the list in andrew-miao/RPO
# utils.py (training_prompts): Van Gogh, the Moon, green, the Great Wall, a wooden roof, the Statue of Liberty, a
# volcano, a subway platform; live subjects: a green outfit and swimming in a pool instead of the roof and volcano.
# None is among DreamBench's 25 evaluation prompts. {0} = identifier, {1} = class.
OBJECT_PROMPTS = (
    "a painting of a {0} {1} in the style of Van Gogh",
    "a {0} {1} on the Moon",
    "a green {0} {1}",
    "a {0} {1} on the Great Wall of China",
    "a {0} {1} on a wooden roof",
    "a {0} {1} in front of the Statue of Liberty",
    "a {0} {1} in front of a volcano",
    "a {0} {1} on a subway platform",
)
LIVE_PROMPTS = (
    "a {0} {1} in a green outfit",
    "a painting of a {0} {1} in the style of Van Gogh",
    "a {0} {1} on the Great Wall of China",
    "a {0} {1} swimming in a pool",
    "a {0} {1} on a subway platform",
    "a {0} {1} in front of the Statue of Liberty",
    "a {0} {1} on the Moon",
    "a green {0} {1}",
)


@dataclass
class DataConfig:
    subject_dir: str = cfg_field(MISSING, "folder of the subject's reference images (DreamBench layout: "
                                 "dataset/<subject>/*.jpg)", exists="dir")
    class_token: str | None = cfg_field(None, "the subject's class noun, e.g. dog (null: read from "
                                        "prompts_and_classes.txt beside the subject folder)")
    identifier: str = cfg_field("sks", "the subject's identifier token, {0} in prompts (DreamBooth: sks; RPO: [V])")
    instance_prompt: str = cfg_field("a photo of {0} {1}", "prompt of the reference images ({0} identifier, {1} "
                                     "class; RPO: 'a photo of [V] dog')")
    train_prompts: list[str] | None = cfg_field(None, "novel prompts of the negatives and of validation ({0} {1} as "
                                                "above; null: RPO's 8 object prompts, or its 8 live-subject prompts "
                                                "for dogs and cats). Keep them disjoint from the evaluation prompts")
    resolution: int = cfg_field(512, "training and negative-sample resolution R", ge=8)
    random_crop: bool = cfg_field(True, "random R x R crop of the references (RPO: random crop)")
    hflip: bool = cfg_field(False, "random horizontal flip of the references")


@dataclass
class RPOLossConfig:
    objective: Literal["rpo", "reconstruction"] = cfg_field("rpo", "rpo: reconstruction + preference against the "
                                                            "negatives; reconstruction: the DreamBooth-style baseline, "
                                                            "the subject's denoising loss alone (no negatives in the "
                                                            "loss, no reference forward)")
    beta: float = cfg_field(2.0, "preference temperature in the toolkit's convention, log sigma((beta/2) Delta); "
                            "RPO's code writes log sigma(beta_rpo Delta), so beta = 2 beta_rpo. Its SD script parses "
                            "beta_rpo = 1 and ignores it (effectively 1, our 2); its SDXL script applies it", gt=0)
    sim_weight: float = cfg_field(1.0, "weight of the reconstruction loss on the reference images (RPO: 1)", ge=0)
    label_lambda: float = cfg_field(0.0, "lambda of R_lambda for the preference labels (RPO: 0, text alignment "
                                    "only)", ge=0, le=1)
    num_negatives: int = cfg_field(4, "base-model images per training prompt (paper: 4; released code: 16)", ge=1)
    negatives_steps: int = cfg_field(50, "sampler steps of the negatives", ge=1)
    negatives_guidance: float = cfg_field(7.5, "CFG scale of the negatives")
    negatives_seed: int = cfg_field(0, "seed of the negatives (one generator per image)")
    negatives_dir: str | None = cfg_field(None, "where the negatives are cached (null: <run.output_dir>/negatives); "
                                          "runs with the same settings share it")


@dataclass
class RewardConfig:
    model: str = cfg_field("kakaobrain/align-base", "dual encoder of R_lambda: hub id or folder (RPO: ALIGN base); "
                           "any CLIP-like model, e.g. openai/clip-vit-base-patch16, an open_clip name, the toy CLIP")
    pretrained: str | None = cfg_field(None, "open_clip pretrained tag (open_clip models only)")
    backend: str = cfg_field("auto", "auto | transformers | open_clip")
    batch_size: int = cfg_field(16, "images per encoder batch", ge=1)


@dataclass
class ValidationConfig:
    enabled: bool = cfg_field(True, "validate and keep the best weights in best/ (false: no validation, no best/)")
    every: int = cfg_field(40, "validate every N optimizer steps (RPO: 40; 0: only at the start and the end)", ge=0)
    lambda_val: float = cfg_field(0.5, "lambda of R_lambda for model selection (RPO: 0.3 / 0.5 / 0.7; larger "
                                  "favours subject fidelity over text alignment)", ge=0, le=1)
    images_per_prompt: int = cfg_field(4, "images per training prompt (RPO: 4)", ge=1)
    seed: int = cfg_field(1234, "fixed seed, so every validation samples the same noise")
    num_inference_steps: int = cfg_field(50, "sampler steps", ge=1)
    guidance_scale: float = cfg_field(7.5, "CFG scale")
    resolution: int | None = cfg_field(None, "image size (null: data.resolution)", ge=8)


@dataclass
class RPOConfig:
    model: ModelConfig = cfg_field(ModelConfig, "which pipeline to personalise")
    lora: LoraConfig = cfg_field(LoraConfig, "LoRA (reference = adapter disabled) or full fine-tuning")
    data: DataConfig = cfg_field(DataConfig, "the subject, its prompts")
    rpo: RPOLossConfig = cfg_field(RPOLossConfig, "the loss, the labels and the negatives")
    reward: RewardConfig = cfg_field(RewardConfig, "the backbone of the lambda-Harmonic reward")
    optim: OptimConfig = cfg_field(OptimConfig, "optimizer and learning-rate schedule (RPO SD2.1: lr 5e-6 constant)")
    run: RunConfig = cfg_field(RunConfig, "steps, batch, precision, checkpoints, logging")
    validation: ValidationConfig = cfg_field(ValidationConfig, "model selection by the validation reward")


Config = RPOConfig


# ------------------------------------------------------------------------------------------------
# The subject
# ------------------------------------------------------------------------------------------------
@dataclass
class Subject:
    name: str
    class_token: str
    images: list  # PIL RGB
    paths: list[Path]
    instance_prompt: str
    train_prompts: list[str]


def load_subject(cfg: DataConfig) -> Subject:
    """The subject's images, class and prompts; errors name the folder or file and the fix."""
    from imgalign.data.images import read_image
    from imgalign.eval.dreambench import IMAGE_SUFFIXES, LIVE_CLASSES, reference_images

    folder = Path(cfg.subject_dir)
    paths = list(reference_images(folder))  # the images DreamBench scores against: train on the same set
    if not paths:
        raise DataError(f"data.subject_dir={folder}: no images ({', '.join(IMAGE_SUFFIXES)}); give the folder of one "
                        "subject, e.g. dataset/dog")
    images = [read_image(p, where=str(p)) for p in paths]
    class_token = cfg.class_token or _class_from_table(folder)
    templates = cfg.train_prompts or list(LIVE_PROMPTS if class_token in LIVE_CLASSES else OBJECT_PROMPTS)
    fill = lambda t: t.format(cfg.identifier, class_token)  # noqa: E731
    for key, texts in (("data.instance_prompt", [cfg.instance_prompt]), ("data.train_prompts", templates)):
        for t in texts:
            if "{0}" not in t:
                raise ConfigError(f"{key}: {t!r} has no {{0}} (the identifier); write e.g. 'a photo of {{0}} {{1}}'")
    return Subject(folder.name, class_token, images, paths, fill(cfg.instance_prompt), [fill(t) for t in templates])


def _class_from_table(folder: Path) -> str:
    from imgalign.eval.dreambench import PROMPTS_FILE, parse_prompts_and_classes

    table = folder.parent / PROMPTS_FILE
    if not table.is_file():
        raise ConfigError(f"data.class_token is not set and {table} does not exist; set data.class_token (e.g. dog)")
    classes = parse_prompts_and_classes(table).classes
    if folder.name not in classes:
        raise ConfigError(f"data.class_token is not set and {table} has no row for subject {folder.name!r}; set "
                          "data.class_token")
    return classes[folder.name]


# ------------------------------------------------------------------------------------------------
# Negatives: the frozen base model's images for the training prompts, generated once
# ------------------------------------------------------------------------------------------------
class Negatives:
    """`num_negatives` images per training prompt in a folder (`{prompt:02d}_{k:02d}.png`) with `negatives.json`:
    the settings that made them, each image's prompt, seed and label reward, and the references' label rewards per
    prompt. Missing images are generated (a killed generation continues); existing ones are never redone."""

    FILE = "negatives.json"

    def __init__(self, folder: Path, settings: dict):
        self.folder, self.settings = Path(folder), settings
        self.generated = 0
        self.items: list[dict] = []  # prompt index, prompt, file, seed, reward
        self.ref_rewards: list[list[float]] = []  # [reference j][prompt p]

    def _record(self) -> dict:
        return read_generated_record(self.folder / self.FILE, self.settings, "these negatives",
                                     "set rpo.negatives_dir to another folder")

    def prepare(self, pipe, reward, progress: bool = True) -> None:
        """Main process: generate what is missing, score with the label reward when the reward changed, write."""
        from tqdm.auto import tqdm

        from imgalign.data.images import save_image_whole

        s = self.settings
        self.folder.mkdir(parents=True, exist_ok=True)
        record = self._record()
        prompts, n = s["prompts"], s["num_negatives"]
        todo = [(p, k) for p in range(len(prompts)) for k in range(n)
                if not (self.folder / f"{p:02d}_{k:02d}.png").is_file()]
        pipe.set_progress_bar_config(disable=True)
        for p in tqdm(sorted({p for p, _ in todo}), desc="rpo negatives", disable=not progress or not todo):
            ks = [k for q, k in todo if q == p]
            gens = [torch.Generator("cpu").manual_seed(derive_seed(s["seed"], "rpo-negative", p, k)) for k in ks]
            images = pipe(prompt=[prompts[p]] * len(ks), generator=gens, num_inference_steps=s["steps"],
                          guidance_scale=s["guidance"], height=s["resolution"], width=s["resolution"]).images
            for k, image in zip(ks, images):
                save_image_whole(image, self.folder / f"{p:02d}_{k:02d}.png")
            self.generated += len(ks)
        items = [{"prompt_index": p, "prompt": prompts[p], "file": f"{p:02d}_{k:02d}.png",
                  "seed": derive_seed(s["seed"], "rpo-negative", p, k)} for p in range(len(prompts)) for k in range(n)]
        rewards = record.get("rewards", {})
        if rewards.get("reward") != reward.identity or len(rewards.get("negatives", [])) != len(items):
            rewards = {"reward": reward.identity, **self._score(items, reward)}
        (self.folder / self.FILE).write_text(json.dumps({"settings": s, "items": items, "rewards": rewards}, indent=1)
                                             + "\n", encoding="utf-8")

    def _score(self, items: list[dict], reward) -> dict:
        from imgalign.data.images import read_image

        images = [read_image(self.folder / it["file"]) for it in items]
        negatives = reward.label_scores(images, [it["prompt"] for it in items])
        refs = [reward.label_scores(reward.subject.images, [p] * len(reward.subject.images))
                for p in reward.prompts]  # [prompt][reference]
        return {"negatives": negatives, "references": [list(col) for col in zip(*refs)]}

    def load(self) -> None:
        record = self._record()
        if not record:
            raise DataError(f"{self.folder / self.FILE} is missing: the negatives were not prepared")
        self.items = [{**it, "reward": r} for it, r in zip(record["items"], record["rewards"]["negatives"])]
        self.ref_rewards = record["rewards"]["references"]

    def preference(self) -> torch.Tensor:
        """[references, negatives]: P(reference j preferred over negative i) = sigma(R(ref_j, c_i) - R(gen_i, c_i))."""
        ref = torch.tensor(self.ref_rewards, dtype=torch.float64)  # [J, prompts]
        idx = torch.tensor([it["prompt_index"] for it in self.items])
        gen = torch.tensor([it["reward"] for it in self.items], dtype=torch.float64)
        return torch.sigmoid(ref[:, idx] - gen[None]).float()


class LabelReward:
    """The lambda-Harmonic reward on the subject's references (main process only): label scores at
    `rpo.label_lambda`, validation parts at `validation.lambda_val`."""

    def __init__(self, cfg: RewardConfig, subject: Subject, identifier: str, label_lambda: float, device):
        from imgalign.rewards.harmonic import LambdaHarmonic

        self.reward = LambdaHarmonic(cfg.model, cfg.pretrained, lam=label_lambda, references=subject.images,
                                     remove_tokens=[identifier], backend=cfg.backend, device=device,
                                     batch_size=cfg.batch_size)
        self.subject, self.prompts = subject, subject.train_prompts
        self.identity = {"model": cfg.model, "pretrained": cfg.pretrained, "lambda": label_lambda,
                         "references": [p.name for p in subject.paths]}

    def label_scores(self, images, prompts: list[str]) -> list[float]:
        return self.reward.score(images, prompts).tolist()


# ------------------------------------------------------------------------------------------------
# Model selection
# ------------------------------------------------------------------------------------------------
class BestWeights:
    """The best mean validation reward so far and its step; saved in every checkpoint, so a resumed run keeps
    comparing against it. `best/` holds the weights (LoRA or the denoiser) and best.json."""

    FILE = "best.json"

    def __init__(self, folder: Path):
        self.folder = folder
        self.value, self.step = -math.inf, None

    def update(self, step: int, value: float) -> bool:
        if value > self.value:
            self.value, self.step = value, step
            return True
        return False

    def save(self, checkpoint: Path) -> None:
        (Path(checkpoint) / "rpo_best.json").write_text(json.dumps({"value": self.value, "step": self.step}) + "\n")

    def load(self, checkpoint: Path) -> None:
        state = json.loads((Path(checkpoint) / "rpo_best.json").read_text())
        self.value, self.step = state["value"], state["step"]


def make_validator(accelerator, adapter, cfg: ValidationConfig, subject: Subject, reward: LabelReward | None,
                   resolution: int, out_dir: Path, best: BestWeights, save_best):
    """-> validate(step): sample the training prompts, score R_lambda_val, write the grid (references first), keep
    the best weights. Main process only; other ranks return {}."""
    if not cfg.enabled:
        return None
    size = cfg.resolution or resolution
    sampling = SimpleNamespace(prompts=subject.train_prompts, prompts_file=None, images_per_prompt=cfg.images_per_prompt,
                               resolution=size, seed=cfg.seed, num_inference_steps=cfg.num_inference_steps,
                               guidance_scale=cfg.guidance_scale)

    def validate(step: int) -> dict[str, float]:
        if not accelerator.is_main_process:
            return {}
        images, prompts = validation_images(adapter, sampling, size)  # [N, 3, H, W] in [0, 1]
        parts = reward.reward.parts(images, prompts, lam=cfg.lambda_val)
        mean = float(parts["reward"].mean())
        improved = best.update(step, mean)
        if improved:
            save_best(out_dir / "best")
            (out_dir / "best" / BestWeights.FILE).write_text(json.dumps(
                {"step": step, "reward": mean, "lambda_val": cfg.lambda_val, "prompts": subject.train_prompts},
                indent=1) + "\n", encoding="utf-8")
        _write_grid(images, prompts, parts["reward"], subject, cfg.images_per_prompt, out_dir, step, mean, improved)
        logs = {"val/reward": mean, "val/best_reward": best.value, "val/s_image": float(parts["s_image"].mean()),
                "val/s_text": float(parts["s_text"].mean())}
        accelerator.log(logs, step=step)
        return logs

    return validate


def _write_grid(images, prompts, scores, subject: Subject, k: int, out_dir: Path, step: int, mean: float,
                improved: bool) -> None:
    """validation/step-N.png: the subject's references in the first row, then one row per prompt, R under each."""
    import torchvision.transforms.functional as TF

    size = images.shape[-1]
    refs = [TF.resize(TF.pil_to_tensor(im).float() / 255, [size, size], antialias=True) for im in subject.images[:k]]
    refs += [torch.ones(3, size, size)] * (k - len(refs))  # blank tiles when the subject has fewer than k images
    grid = torch.cat([torch.stack(refs), images.cpu()])
    captions = [None] * k + [f"R={float(s):.3f}" for s in scores]
    title = f"RPO validation, step {step}: mean R={mean:.4f}{' (best so far)' if improved else ''}"
    (out_dir / "validation").mkdir(parents=True, exist_ok=True)
    captioned_grid(grid * 2 - 1, row_labels=[f"{subject.name} references"] + prompts[::k], tile_captions=captions,
                   title=title).save(out_dir / "validation" / f"step-{step:06d}.png")


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------
def train(cfg: RPOConfig) -> dict:
    run, d, r = cfg.run, cfg.data, cfg.rpo
    subject = load_subject(d)
    book = Run(cfg, "rpo")
    accelerator, dtype = book.accelerator, book.dtype
    adapter = load_model(cfg.model, accelerator.device, dtype)

    # ---- negatives from the frozen base model, once (main process), then read by every process --------------
    neg_dir = Path(r.negatives_dir) if r.negatives_dir else book.out_dir / "negatives"
    negatives = Negatives(neg_dir, {"model": cfg.model.pretrained, "prompts": subject.train_prompts,
                                    "num_negatives": r.num_negatives, "steps": r.negatives_steps,
                                    "guidance": r.negatives_guidance, "seed": r.negatives_seed,
                                    "resolution": d.resolution})
    reward = None
    if accelerator.is_main_process:
        reward = LabelReward(cfg.reward, subject, d.identifier, r.label_lambda, accelerator.device)
        negatives.prepare(adapter.pipe, reward, progress=run.progress)
    accelerator.wait_for_everyone()
    negatives.load()
    prefer = negatives.preference()  # [J, N]
    from imgalign.data.images import read_image

    neg_images = [read_image(neg_dir / it["file"]) for it in negatives.items]

    reference = make_trainable(adapter, cfg.lora, run.gradient_checkpointing, dtype, reference=r.objective == "rpo")
    use_lora = cfg.lora.enabled
    from imgalign.data.unpaired import ImageTransform

    transform = ImageTransform(d.resolution, random_crop=d.random_crop, hflip=d.hflip, seed=run.seed)
    model, optimizer, scheduler = book.prepare(adapter.denoiser, cfg.optim, lora_layout(cfg.lora),
                                               lambda m, p: save_weights(adapter, m, p, use_lora),
                                               lambda m, p: load_weights(adapter, m, p, use_lora))
    best = BestWeights(book.out_dir / "best")
    book.add_state("best", best.save, best.load)
    book.resume()
    rank, world = accelerator.process_index, accelerator.num_processes

    trainable, total = count_params(adapter.denoiser)
    book.banner("imgalign rpo", {
        "model": f"{cfg.model.pretrained} ({adapter.family}, {adapter.prediction_type})",
        "trainable": f"{trainable:,} of {total:,} params ({f'LoRA r={cfg.lora.rank}' if use_lora else 'full'})",
        "reference": "same network, adapter disabled" if use_lora else "frozen copy",
        "subject": f"{subject.name} ({subject.class_token}), {len(subject.images)} images, '{subject.instance_prompt}'",
        "negatives": f"{len(negatives.items)} = {len(subject.train_prompts)} prompts x {r.num_negatives} in {neg_dir} "
                     f"({negatives.generated} generated now)",
        "labels": f"Bradley-Terry on R_lambda, lambda={r.label_lambda:g}; P(reference preferred) mean "
                  f"{float(prefer.mean()):.3f}",
        "loss": f"{r.sim_weight:g} x reconstruction + sigmoid preference, beta={r.beta:g} (= RPO's {r.beta / 2:g})"
                if r.objective == "rpo" else "reconstruction only (the DreamBooth-style baseline)",
        "selection": f"R_lambda={cfg.validation.lambda_val:g} every {cfg.validation.every} steps -> best/"
                     if cfg.validation.enabled else "off",
        "effective batch": f"{run.batch_size} pairs x {run.grad_accum} accum x {world} procs"
                           f" = {run.batch_size * run.grad_accum * world} pairs/step",
    })
    book.start(make_validator(accelerator, adapter, cfg.validation, subject, reward, d.resolution, book.out_dir, best,
                              lambda folder: save_weights(adapter, accelerator.unwrap_model(model), folder, use_lora)),
               cfg.validation.every)

    step, micro = book.start_step, book.start_step * run.grad_accum
    model.train()
    while step < run.max_steps:
        positions = global_positions(rank, world, micro % run.grad_accum, run.batch_size)
        gens = sample_generators(run.seed, "rpo", micro // run.grad_accum, positions)
        batch = draw_pairs(gens, prefer, subject, negatives.items, neg_images, transform, step, positions)
        done = book.micro_step(model, _step, adapter, model, reference, batch, gens, cfg, accelerator)
        micro += 1
        if not done:
            continue
        step += 1
        logs = book.end_step(step, book.step_metrics(),
                             {"micro_step": micro})
        book.bar.set_postfix(loss=f"{logs['train/loss']:.4f}", label=f"{logs['train/label']:.2f}")
    return book.finish(step, {"micro_step": micro}, lambda m: save_weights(adapter, m, book.out_dir, use_lora))


def draw_pairs(gens, prefer: torch.Tensor, subject: Subject, items: list[dict], neg_images: list, transform, step: int,
               positions: list[int]) -> dict:
    """Pair b draws from gens[b], in this order: the reference image j, the negative i, the label's uniform u
    (l = u < P[j, i]). Both images then go through the transform (crop / flip keyed by step and position)."""
    refs, negs, labels, probs = [], [], [], []
    for g in gens:
        j = int(torch.randint(0, prefer.shape[0], (1,), generator=g))
        i = int(torch.randint(0, prefer.shape[1], (1,), generator=g))
        p = float(prefer[j, i])
        labels.append(float(torch.rand(1, generator=g)) < p)
        refs.append(j), negs.append(i), probs.append(p)
    ref_t = [transform({"image": subject.images[j], "caption": subject.instance_prompt, "label": 1.0}, index=q,
                       epoch=step) for j, q in zip(refs, positions)]
    neg_t = [transform({"image": neg_images[i], "caption": items[i]["prompt"], "label": 0.0}, index=q, epoch=step)
             for i, q in zip(negs, positions)]
    both = ref_t + neg_t
    return {"pixels": torch.stack([x["pixels"] for x in both]), "captions": [x["caption"] for x in both],
            "original_sizes": torch.tensor([x["original_size"] for x in both]),
            "crops_top_left": torch.tensor([x["crop_top_left"] for x in both]),
            "labels": torch.tensor(labels, dtype=torch.float32), "probs": torch.tensor(probs)}


def _step(adapter, model, reference, batch, gens, cfg: RPOConfig, accelerator):
    """B pairs -> (mean loss, metrics). After draw_pairs' draws, pair b draws from gens[b]: the VAE samples of its
    reference and its negative, the reference's noise, the negative's noise, the reference's t, the negative's t."""
    b = len(gens)
    dev = accelerator.device
    pixels = batch["pixels"]
    if cfg.rpo.objective == "reconstruction":  # the DreamBooth-style baseline: the reference images only
        latents = adapter.encode_images(pixels[:b], generator=gens)
        noise = randn_per_sample(latents.shape[1:], gens).to(dev)
        t = torch.cat([adapter.sample_timesteps(1, generator=g) for g in gens])
        noisy, target = adapter.noise_and_target(latents, noise, t)
        cond = adapter.encode_prompts(batch["captions"][:b], original_sizes=batch["original_sizes"][:b],
                                      crops_top_left=batch["crops_top_left"][:b], target_size=pixels.shape[-2:])
        with accelerator.autocast():
            err = denoising_errors(adapter.predict(model, noisy, t, cond), target)
        return err.mean(), {"loss": err.mean().detach(), "sim_loss": err.mean().detach(), "label": batch["labels"].mean()}
    latents = adapter.encode_images(pixels, generator=gens * 2)  # [2B, C, h, w]: references, then negatives
    noise = torch.cat([randn_per_sample(latents.shape[1:], gens), randn_per_sample(latents.shape[1:], gens)]).to(dev)
    t = torch.cat([adapter.sample_timesteps(1, generator=g) for g in gens] +
                  [adapter.sample_timesteps(1, generator=g) for g in gens])  # its own t per image (RPO)
    noisy, target = adapter.noise_and_target(latents, noise, t)
    cond = adapter.encode_prompts(batch["captions"], original_sizes=batch["original_sizes"],
                                  crops_top_left=batch["crops_top_left"], target_size=pixels.shape[-2:])
    with accelerator.autocast():
        pred = adapter.predict(model, noisy, t, cond)
    err = denoising_errors(pred, target)  # [2B]
    ref_err = reference_errors(adapter, model, reference, noisy, t, cond, target, accelerator)
    labels = batch["labels"].to(dev)
    out = rpo_loss(err[:b], ref_err[:b], err[b:], ref_err[b:], labels, cfg.rpo.beta, cfg.rpo.sim_weight)
    margin = out.chosen_rewards - out.rejected_rewards  # (beta/2) Delta
    agree = torch.where(labels > 0.5, margin > 0, margin < 0).float()
    m = {
        "loss": out.losses.mean().detach(),
        "sim_loss": err[:b].mean().detach(),
        "pref_loss": (out.losses - cfg.rpo.sim_weight * err[:b]).mean().detach(),
        "label": labels.mean(), "label_prob": batch["probs"].mean(),
        "margin": margin.mean(), "accuracy": agree.mean(),
        "err_ref_image": err[:b].mean().detach(), "err_negative": err[b:].mean().detach(),
        "ref_err_ref_image": ref_err[:b].mean(), "ref_err_negative": ref_err[b:].mean(),
    }
    return out.losses.mean(), m
