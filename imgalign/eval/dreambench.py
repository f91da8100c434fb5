"""DreamBench: subject fidelity (DINO, CLIP-I) and prompt fidelity (CLIP-T) of subject-driven generation.

    imgalign eval dreambench --data dreambooth/dataset --model stabilityai/stable-diffusion-2-1 \\
        --lora-dir runs/rpo --token "[V]" --out runs/dreambench

The protocol of DreamBooth (Ruiz et al., CVPR 2023, section 4.1, dataset google/dreambooth), with the metric code
of RPO (Miao et al., NeurIPS 2024, andrew-miao/RPO ``evaluation_metrics.py``):

1. Dataset: ``dataset/<subject>/*.jpg`` (4-6 photos per subject) and ``prompts_and_classes.txt``: a
   ``subject_name,class`` table under "Classes", then two lists of 25 templates
   ``'a {0} {1} in the jungle'.format(unique_token, class_token)`` under "Object Prompts" and "Live Subject
   Prompts". :func:`parse_prompts_and_classes` reads the file as text (never executes it). A subject is live when
   its class is in ``live_classes`` (dog, cat: the 9 live subjects of the README); a file with only object
   prompts (the toy subjects) gives every subject those. The identifier is ``sks`` (DreamBooth) or e.g. ``[V]``
   (RPO).
2. Images: 4 per prompt, ``<images>/<subject>/<prompt_index:02d>_<k>.png``, each from its own seed
   (:func:`image_seed`, a hash of the seed, subject, prompt and k, so any subset can be redone). :func:`generate_images`
   keeps the files that exist (a killed run resumes) and writes ``prompts.json`` (the prompt of every index and the
   generation settings); a folder generated elsewhere under these names is scored the same way.
3. Metrics, all cosines of L2-normalised embeddings: DINO between the DINO ViT-S/16 [CLS] tokens of a generated
   image and each reference; CLIP-I the same with CLIP image embeddings; CLIP-T between the CLIP embedding of the
   prompt with the identifier removed ("a dog in the jungle", as RPO's ``remove_unique_token`` and DisenBooth)
   and the image's. CLIP-T is the raw cosine by default; ``clip_t="clamped"`` gives max(cos, 0), which is
   torchmetrics' ``clip_score`` / 100, what RPO reports. Averages: over the (reference, generated) pairs of a
   prompt, then over prompts, then over subjects.
4. Cost: every reference and generated image is embedded once per backbone and every prompt's text once; the
   cosines are matrix products (:func:`prompt_means`).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import os
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgalign.errors import UserError

IMAGES_PER_PROMPT = 4
DEFAULT_TOKEN = "sks"
LIVE_CLASSES = ("dog", "cat")
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch16"
PROMPTS_FILE = "prompts_and_classes.txt"
RECORD_FILE = "prompts.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METRICS = ("dino", "clip_i", "clip_t")
CLIP_T_CONVENTIONS = ("raw", "clamped")


class DreamBenchError(UserError):
    """A bad DreamBench folder, prompts file, image folder or run setting."""


# ---------------------------------------------------------------------------------------------------------
# prompts_and_classes.txt
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptsAndClasses:
    """What ``prompts_and_classes.txt`` holds. Templates are canonical: ``{0}`` the identifier, ``{1}`` the class."""

    path: str
    classes: dict[str, str]  # subject -> class, in file order
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]  # empty when the file has no "Live Subject Prompts" list


_TEMPLATE = re.compile(r"""(?P<literal>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\s*\.format\((?P<args>[^)]*)\)""")
_CLASS_ROW = re.compile(r"^\s*(?P<subject>[\w.\-]+)\s*,\s*(?P<cls>[^,]+?)\s*$")


def _heading(line: str) -> str | None:
    """The section a heading line starts ("classes", "object", "live", "prompts"), or None for other lines."""
    key = line.strip().lower().rstrip(":")
    if key == "classes":
        return "classes"
    if key.endswith("prompts") and "live" in key:
        return "live"
    if key.endswith("prompts") and "object" in key:
        return "object"
    return "prompts" if key == "prompts" else None


def _canonical_template(literal: str, args: str, where: str) -> str:
    """``'a {0} {1} x'`` with format arguments ``unique_token, class_token`` (in either order, positional or ``{}``)
    -> the template with ``{0}`` = identifier and ``{1}`` = class. Only plain positional fields are accepted."""
    import ast

    names = [a.strip() for a in args.split(",") if a.strip()]
    if sorted(names) != ["class_token", "unique_token"]:
        raise DreamBenchError(f"{where}: .format({args}) must take unique_token and class_token")
    text = ast.literal_eval(literal)  # a string literal only: nothing in the file is executed
    out, auto = [], 0
    try:
        fields = list(string.Formatter().parse(text))
    except ValueError as e:
        raise DreamBenchError(f"{where}: the template {text!r} has unbalanced braces ({e})") from None
    for prefix, field, spec, conversion in fields:
        out.append(prefix.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if field == "":
            index, auto = auto, auto + 1
        elif field in ("0", "1"):
            index = int(field)
        else:
            index = -1
        if index not in (0, 1) or spec or conversion:
            raise DreamBenchError(f"{where}: the template {text!r} has the field {{{field}}}; only {{0}} and {{1}} "
                                  "(or {}) are allowed")
        out.append("{0}" if names[index] == "unique_token" else "{1}")
    template = "".join(out)
    if "{0}" not in template:
        raise DreamBenchError(f"{where}: the template {text!r} does not place the unique token")
    return template


def parse_prompts_and_classes(path: str | os.PathLike) -> PromptsAndClasses:
    """Read DreamBench's ``prompts_and_classes.txt``: the ``subject_name,class`` rows after "Classes" and the
    ``'...'.format(unique_token, class_token)`` templates after "Object Prompts" / "Live Subject Prompts"
    (headings matched case-insensitively, CRLF or LF, either quote style). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DreamBenchError(f"{path} does not exist; a DreamBench folder holds {PROMPTS_FILE} (the class table "
                              "and the prompt templates) and one folder of reference photos per subject: pass "
                              "--data DIR with the dataset/ folder of the google/dreambooth repository")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DreamBenchError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from None
    section, classes, templates = None, {}, {"object": [], "live": []}
    for number, line in enumerate(lines, 1):
        where = f"{path}, line {number}"
        heading = _heading(line)
        if heading is not None:
            section = heading
            continue
        if section == "classes":
            row = _CLASS_ROW.match(line)
            if row is None or (row["subject"], row["cls"]) == ("subject_name", "class"):
                continue
            if row["subject"] in classes:
                raise DreamBenchError(f"{where}: subject {row['subject']!r} is listed twice in the class table")
            classes[row["subject"]] = row["cls"]
        elif section in templates:
            for match in _TEMPLATE.finditer(line):
                templates[section].append(_canonical_template(match["literal"], match["args"], where))
    if not classes:
        raise DreamBenchError(f"{path}: no `subject_name,class` rows under a 'Classes' heading; the file starts "
                              "with 'Classes', then one `subject,class` line per subject")
    if not templates["object"]:
        raise DreamBenchError(f"{path}: no prompt templates under an 'Object Prompts' heading; each is a line "
                              "'a {0} {1} in the jungle'.format(unique_token, class_token),")
    return PromptsAndClasses(str(path), classes, tuple(templates["object"]), tuple(templates["live"]))


# ---------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------


def render(template: str, token: str, class_name: str) -> str:
    """A prompt from a canonical template; an empty token gives the prompt without the identifier (CLIP-T's text)."""
    return " ".join(template.format(token, class_name).split())


@dataclass(frozen=True)
class Subject:
    name: str
    class_name: str
    live: bool
    references: tuple[Path, ...]
    templates: tuple[str, ...]

    @property
    def kind(self) -> str:
        return "live" if self.live else "object"


@dataclass(frozen=True)
class DreamBench:
    root: Path
    subjects: tuple[Subject, ...]
    token: str = DEFAULT_TOKEN

    def prompts(self, subject: Subject) -> list[str]:
        """The generation prompts, e.g. ``a sks dog in the jungle``."""
        return [render(t, self.token, subject.class_name) for t in subject.templates]

    def text_prompts(self, subject: Subject) -> list[str]:
        """CLIP-T's prompts: the identifier removed, e.g. ``a dog in the jungle``."""
        return [render(t, "", subject.class_name) for t in subject.templates]


def reference_images(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir()
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")))


def check_image(path: Path) -> None:
    """Decode an image cheaply (JPEGs at 1/8 scale, which still reads the whole stream): a truncated or corrupt file
    fails here, before anything slow starts."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise DreamBenchError(f"{path}: cannot read the image ({type(e).__name__}: {e}); replace the file or "
                              "delete it") from None


def _select(available: Sequence[str], subjects: Sequence[str] | None, prompts_file: Path) -> list[str]:
    if not subjects:
        return list(available)
    unknown = [s for s in subjects if s not in available]
    if unknown:
        hints = {s: difflib.get_close_matches(s, available, n=1) for s in unknown}
        said = ", ".join(f"{s!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for s, h in hints.items())
        raise DreamBenchError(f"--subjects: {said} not in the class table of {prompts_file}; it lists "
                              f"{', '.join(available)}")
    return list(dict.fromkeys(subjects))


def load_dreambench(root: str | os.PathLike, *, token: str = DEFAULT_TOKEN, subjects: Sequence[str] | None = None,
                    live_classes: Sequence[str] = LIVE_CLASSES, limit_prompts: int | None = None,
                    check_images: bool = True) -> DreamBench:
    """Read a DreamBench-layout folder (``root`` or ``root/dataset``) and check it before anything slow starts.

    ``subjects`` picks subjects of the class table (default: all of them); a chosen subject without a folder, a
    folder without images and (with ``check_images``) an image that does not decode are errors naming the path and
    the fix. ``limit_prompts`` keeps the first N prompts of each subject (smoke runs)."""
    root = Path(root)
    if not (root / PROMPTS_FILE).is_file() and (root / "dataset" / PROMPTS_FILE).is_file():
        root = root / "dataset"  # the repository root of google/dreambooth
    if not root.is_dir():
        raise DreamBenchError(f"DreamBench folder {root} does not exist; pass --data DIR with the dataset/ folder of "
                              "the google/dreambooth repository (or a folder in its layout)")
    if not token.strip():
        raise DreamBenchError("--token must not be empty (DreamBooth uses sks, RPO [V])")
    if limit_prompts is not None and limit_prompts < 1:
        raise DreamBenchError(f"--limit-prompts must be at least 1, got {limit_prompts}")
    spec = parse_prompts_and_classes(root / PROMPTS_FILE)
    names = _select(list(spec.classes), subjects, Path(spec.path))
    absent = [n for n in names if not (root / n).is_dir()]
    if absent:
        present = [n for n in names if (root / n).is_dir()]
        fix = (f"pass --subjects {','.join(present)} to evaluate the {len(present)} present ones, or "
               if present else "")
        raise DreamBenchError(f"{len(absent)} subject(s) of the class table in {spec.path} have no folder in {root}: "
                              f"{', '.join(absent)} (e.g. {root / absent[0]} does not exist); {fix}put their "
                              f"reference photos in {root}/<subject>/ (the full dataset is the google/dreambooth "
                              "repository)")
    chosen = []
    for name in names:
        refs = reference_images(root / name)
        if not refs:
            raise DreamBenchError(f"{root / name} holds no reference images ({', '.join(IMAGE_SUFFIXES)}); put the "
                                  "subject's photos there, or leave the subject out with --subjects")
        if check_images:
            for ref in refs:
                check_image(ref)
        cls = spec.classes[name]
        live = cls.lower() in {c.lower() for c in live_classes}
        templates = spec.live_templates if live and spec.live_templates else spec.object_templates
        chosen.append(Subject(name, cls, live, refs, templates[:limit_prompts]))
    return DreamBench(root, tuple(chosen), token.strip())


# ---------------------------------------------------------------------------------------------------------
# Generated images: naming, record, generation
# ---------------------------------------------------------------------------------------------------------


def image_seed(seed: int, subject: str, prompt_index: int, k: int) -> int:
    """The seed of image k of one subject's prompt: a hash, so it does not depend on which subjects are chosen."""
    digest = hashlib.sha256(f"{seed}/{subject}/{prompt_index}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # < 2**63


def image_path(images_dir: str | os.PathLike, subject: str, prompt_index: int, k: int, suffix: str = ".png") -> Path:
    return Path(images_dir) / subject / f"{prompt_index:02d}_{k}{suffix}"


def find_image(images_dir: str | os.PathLike, subject: str, prompt_index: int, k: int) -> Path | None:
    """The generated image ``<subject>/<prompt_index:02d>_<k>`` with any image suffix, or None."""
    for suffix in IMAGE_SUFFIXES:
        path = image_path(images_dir, subject, prompt_index, k, suffix)
        if path.is_file():
            return path
    return None


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DreamBenchError(f"{path}: cannot read the prompts record ({e}); delete it to write a new one") from None
    if not isinstance(record, dict) or not isinstance(record.get("subjects", {}), dict):
        raise DreamBenchError(f"{path}: not a DreamBench prompts record; delete it to write a new one")
    return record


def check_record(bench: DreamBench, images_dir: str | os.PathLike, generation: Mapping[str, Any] | None = None) -> dict:
    """The folder's ``prompts.json`` (or an empty record): refused when its prompts differ from the ones of
    ``bench`` at any index (another token or prompts file) or, with ``generation``, when it was generated with other
    settings, since images of two settings would mix."""
    path = Path(images_dir) / RECORD_FILE
    record = _read_record(path) if path.is_file() else {"subjects": {}}
    for subject in bench.subjects:
        recorded = record["subjects"].get(subject.name, {}).get("prompts", [])
        for i, (old, new) in enumerate(zip(recorded, bench.prompts(subject))):
            if old != new:
                raise DreamBenchError(
                    f"{path}: prompt {i} of {subject.name} was {old!r}, now {new!r}; pass the --token (and "
                    f"--data) the images were made with (the record says token {record.get('token')!r}), or "
                    "use another --images folder")
    old_generation = record.get("generation")
    if generation is not None and old_generation is not None:
        differ = {k: (old_generation.get(k), v) for k, v in generation.items() if old_generation.get(k) != v}
        if differ:
            said = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in differ.items())
            raise DreamBenchError(f"{path}: the images there were generated with other settings ({said}); rerun with "
                                  "the recorded settings to resume, or pass another --images folder")
    return record


def write_record(bench: DreamBench, images_dir: str | os.PathLike, generation: Mapping[str, Any] | None,
                 record: dict) -> Path:
    """Merge this run's subjects and prompts into ``prompts.json`` (written to a temporary file and renamed)."""
    path = Path(images_dir) / RECORD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"naming": "<subject>/<prompt_index:02d>_<k>.png", **record, "token": bench.token}
    if generation is not None:
        record["generation"] = dict(generation)
    for subject in bench.subjects:
        entry = record["subjects"].setdefault(subject.name, {})
        prompts = bench.prompts(subject)
        old = entry.get("prompts", [])
        entry.update({"class": subject.class_name, "kind": subject.kind,
                      "prompts": prompts + old[len(prompts):]})  # a longer earlier run keeps its extra prompts
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


@dataclass
class GenerationStats:
    written: int = 0
    kept: int = 0  # images that existed already (a resumed run)


def lora_dirs(lora_dir: str | os.PathLike, subjects: Sequence[Subject]) -> dict[str, Path]:
    """``<lora_dir>/<subject>`` for every subject, each holding ``pytorch_lora_weights.safetensors``; a missing one
    is an error naming the path, raised before generation starts."""
    root = Path(lora_dir)
    out = {subject.name: root / subject.name for subject in subjects}
    missing = [str(folder / "pytorch_lora_weights.safetensors") for folder in out.values()
               if not (folder / "pytorch_lora_weights.safetensors").is_file()]
    if missing:
        raise DreamBenchError(f"--lora-dir {root}: no LoRA for {len(missing)} subject(s): {', '.join(missing)}; "
                              "train them, or leave the subjects out with --subjects")
    return out


def generate_images(pipe: Callable, bench: DreamBench, images_dir: str | os.PathLike, *,
                    images_per_prompt: int = IMAGES_PER_PROMPT, seed: int = 0, num_inference_steps: int = 50,
                    guidance_scale: float = 7.5, size: int | None = None, loras: Mapping[str, Path] | None = None,
                    progress: bool = True, **pipe_kwargs: Any) -> GenerationStats:
    """Write ``<subject>/<prompt_index:02d>_<k>.png`` with a diffusers pipeline; existing images are kept and
    counted (resume). Each image is written to a temporary name and renamed, so a killed run never leaves half an
    image. With ``loras`` (subject -> LoRA folder) each subject's LoRA is loaded with ``pipe.load_lora_weights``
    before its images and unloaded after (``unload_lora_weights``); subjects with nothing to do load nothing."""
    from tqdm.auto import tqdm

    from imgalign.data.images import save_image_whole

    out = Path(images_dir)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    stats = GenerationStats()
    todo: dict[tuple[str, int], list[int]] = {}  # (subject, prompt index) -> the k still to generate
    for subject in bench.subjects:
        for i in range(len(subject.templates)):
            missing = [k for k in range(images_per_prompt) if find_image(out, subject.name, i, k) is None]
            stats.kept += images_per_prompt - len(missing)
            if missing:
                todo[subject.name, i] = missing
    bar = tqdm(total=sum(len(s.templates) for s in bench.subjects), desc="generate", unit="prompt",
               disable=not progress)
    for subject in bench.subjects:
        jobs = [(i, p) for i, p in enumerate(bench.prompts(subject)) if (subject.name, i) in todo]
        bar.update(len(subject.templates) - len(jobs))
        if not jobs:
            continue
        lora = (loras or {}).get(subject.name)
        if lora is not None:
            pipe.load_lora_weights(str(lora))
        try:
            (out / subject.name).mkdir(parents=True, exist_ok=True)
            for i, prompt in jobs:
                ks = todo[subject.name, i]
                generators = [torch.Generator("cpu").manual_seed(image_seed(seed, subject.name, i, k)) for k in ks]
                extra = {"height": size, "width": size} if size else {}
                images = pipe(prompt=prompt, num_images_per_prompt=len(ks), generator=generators,
                              num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                              **extra, **pipe_kwargs).images
                for k, image in zip(ks, images):
                    save_image_whole(image, image_path(out, subject.name, i, k))
                    stats.written += 1
                bar.update(1)
        finally:
            if lora is not None:
                pipe.unload_lora_weights()
    bar.close()
    return stats


def check_generated(bench: DreamBench, images_dir: str | os.PathLike,
                    images_per_prompt: int = IMAGES_PER_PROMPT) -> dict[str, list[Path]]:
    """subject -> its generated image paths, prompt-major ([P * K]); refused, naming the folder, when any is
    missing, and naming the file when one is not an image (read from the header only)."""
    from PIL import Image, UnidentifiedImageError

    images_dir = Path(images_dir)
    paths, missing = {}, []
    for subject in bench.subjects:
        found = [(find_image(images_dir, subject.name, i, k), image_path(images_dir, subject.name, i, k))
                 for i in range(len(subject.templates)) for k in range(images_per_prompt)]
        missing += [str(expected) for path, expected in found if path is None]
        paths[subject.name] = [path for path, _ in found]
    if missing:
        raise DreamBenchError(f"{images_dir}: {len(missing)} generated image(s) missing (first: "
                              f"{', '.join(missing[:3])}); images are named <subject>/<prompt_index:02d>_<k>.png: "
                              "generate them with --model, or match --images-per-prompt / --limit-prompts / "
                              "--subjects to the folder")
    for path in (p for ps in paths.values() for p in ps):
        try:
            with Image.open(path):
                pass
        except (UnidentifiedImageError, OSError) as e:
            raise DreamBenchError(f"{path}: cannot read the image ({e}); delete it and rerun with --model to "
                                  "generate it again") from None
    return paths


# ---------------------------------------------------------------------------------------------------------
# Backbones and scores
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Backbones:
    """The DINO model (``DINOSimilarity``) and the CLIP encoder (``build_clip_encoder``) of the reward layer."""

    dino: Any
    clip: Any
    info: dict[str, str]


def load_backbones(dino: str = DEFAULT_DINO, clip: str = DEFAULT_CLIP, *, clip_pretrained: str | None = None,
                   dino_preprocess: str = "dino", device: str = "cpu") -> Backbones:
    """Hub ids or local folders; ``clip="toy"`` is the toy world's CLIP. A model that cannot be loaded is a
    DreamBenchError naming the option and how to pass a local copy."""
    from imgalign.rewards.clip import build_clip_encoder, default_toy_clip_dir
    from imgalign.rewards.dino import DINOSimilarity
    from imgalign.rewards.loading import RewardLoadError

    clip = str(default_toy_clip_dir()) if clip == "toy" else str(clip)
    dino_model = None  # dino="none": no DINO column (offline runs without a DINO checkpoint, e.g. the toy world)
    if str(dino) != "none":
        try:
            dino_model = DINOSimilarity(str(dino), preprocess=dino_preprocess, device=device)
        except (RewardLoadError, OSError) as e:
            raise DreamBenchError(f"--dino {dino}: {e}") from None
    try:
        clip_encoder = build_clip_encoder(clip, clip_pretrained, device=device)
    except (RewardLoadError, OSError) as e:
        raise DreamBenchError(f"--clip {clip}: {e}") from None
    crop = dino_model.preprocess.output_size[0] if dino_model is not None else 0
    info = {"dino": str(dino),
            "dino_preprocess": ("not computed (--dino none)" if dino_model is None else
                                f"resize shorter side to {int(crop * 256 / 224)} bicubic, center crop {crop}, "
                                "ImageNet mean/std; [CLS] token of the last layer" if dino_preprocess == "dino" else
                                "the checkpoint's image processor; [CLS] token of the last layer"),
            "clip": clip + (f" ({clip_pretrained})" if clip_pretrained else ""),
            "clip_backend": type(clip_encoder).__name__,
            "clip_preprocess": "the checkpoint's own image preprocessing"}
    return Backbones(dino_model, clip_encoder, info)


def embed_images(encoders: Sequence[Callable[[Any], torch.Tensor]], images: Sequence[Any],
                 batch_size: int = 16) -> list[torch.Tensor]:
    """PIL images -> per encoder, L2-normalised embeddings [N, D]; each batch of ``batch_size`` images is converted
    to a tensor once and goes through every encoder."""
    from imgalign.rewards.images import to_unit_range

    out: list[list[torch.Tensor]] = [[] for _ in encoders]
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            unit = to_unit_range(list(images[start:start + batch_size]))
            for chunks, encode in zip(out, encoders):
                chunks.append(encode(unit))
    return [torch.cat(chunks) for chunks in out]


def prompt_means(gen_dino: torch.Tensor | None, ref_dino: torch.Tensor | None, gen_clip: torch.Tensor, ref_clip: torch.Tensor,
                 text: torch.Tensor, clip_t: str = "raw") -> dict[str, np.ndarray]:
    """Per-prompt DINO, CLIP-I and CLIP-T of one subject from normalised embeddings.

    gen_* [P * K, D] prompt-major (K images per prompt), ref_* [R, D], text [P, D]. DINO / CLIP-I of prompt p: the
    mean over its K x R (generated, reference) cosines; CLIP-T: the mean over its K images of cos(text_p, image),
    or of max(cos, 0) with ``clip_t="clamped"``."""
    if clip_t not in CLIP_T_CONVENTIONS:
        raise DreamBenchError(f"clip_t must be one of {CLIP_T_CONVENTIONS}, got {clip_t!r}")
    p = text.shape[0]
    dino = (gen_dino @ ref_dino.T).reshape(p, -1).mean(1) if gen_dino is not None else torch.full((p,), math.nan)
    clip_i = (gen_clip @ ref_clip.T).reshape(p, -1).mean(1)  # [P]
    cos_t = (gen_clip.reshape(p, -1, gen_clip.shape[-1]) * text[:, None, :].to(gen_clip)).sum(-1)  # [P, K]
    clip_t_values = (cos_t.clamp_min(0.0) if clip_t == "clamped" else cos_t).mean(1)  # [P]
    return {name: v.double().cpu().numpy() for name, v in (("dino", dino), ("clip_i", clip_i), ("clip_t", clip_t_values))}


def conventions(clip_t: str) -> dict[str, str]:
    return {
        "cosine": "cosine of L2-normalised embeddings",
        "dino": "mean cosine over all (reference, generated) pairs of a prompt (DreamBooth; RPO)",
        "clip_i": "mean cosine of CLIP image embeddings over all (reference, generated) pairs of a prompt",
        "clip_t": ("raw cosine of CLIP text and image embeddings" if clip_t == "raw" else
                   "max(cos, 0) of CLIP text and image embeddings (torchmetrics clip_score / 100, as RPO)")
                  + ", prompt with the identifier removed, mean over the prompt's images",
        "averaging": "pairs -> prompts -> subjects; groups (object, live) and the overall mean are over subjects",
    }


def score_dreambench(bench: DreamBench, images_dir: str | os.PathLike, backbones: Backbones, *,
                     images_per_prompt: int = IMAGES_PER_PROMPT, clip_t: str = "raw", batch_size: int = 16,
                     paths: Mapping[str, list[Path]] | None = None, progress: bool = True) -> dict:
    """DINO, CLIP-I and CLIP-T per prompt, per subject, per group (object / live) and overall.

    Per subject, its references and its P x K generated images are embedded once per backbone and its P texts once;
    the cosines come from matrix products (:func:`prompt_means`)."""
    from tqdm.auto import tqdm

    from imgalign.data.images import read_image

    if clip_t not in CLIP_T_CONVENTIONS:
        raise DreamBenchError(f"--clip-t must be one of {CLIP_T_CONVENTIONS}, got {clip_t!r}")
    paths = paths or check_generated(bench, images_dir, images_per_prompt)
    per_prompt, per_subject = [], []
    for subject in tqdm(bench.subjects, desc="score", unit="subject", disable=not progress):
        refs = [read_image(p) for p in subject.references]
        gens = [read_image(p) for p in paths[subject.name]]
        texts = bench.text_prompts(subject)
        n = len(refs)  # references and generated images in one pass: [R + P * K, D] per backbone
        encoders = [backbones.clip.encode_images] + ([backbones.dino.embed_unit] if backbones.dino else [])
        clip, *dino = embed_images(encoders, refs + gens, batch_size)
        dino_gen, dino_ref = (dino[0][n:], dino[0][:n]) if dino else (None, None)
        means = prompt_means(dino_gen, dino_ref, clip[n:], clip[:n], backbones.clip.encode_texts(texts), clip_t)
        base = {"subject": subject.name, "class": subject.class_name, "kind": subject.kind}
        for i, (prompt, text) in enumerate(zip(bench.prompts(subject), texts)):
            per_prompt.append({**base, "prompt_index": i, "prompt": prompt, "text_prompt": text,
                               **{m: float(means[m][i]) for m in METRICS}})
        per_subject.append({**base, "references": len(refs), "prompts": len(texts), "images": len(gens),
                            **{m: float(means[m].mean()) for m in METRICS}})
    groups = {"all": per_subject, **{kind: [r for r in per_subject if r["kind"] == kind] for kind in ("object", "live")}}
    overall = {name: {"subjects": len(rows), **{m: float(np.mean([r[m] for r in rows])) for m in METRICS}}
               for name, rows in groups.items() if rows}
    return {"overall": overall, "subjects": per_subject, "prompts": per_prompt, "backbones": dict(backbones.info),
            "conventions": conventions(clip_t),
            "settings": {"data": str(bench.root), "images": str(images_dir), "token": bench.token,
                         "images_per_prompt": images_per_prompt, "clip_t": clip_t}}


# ---------------------------------------------------------------------------------------------------------
# Outputs: tables, report, grids
# ---------------------------------------------------------------------------------------------------------


def _write_table(rows: list[dict], stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with stem.with_suffix(".csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(METRICS))
        writer.writeheader()
        writer.writerows(rows)


def report_markdown(result: Mapping[str, Any], title: str = "DreamBench") -> str:
    s, b = result["settings"], result["backbones"]
    lines = [f"# {title}", "",
             f"{len(result['subjects'])} subjects, {len(result['prompts'])} prompts, {s['images_per_prompt']} images "
             f"per prompt; identifier `{s['token']}`; dataset `{s['data']}`; images in `{s['images']}`.", "",
             "| group | subjects | DINO | CLIP-I | CLIP-T |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {o['subjects']} | {o['dino']:.4f} | {o['clip_i']:.4f} | {o['clip_t']:.4f} |"
              for name, o in result["overall"].items()]
    lines += ["", "## Backbones and conventions", "",
              f"- DINO: `{b['dino']}` ({b['dino_preprocess']})",
              f"- CLIP (CLIP-I and CLIP-T): `{b['clip']}` via {b['clip_backend']} ({b['clip_preprocess']})"]
    lines += [f"- {name}: {text}" for name, text in result["conventions"].items()]
    lines += ["", "Numbers from other papers use other CLIP backbones, DINO loaders and CLIP-T conventions; compare "
              "runs of this evaluator with each other.", "",
              "## Subjects", "", "| subject | class | kind | refs | DINO | CLIP-I | CLIP-T | grid |",
              "|---|---|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['subject']} | {r['class']} | {r['kind']} | {r['references']} | {r['dino']:.4f} | "
              f"{r['clip_i']:.4f} | {r['clip_t']:.4f} | [png](grids/{r['subject']}.png) |" for r in result["subjects"]]
    return "\n".join(lines) + "\n"


def subject_grid(subject: Subject, prompts: Sequence[str], generated: Sequence[Path], images_per_prompt: int,
                 tile: int = 128, max_side: int = 192, title: str | None = None):
    """First row the references, then one row per prompt with its images, each row labelled (a PIL image). Images are
    cropped square at the generated size (at most ``max_side`` px); small ones are enlarged to ``tile`` px."""
    from PIL import Image, ImageOps

    from imgalign.data.images import read_image
    from imgalign.train.setup import captioned_grid

    refs = [read_image(p) for p in subject.references]
    gens = [read_image(p) for p in generated]
    side = min(max_side, max(gens[0].size))
    columns = max(len(refs), images_per_prompt)
    blank = Image.new("RGB", (side, side), "white")
    rows = [refs] + [gens[i * images_per_prompt:(i + 1) * images_per_prompt] for i in range(len(prompts))]
    tiles = [ImageOps.fit(im, (side, side), Image.Resampling.LANCZOS) for row in rows
             for im in list(row) + [blank] * (columns - len(row))]
    pixels = torch.from_numpy(np.stack([np.asarray(t) for t in tiles])).permute(0, 3, 1, 2).float() / 127.5 - 1
    labels = [f"references ({len(refs)})"] + [f"{i:02d}: {p}" for i, p in enumerate(prompts)]
    return captioned_grid(pixels, labels, tile=tile, title=title, label_width=2 * tile)


def write_outputs(result: dict, bench: DreamBench, out_dir: str | os.PathLike,
                  paths: Mapping[str, list[Path]] | None = None, grids: bool = True) -> dict[str, str]:
    """scores.json (everything), per_subject.csv/.json, per_prompt.csv/.json, report.md and grids/<subject>.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _write_table(result["subjects"], out / "per_subject")
    _write_table(result["prompts"], out / "per_prompt")
    (out / "report.md").write_text(report_markdown(result), encoding="utf-8")
    if grids and paths:
        (out / "grids").mkdir(exist_ok=True)
        rows = {r["subject"]: r for r in result["subjects"]}
        for subject in bench.subjects:
            r = rows[subject.name]
            title = (f"{subject.name} ({subject.class_name}): DINO {r['dino']:.3f}, CLIP-I {r['clip_i']:.3f}, "
                     f"CLIP-T {r['clip_t']:.3f}")
            subject_grid(subject, bench.prompts(subject), paths[subject.name], result["settings"]["images_per_prompt"],
                         title=title).save(out / "grids" / f"{subject.name}.png")
    return {"json": str(out / "scores.json"), "markdown": str(out / "report.md")}


# ---------------------------------------------------------------------------------------------------------
# Command line: imgalign eval dreambench
# ---------------------------------------------------------------------------------------------------------


def _names(values: Sequence[str] | None) -> list[str] | None:
    """Repeated and/or comma-separated names -> one list (None when none were given)."""
    names = [n.strip() for v in values or [] for n in v.split(",") if n.strip()]
    return names or None


def add_arguments(p) -> None:
    """The arguments of `imgalign eval dreambench` (registered by imgalign.eval.cli)."""
    p.add_argument("--data", required=True, help="DreamBench folder: the dataset/ folder of google/dreambooth (or a "
                   "folder in its layout); 'toy' for the toy subjects")
    p.add_argument("--out", required=True, help="run folder: per_subject/per_prompt .csv/.json, scores.json, "
                   "report.md, grids/")
    p.add_argument("--images", help="folder of <subject>/<prompt_index:02d>_<k>.png (default OUT/images); generated "
                   "there with --model")
    p.add_argument("--subjects", action="append", help="subjects to evaluate, comma-separated or repeated "
                   "(default: every subject of the class table)")
    p.add_argument("--token", default=DEFAULT_TOKEN, help="the subject identifier in the prompts (DreamBooth: sks, "
                   "RPO: [V])")
    p.add_argument("--live-classes", default=",".join(LIVE_CLASSES), help="classes that get the live-subject prompts")
    p.add_argument("--limit-prompts", type=int, default=None, help="only the first N prompts per subject (smoke runs)")
    p.add_argument("--model", help="pipeline (hub id or folder) to generate the missing images with")
    lora = p.add_mutually_exclusive_group()
    lora.add_argument("--lora", help="folder with pytorch_lora_weights.safetensors, used for every subject")
    lora.add_argument("--lora-dir", help="folder of <subject>/pytorch_lora_weights.safetensors, one LoRA per subject")
    p.add_argument("--images-per-prompt", type=int, default=IMAGES_PER_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dino", default=DEFAULT_DINO, help="DINO backbone (hub id or folder of a transformers ViTModel); "
                   "none: no DINO column (offline, e.g. with --data toy --clip toy)")
    p.add_argument("--dino-preprocess", choices=("dino", "processor"), default="dino",
                   help="dino: resize 256 + center crop 224 (DINO's evaluation); processor: the checkpoint's own")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP backbone: transformers hub id or folder, open_clip "
                   "architecture (with --clip-pretrained) or model folder; 'toy' for the toy CLIP")
    p.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag or checkpoint file")
    p.add_argument("--clip-t", choices=CLIP_T_CONVENTIONS, default="raw",
                   help="raw cosine, or clamped = max(cos, 0) (torchmetrics clip_score / 100, RPO's numbers)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder forward pass")
    p.add_argument("--no-grids", action="store_true", help="skip the per-subject image grids")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    from imgalign.toy.subjects import SUBJECT_DIR

    if args.images_per_prompt < 1:
        raise DreamBenchError(f"--images-per-prompt must be at least 1, got {args.images_per_prompt}")
    if (args.lora or args.lora_dir) and not args.model:
        raise DreamBenchError("--lora / --lora-dir need --model, the pipeline they belong to")
    bench = load_dreambench(SUBJECT_DIR if args.data == "toy" else args.data, token=args.token,
                            subjects=_names(args.subjects), live_classes=_names([args.live_classes]) or (),
                            limit_prompts=args.limit_prompts)
    out = Path(args.out)
    images = Path(args.images) if args.images else out / "images"
    n_images = sum(len(s.templates) for s in bench.subjects) * args.images_per_prompt
    print(f"DreamBench: {len(bench.subjects)} subjects, {n_images} images ({args.images_per_prompt} per prompt) in "
          f"{images}")
    if args.model:
        loras = lora_dirs(args.lora_dir, bench.subjects) if args.lora_dir else None
        generation = {"model": args.model, "lora": args.lora, "lora_dir": args.lora_dir, "seed": args.seed,
                      "steps": args.steps, "guidance_scale": args.guidance_scale, "size": args.size}
        record = check_record(bench, images, generation)
        backbones = load_backbones(args.dino, args.clip, clip_pretrained=args.clip_pretrained,
                                   dino_preprocess=args.dino_preprocess, device=args.device)
        from imgalign.models.adapters import load_adapter

        adapter = load_adapter(args.model, device=args.device)
        if args.lora:
            adapter.pipe.load_lora_weights(args.lora)
        write_record(bench, images, generation, record)
        stats = generate_images(adapter.pipe, bench, images, images_per_prompt=args.images_per_prompt, seed=args.seed,
                                num_inference_steps=args.steps, guidance_scale=args.guidance_scale, size=args.size,
                                loras=loras, progress=not args.quiet)
        print(f"generated {stats.written} images, kept {stats.kept} that existed")
        del adapter
        paths = check_generated(bench, images, args.images_per_prompt)
    else:
        check_record(bench, images)
        paths = check_generated(bench, images, args.images_per_prompt)
        backbones = load_backbones(args.dino, args.clip, clip_pretrained=args.clip_pretrained,
                                   dino_preprocess=args.dino_preprocess, device=args.device)
    result = score_dreambench(bench, images, backbones, images_per_prompt=args.images_per_prompt, clip_t=args.clip_t,
                              batch_size=args.batch_size, paths=paths, progress=not args.quiet)
    written = write_outputs(result, bench, out, paths, grids=not args.no_grids)
    o = result["overall"]["all"]
    print(f"DINO {o['dino']:.4f}  CLIP-I {o['clip_i']:.4f}  CLIP-T {o['clip_t']:.4f} ({args.clip_t} cosine) over "
          f"{o['subjects']} subjects -> {written['markdown']}")
    return 0
