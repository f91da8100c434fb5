"""UniGenBench: 600 prompts, each with 1-5 test points checked by a multimodal judge, one call per image.

    imgalign eval unigenbench --prompts test_prompts_en.csv --model assets/toy/sd --out runs/ugb \\
        --base-url http://localhost:8000/v1 --judge-model CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1

The protocol follows UniGenBench's ``eval/`` (Wang et al., arXiv 2508.20751; UniGenBench++ arXiv 2510.18701):

1. Prompts: CSV ``index, prompt_en, sub_dims_en`` (or ``prompt_zh, sub_dims_zh``); ``sub_dims`` is JSON with the
   theme (Primary Categories), sub-theme, subject, sentence structure and two parallel lists: the test points
   (sub-dimensions, e.g. "Attribute - Color") and their prompt-specific descriptions. :func:`load_unigenbench`
   checks every row, names the line of a bad one, and normalises the sub-theme spellings
   (`imgalign.eval.unigenbench_data`). A Chinese file is judged with the reference's Chinese instruction and test
   point definitions, an English one with the English (``JUDGE_PROTOCOLS``).
2. Images: 4 per prompt at fixed seeds (:func:`image_seed`), named ``{index}_{k}.png``; :func:`generate_images`
   skips the files that exist, so a killed run resumes; a folder generated elsewhere with the same names works.
3. Judge: one request per image with the benchmark's instruction (:func:`judge_prompt`); the answer's
   ``<score>[1, 0, ...]</score>`` must hold one 0/1 per test point (:func:`parse_judge_answer`). An unparsable
   answer is asked again up to ``max_retries`` times (sampled: a greedy judge would repeat itself), then counted as
   unparsable and left out of the scores.
   Answers are appended to a JSONL file as they arrive (with the image's SHA-1), so a rerun asks only for what is
   missing. Backends: any OpenAI-compatible endpoint (vLLM, SGLang, an API) or a local transformers VLM, through
   the reward layer's `imgalign.rewards.vlm_judge` clients (timeouts, HTTP retries, concurrent requests).
4. Scores (:func:`score_answers`): accuracy = #(score 1) / #(image, test point) pairs, per primary dimension (the
   text before the first "-" of a test point), per sub-dimension, per theme, sub-theme and subject. Overall:
   ``primary_mean`` = the mean of the 10 primary-dimension accuracies (the leaderboard's overall, "an average
   across 10 primary evaluation dimensions"), and ``testpoint_mean`` = all (image, test point) pairs pooled;
   ``sub_dimension_mean`` = the mean of the 27 sub-dimension accuracies. The reference script prints only the
   per-dimension numbers. :func:`write_outputs`: scores.json, scores.csv, report.md, dimensions.png and a
   self-contained report.html (`imgalign.eval.unigenbench_html`).
5. :func:`compare_runs`: two runs side by side, with paired percentile-bootstrap intervals of the differences,
   resampling prompts (:func:`write_compare_outputs`: compare.json, .md, .html). :func:`score_folder_with_reward`: any pointwise reward of the reward layer on the same
   image folder (as Pref-GRPO's ``tools/eval_quality.sh``), to track a run without a judge.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgalign.errors import UserError
from imgalign.eval.unigenbench_data import (
    JUDGE_PROTOCOLS,
    KEYS_EN,
    KEYS_ZH_TO_EN,
    SENTENCE_ALIASES,
    SUB_THEME_ALIASES,
    SUB_THEME_ALIASES_ZH,
    SUB_THEMES,
    SUB_THEMES_ZH,
)
from imgalign.eval.unigenbench_html import compare_html, report_html

IMAGES_PER_PROMPT = 4
ANSWERS_FILE = "answers.jsonl"


class UniGenBenchError(UserError):
    """A bad UniGenBench file, image folder, answer cache or run folder."""


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def primary_dimension(testpoint: str) -> str:
    """The primary dimension of a test point: the text before the first "-", stripped ("Attribute - Color" ->
    "Attribute"); the whole name when it has no "-" ("Style")."""
    return testpoint.split("-", 1)[0].strip() if "-" in testpoint else testpoint.strip()


@dataclass(frozen=True)
class BenchItem:
    """One benchmark prompt with its categories (normalised) and its test points."""

    index: int
    prompt: str
    theme: str
    sub_theme: str
    subject: str
    sentence: str
    testpoints: tuple[str, ...]
    descriptions: tuple[str, ...]
    line: int = 0  # the CSV line the row starts on
    raw_sub_theme: str = ""

    @property
    def theme_sub_theme(self) -> str:
        return f"{self.theme} / {self.sub_theme}"


@dataclass
class UniGenBench:
    path: str
    language: str  # "en" or "zh"
    items: list[BenchItem]
    warnings: list[str] = field(default_factory=list)  # unknown category spellings, repaired rows

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def by_index(self) -> dict[int, BenchItem]:
        return {item.index: item for item in self.items}

    def head(self, n: int | None) -> UniGenBench:
        return self if n is None else UniGenBench(self.path, self.language, self.items[:n], self.warnings)


def _repair_json(text: str) -> str | None:
    """The public test_prompts_en_long.csv (row 509) lists two test points without the comma between them
    (``"Grammar - Negation" "Attribute - Color"``). Insert such commas (only between a closing and an opening
    quote); None when that does not make valid JSON."""
    fixed = text
    for _ in range(32):
        try:
            json.loads(fixed)
            return fixed
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Expecting ',' delimiter") or e.pos >= len(fixed) or fixed[e.pos] != '"':
                return None
            head = fixed[: e.pos].rstrip()
            if not head.endswith('"'):
                return None
            fixed = head + ", " + fixed[e.pos :]
    return None


def normalise_sub_theme(theme: str, sub_theme: str) -> str | None:
    """The canonical sub-theme of a spelling, or None when the table does not know it."""
    if sub_theme in SUB_THEMES.get(theme, ()) or sub_theme in SUB_THEMES_ZH.get(theme, ()):
        return sub_theme
    return SUB_THEME_ALIASES.get((theme, sub_theme)) or SUB_THEME_ALIASES_ZH.get((theme, sub_theme))


def load_unigenbench(path: str | os.PathLike, *, repair: bool = True) -> UniGenBench:
    """Read a UniGenBench prompt CSV (English or Chinese, short or long) and check every row.

    Refused, naming the file, line and index: a missing column, an index that is not a unique integer, an empty
    prompt, a JSON column that does not parse or lacks a key, test points that are not a non-empty list of
    strings, descriptions of another length. ``repair=True`` mends the one known defect of the public files (a
    missing comma between two list strings) and records it in ``warnings``; sub-theme and sentence spellings are
    normalised (:data:`SUB_THEME_ALIASES`), and spellings the table does not know are kept and listed in ``warnings``.
    """
    path = Path(path)
    if not path.is_file():
        raise UniGenBenchError(f"UniGenBench file {path} does not exist; pass the path of test_prompts_en.csv "
                               "(or _en_long / _zh / _zh_long) from the UniGenBench repository's data/ folder")
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
    except UnicodeDecodeError as e:
        raise UniGenBenchError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from None
    with handle:
        language = "en" if "prompt_en" in columns else "zh" if "prompt_zh" in columns else None
        needed = ["index", f"prompt_{language or 'en'}", f"sub_dims_{language or 'en'}"]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise UniGenBenchError(
                f"{path}: the header has columns {columns}, missing {missing}; a UniGenBench file has the columns "
                "index, prompt_en, sub_dims_en (English) or index, prompt_zh, sub_dims_zh (Chinese)")
        prompt_col, dims_col = needed[1], needed[2]
        items, warnings, seen = [], [], {}
        unknown: dict[tuple[str, str], int] = defaultdict(int)
        line = reader.line_num + 1
        try:
            for row in reader:
                items.append(_parse_row(row, path, line, prompt_col, dims_col, language, repair, warnings, seen,
                                        unknown))
                line = reader.line_num + 1
        except UnicodeDecodeError as e:
            raise UniGenBenchError(f"{path} near line {line} is not UTF-8 text ({e}); save it as UTF-8") from None
        except csv.Error as e:
            raise UniGenBenchError(f"{path}, line {line}: broken CSV ({e}); check the quoting of that row") from None
    if not items:
        raise UniGenBenchError(f"{path} has a header but no rows")
    for (theme, sub), n in sorted(unknown.items()):
        warnings.append(f"sub-theme {sub!r} of theme {theme!r} ({n} rows) is not in the normalisation table "
                        "(imgalign.eval.unigenbench_data.SUB_THEME_ALIASES); kept as written")
    return UniGenBench(str(path), language, items, warnings)


def _parse_row(row, path, line, prompt_col, dims_col, language, repair, warnings, seen, unknown) -> BenchItem:
    raw_index = (row.get("index") or "").strip()
    where = f"{path}, line {line} (index {raw_index or '?'})"
    if None in row:  # more fields than header columns
        raise UniGenBenchError(f"{where}: the row has more fields than the header; check its quoting")
    try:
        index = int(raw_index)
        if index < 0:
            raise ValueError
    except ValueError:
        raise UniGenBenchError(f"{where}: index {raw_index!r} is not a non-negative integer") from None
    if index in seen:
        raise UniGenBenchError(f"{where}: index {index} repeats the row on line {seen[index]}; indices must be unique")
    seen[index] = line
    prompt = (row.get(prompt_col) or "").strip()
    if not prompt:
        raise UniGenBenchError(f"{where}: the {prompt_col} column is empty")
    text = row.get(dims_col) or ""
    try:
        dims = json.loads(text)
    except json.JSONDecodeError as e:
        fixed = _repair_json(text) if repair else None
        if fixed is None:
            raise UniGenBenchError(f"{where}: {dims_col} is not valid JSON ({e.msg} at character {e.pos}: "
                                   f"...{text[max(0, e.pos - 30):e.pos + 30]}...); fix the JSON of this row") from None
        dims = json.loads(fixed)
        warnings.append(f"{where}: repaired {dims_col} (a missing comma between two list strings)")
    if not isinstance(dims, dict):
        raise UniGenBenchError(f"{where}: {dims_col} must be a JSON object, got {type(dims).__name__}")
    if language == "zh":
        dims = {KEYS_ZH_TO_EN.get(k, k): v for k, v in dims.items()}
    missing = [k for k in KEYS_EN if k not in dims]
    if missing:
        names = missing if language == "en" else [k for k, v in KEYS_ZH_TO_EN.items() if v in missing]
        raise UniGenBenchError(f"{where}: {dims_col} lacks the key(s) {names}; it has {sorted(dims)}")
    points, descriptions = dims["Testpoints"], dims["Testpoint Description"]
    key_points, key_desc = ("Testpoints", "Testpoint Description") if language == "en" else ("考点", "考点对应描述")
    if not isinstance(points, list) or not points or not all(isinstance(p, str) and p.strip() for p in points):
        raise UniGenBenchError(f"{where}: {key_points} must be a non-empty list of test point names, got {points!r}")
    if not isinstance(descriptions, list) or not all(isinstance(d, str) for d in descriptions):
        raise UniGenBenchError(f"{where}: {key_desc} must be a list of strings, got {descriptions!r}")
    if len(points) != len(descriptions):
        raise UniGenBenchError(f"{where}: {len(points)} test points but {len(descriptions)} descriptions; "
                               f"{key_points} and {key_desc} are parallel lists and must have the same length")
    for key in KEYS_EN[:4]:
        if not isinstance(dims[key], str):
            raise UniGenBenchError(f"{where}: {key} must be a string, got {dims[key]!r}")
    theme, raw_sub = dims["Primary Categories"].strip(), dims["Secondary Categories"].strip()
    sub = normalise_sub_theme(theme, raw_sub)
    if sub is None:
        unknown[(theme, raw_sub)] += 1
        sub = raw_sub
    sentence = dims["Sentence Structure"].strip()
    return BenchItem(index=index, prompt=prompt, theme=theme, sub_theme=sub, subject=dims["Subjects"].strip(),
                     sentence=SENTENCE_ALIASES.get(sentence, sentence),
                     testpoints=tuple(" ".join(p.split()) for p in points),
                     descriptions=tuple(str(d) for d in descriptions), line=line, raw_sub_theme=raw_sub)


def write_unigenbench_csv(path: str | os.PathLike, items: Iterable[BenchItem], language: str = "en") -> None:
    """Write items in the benchmark's CSV layout: English (``index, prompt_en, sub_dims_en``) or Chinese
    (``prompt_zh, sub_dims_zh`` with the Chinese JSON keys) (the toy UniGenBench, test fixtures)."""
    if language not in ("en", "zh"):
        raise ValueError(f"language must be 'en' or 'zh', got {language!r}")
    en_to_zh = {v: k for k, v in KEYS_ZH_TO_EN.items()}
    with Path(path).open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", f"prompt_{language}", f"sub_dims_{language}"])
        for it in items:
            dims = {"Primary Categories": it.theme, "Secondary Categories": it.sub_theme, "Subjects": it.subject,
                    "Sentence Structure": it.sentence, "Testpoints": list(it.testpoints),
                    "Testpoint Description": list(it.descriptions)}
            if language == "zh":
                dims = {en_to_zh[k]: v for k, v in dims.items()}
            writer.writerow([it.index, it.prompt, json.dumps(dims, ensure_ascii=False)])


def toy_items(prompts: Sequence[str], start: int = 0) -> list[BenchItem]:
    """The toy UniGenBench: toy-grammar prompts as benchmark items whose test points are the toy evaluator's
    criteria (`imgalign.eval.unigenbench_data.TOY_TESTPOINTS`): presence, colour, shape and count always; size,
    relation and background when the prompt states them. Theme "Toy", sub-theme the prompt kind."""
    from imgalign.eval.unigenbench_data import TOY_TESTPOINTS
    from imgalign.toy import parse

    items = []
    for i, prompt in enumerate(prompts):
        scene = parse(prompt)
        groups = [g.to_text() for g in scene.objects]
        described = {"presence": ", ".join(groups), "colour": ", ".join(f"{g.colour} {g.shape}" for g in scene.objects),
                     "shape": ", ".join(g.shape for g in scene.objects), "count": ", ".join(groups)}
        sized = [g.to_text() for g in scene.objects if g.size is not None]
        if sized:
            described["size"] = ", ".join(sized)
        if scene.relation is not None:
            described["relation"] = f"{scene.objects[0].to_text()} {scene.relation} {scene.objects[1].to_text()}"
        if scene.background is not None:
            described["background"] = f"a {scene.background} background"
        items.append(BenchItem(index=start + i, prompt=prompt, theme="Toy", sub_theme=scene.kind,
                               subject="Other Entity", sentence="Descriptive",
                               testpoints=tuple(TOY_TESTPOINTS[c] for c in described),
                               descriptions=tuple(described.values())))
    return items


# ---------------------------------------------------------------------------------------------------------
# The judge: prompt, parsing, backends, the cached and resumable loop
# ---------------------------------------------------------------------------------------------------------


def item_language(item: BenchItem) -> str:
    """"zh" when a test point name has CJK characters (a Chinese file's item), else "en"."""
    return "zh" if any(re.search(r"[\u3400-\u9fff]", p) for p in item.testpoints) else "en"


def judge_prompt(item: BenchItem, definitions: Mapping[str, str] | None = None, template: str | None = None,
                 language: str | None = None) -> str:
    """The benchmark's instruction for one image of ``item``: the prompt, the test points with their definitions
    and their prompt-specific descriptions, and the output layout (``<analysis>[...]</analysis><score>[...]</score>``).

    ``language`` ("en" or "zh"; default: from the test point names, :func:`item_language`) picks the reference's
    instruction, definitions and headers (`imgalign.eval.unigenbench_data.JUDGE_PROTOCOLS`); ``definitions`` are
    added to that language's definitions (and win over them), for test point names the benchmark does not have.
    """
    language = language or item_language(item)
    if language not in JUDGE_PROTOCOLS:
        raise ValueError(f"language must be one of {sorted(JUDGE_PROTOCOLS)}, got {language!r}")
    default_template, builtin, definitions_header, descriptions_header = JUDGE_PROTOCOLS[language]
    table = {**builtin, **(definitions or {})}
    unknown = [p for p in item.testpoints if p not in table]
    if unknown:
        raise UniGenBenchError(
            f"prompt {item.index}: no definition for the test point(s) {unknown}; the {language} definitions cover "
            f"{len(builtin)} test points (imgalign.eval.unigenbench_data.JUDGE_PROTOCOLS); pass definitions= "
            "(--definitions FILE.json) for other names")
    points = list(item.testpoints)
    defs = definitions_header + "".join(f"\n{p}: {table[p]}" for p in points) + "\n\u300d"
    descs = descriptions_header + "".join(f"\n{p}: {d}" for p, d in zip(points, item.descriptions)) + "\n\u300d"
    return (template or default_template).format(prompt=item.prompt, testpoints=repr(points), definitions=defs,
                                                 descriptions=descs)


@dataclass
class ParsedAnswer:
    scores: list[int] | None  # one 0/1 per test point; None when the answer is unusable
    analysis: list[str] | None = None
    error: str | None = None


_TAGS = {tag: re.compile(rf"<{tag}>(.*?)</{tag}>", re.S | re.I) for tag in ("score", "analysis")}


def _literal_list(text: str) -> list | None:
    text = text.strip().strip("`").strip()
    if text.lower().startswith(("python", "json")):
        text = text.split(None, 1)[1] if len(text.split(None, 1)) > 1 else ""
    for parse in (ast.literal_eval, json.loads):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, json.JSONDecodeError):
            continue
        if isinstance(value, (list, tuple)):
            return list(value)
    return None


def _binary(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str) and value.strip() in ("0", "1"):
        return int(value.strip())
    return None


def parse_judge_answer(text: str | None, n_testpoints: int) -> ParsedAnswer:
    """Read one judge answer in the benchmark's layout.

    The last ``<score>...</score>`` must hold a list (Python or JSON) of exactly ``n_testpoints`` values, each 0 or 1
    (``1``, ``1.0``, ``"1"`` and ``True`` all read as 1). Text around the tags and a ``<think>`` block before them
    are ignored. ``<analysis>`` is kept when it parses as a list; one of the wrong length makes the answer unusable
    (as in the reference); a missing or free-text analysis does not.
    """
    if not text or not text.strip():
        return ParsedAnswer(None, error="empty answer")
    if "</think>" in text:
        after = text.rsplit("</think>", 1)[1]
        text = after if "<score>" in after.lower() else text
    found = _TAGS["score"].findall(text)
    if not found:
        return ParsedAnswer(None, error="no <score>...</score> in the answer")
    values = _literal_list(found[-1])
    if values is None:
        return ParsedAnswer(None, error=f"<score> does not hold a list: {found[-1].strip()[:80]!r}")
    scores = [_binary(v) for v in values]
    if any(s is None for s in scores):
        bad = [v for v, s in zip(values, scores) if s is None]
        return ParsedAnswer(None, error=f"<score> has values that are not 0 or 1: {bad[:3]!r}")
    if len(scores) != n_testpoints:
        return ParsedAnswer(None, error=f"<score> has {len(scores)} values for {n_testpoints} test points")
    analysis = None
    found = _TAGS["analysis"].findall(text)
    if found:
        analysis = _literal_list(found[-1])
        if analysis is not None and len(analysis) != n_testpoints:
            return ParsedAnswer(None, error=f"<analysis> has {len(analysis)} entries for {n_testpoints} test points")
        analysis = None if analysis is None else [str(a) for a in analysis]
    return ParsedAnswer(scores, analysis)


def make_judge_backend(kind: str | Any = "openai", **kwargs: Any):
    """A single-image backend of the reward layer's VLM judge clients (each request: the image, then the text).

    ``"openai"``: `imgalign.rewards.vlm_judge.OpenAIJudgeBackend` (``base_url``, ``model``, ``api_key`` /
    ``api_key_env``, ``timeout``, ``max_retries`` (HTTP), ``concurrency``, ``max_tokens``, ``image_format``);
    ``"transformers"``: `TransformersJudgeBackend` (``model``, ``device``, ``dtype``, ``device_map``,
    ``max_new_tokens``, ``batch_size``, ...); an object with ``generate(requests)``; or a callable
    ``fn(image, text) -> str``. Answers may run to 4096 tokens (the reference's ``max_tokens``). Both clients decode
    the first ask greedily and sample re-asks after an unusable answer at ``retry_temperature`` (default 0.7).
    """
    from imgalign.rewards import vlm_judge as vj

    if kind == "openai":
        kwargs.setdefault("max_tokens", 4096)
        kwargs.setdefault("timeout", 300.0)
        return vj.OpenAIJudgeBackend(**kwargs)
    if kind == "transformers":
        kwargs.setdefault("max_new_tokens", 4096)
        return vj.TransformersJudgeBackend(**kwargs)
    if hasattr(kind, "generate"):
        return kind
    if callable(kind):
        return vj.CallableJudgeBackend(lambda image, _unused, text: kind(image, text))
    raise ValueError(f"judge backend must be 'openai', 'transformers', a backend or a callable, got {kind!r}")


def image_name(index: int, k: int, suffix: str = ".png") -> str:
    return f"{index}_{k}{suffix}"


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def read_answers(path: str | os.PathLike) -> dict[str, dict]:
    """The cached answers of a JSONL progress file, by image file name (the last line of a file wins). A line cut
    short by a kill is skipped."""
    path = Path(path)
    answers: dict[str, dict] = {}
    if not path.is_file():
        return answers
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed run; its image is asked again
        if not isinstance(record, dict) or "file" not in record:
            raise UniGenBenchError(f"{path}, line {number}: not an answer record; remove the file to start over")
        answers[record["file"]] = record
    return answers


@dataclass
class JudgeStats:
    images: int = 0
    cached: int = 0
    asked: int = 0  # images sent to the judge in this run
    requests: int = 0  # requests, retries included
    retries: int = 0  # re-asks after an unparsable answer or a failed request
    request_errors: int = 0
    unparsable: int = 0  # images whose every attempt was unparsable (left out of the scores)


def image_tasks(bench: UniGenBench, images_dir: str | os.PathLike, images_per_prompt: int = IMAGES_PER_PROMPT,
                suffix: str = ".png") -> list[tuple[BenchItem, int, Path]]:
    """(item, k, path) of every image the run scores; a missing image is an error naming the folder and the fix."""
    images_dir = Path(images_dir)
    tasks = [(item, k, images_dir / image_name(item.index, k, suffix)) for item in bench
             for k in range(images_per_prompt)]
    missing = [p.name for _, _, p in tasks if not p.is_file()]
    if missing:
        raise UniGenBenchError(
            f"{images_dir}: {len(missing)} of {len(tasks)} images are missing (first: {missing[:3]}); images are "
            f"named {{index}}_{{k}}{suffix} for k < {images_per_prompt}: generate them (--model) or set "
            "--images-per-prompt")
    return tasks


def judge_images(bench: UniGenBench, images_dir: str | os.PathLike, backend: Any, answers_path: str | os.PathLike,
                 *, images_per_prompt: int = IMAGES_PER_PROMPT, max_retries: int = 10, concurrency: int | None = None,
                 definitions: Mapping[str, str] | None = None, batch_size: int = 8, suffix: str = ".png",
                 retry_unparsable: bool = False, progress: bool = True) -> tuple[list[dict], JudgeStats]:
    """Judge every ``{index}_{k}.png`` of ``images_dir``; return the answer records (benchmark order) and stats.

    Answers already in ``answers_path`` for the same image bytes and test points are reused; new ones are appended
    (one JSON line per image, flushed) as they arrive. HTTP backends with ``concurrency > 1`` (default: the
    backend's own) get that many requests in flight; other backends get batches of ``batch_size``.
    """
    from imgalign.data.images import read_image
    from imgalign.rewards.vlm_judge import JudgeRequest, JudgeRequestError

    images_dir, answers_path = Path(images_dir), Path(answers_path)
    tasks = image_tasks(bench, images_dir, images_per_prompt, suffix)
    stats = JudgeStats(images=len(tasks))
    cache = read_answers(answers_path)
    records: dict[str, dict] = {}
    todo = []
    for item, k, path in tasks:
        old = cache.get(path.name)
        digest = _sha1(path)
        if (old and old.get("sha1") == digest and old.get("testpoints") == list(item.testpoints)
                and (old.get("scores") is not None or not retry_unparsable)):
            records[path.name] = old
            stats.cached += 1
        else:
            todo.append((item, k, path, digest))
    stats.asked = len(todo)
    lock = threading.Lock()
    answers_path.parent.mkdir(parents=True, exist_ok=True)

    language = bench.language if bench.language in JUDGE_PROTOCOLS else None

    def judge_chunk(chunk, out) -> None:
        texts = {t[2].name: judge_prompt(t[0], definitions, language=language) for t in chunk}
        images = {t[2].name: read_image(t[2]) for t in chunk}
        pending, attempts = list(chunk), defaultdict(int)
        while pending:  # attempt > 0: a re-ask, which the backends sample (a greedy judge would repeat itself)
            requests = [JudgeRequest(images[t[2].name], None, texts[t[2].name], attempt=attempts[t[2].name])
                        for t in pending]
            try:
                answers = backend.generate(requests)
            except JudgeRequestError:
                answers = []
                for request in requests:  # one failed request must not sink the others
                    try:
                        answers.extend(backend.generate([request]))
                    except JudgeRequestError:
                        with lock:
                            stats.request_errors += 1
                        answers.append(None)
            retry = []
            for task, answer in zip(pending, answers):
                item, k, path, digest = task
                attempts[path.name] += 1
                parsed = parse_judge_answer(answer, len(item.testpoints)) if answer is not None else \
                    ParsedAnswer(None, error="the request failed")
                if parsed.scores is None and attempts[path.name] <= max_retries:
                    retry.append(task)
                    continue
                record = {"file": path.name, "index": item.index, "k": k, "testpoints": list(item.testpoints),
                          "scores": parsed.scores, "analysis": parsed.analysis, "error": parsed.error,
                          "attempts": attempts[path.name], "sha1": digest, "answer": answer}
                with lock:
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    out.flush()
                    records[path.name] = record
                    stats.unparsable += parsed.scores is None
            with lock:
                stats.requests += len(pending)
                stats.retries += len(retry)
            pending = retry

    if todo:
        from tqdm.auto import tqdm

        concurrency = getattr(backend, "concurrency", 1) if concurrency is None else concurrency
        bar = tqdm(total=len(todo), desc="judge", unit="img", disable=not progress)
        with answers_path.open("a", encoding="utf-8") as out:
            if out.tell() and not answers_path.read_bytes().endswith(b"\n"):
                out.write("\n")  # a line cut short by a kill: end it, so it does not swallow the next record
            if concurrency > 1:
                with ThreadPoolExecutor(max_workers=concurrency) as pool:
                    futures = [pool.submit(judge_chunk, [t], out) for t in todo]
                    for future in as_completed(futures):
                        future.result()
                        bar.update(1)
            else:
                for start in range(0, len(todo), batch_size):
                    judge_chunk(todo[start:start + batch_size], out)
                    bar.update(len(todo[start:start + batch_size]))
        bar.close()
    return [records[p.name] for _, _, p in tasks], stats


# ---------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------

OVERALL_NOTE = ("primary_mean: mean of the primary-dimension accuracies (the leaderboard's overall); testpoint_mean: "
                "all (image, test point) pairs pooled; sub_dimension_mean: mean of the sub-dimension accuracies")


def _acc(c: int, t: int) -> dict:
    return {"correct": c, "total": t, "accuracy": c / t if t else float("nan")}


def score_answers(bench: UniGenBench, answers: Iterable[Mapping[str, Any]]) -> dict:
    """Accuracies from answer records (``index``, ``testpoints``, ``scores``; unparsable ones have scores None).

    Returns a JSON-ready dict: ``overall`` (primary_mean, testpoint_mean, sub_dimension_mean), ``primary``,
    ``sub_dimension``, ``theme``, ``sub_theme``, ``subject`` (each name -> correct, total, accuracy), ``counts``,
    and ``per_prompt`` (index -> {dimension or "all": [correct, total]}) for :func:`compare_runs`.
    """
    items = bench.by_index()
    groups: dict[str, dict[str, list[int]]] = {g: defaultdict(lambda: [0, 0]) for g in
                                               ("primary", "sub_dimension", "theme", "sub_theme", "subject")}
    per_prompt: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    n_images = n_unparsable = 0
    for record in answers:
        n_images += 1
        scores = record.get("scores")
        if scores is None:
            n_unparsable += 1
            continue
        item = items.get(int(record["index"]))
        if item is None:
            raise UniGenBenchError(f"answer for {record.get('file')}: prompt index {record['index']} is not in "
                                   f"{bench.path}; use the answers of this prompt file")
        for point, score in zip(record["testpoints"], scores):
            hit = int(score == 1)
            keys = {"primary": primary_dimension(point), "sub_dimension": point, "theme": item.theme,
                    "sub_theme": item.theme_sub_theme, "subject": item.subject}
            for group, key in keys.items():
                cell = groups[group][key]
                cell[0] += hit
                cell[1] += 1
            for key in (keys["primary"], "all"):
                cell = per_prompt[item.index][key]
                cell[0] += hit
                cell[1] += 1
    result: dict[str, Any] = {g: {k: _acc(*v) for k, v in sorted(cells.items())} for g, cells in groups.items()}
    pooled = groups["sub_dimension"].values()
    correct, total = sum(c for c, _ in pooled), sum(t for _, t in pooled)

    def mean(group: str) -> float:
        accs = [v["accuracy"] for v in result[group].values()]
        return sum(accs) / len(accs) if accs else float("nan")

    result["overall"] = {"primary_mean": mean("primary"), "testpoint_mean": correct / total if total else float("nan"),
                         "sub_dimension_mean": mean("sub_dimension"), "averaging": OVERALL_NOTE}
    result["counts"] = {"prompts": len(per_prompt), "images": n_images, "judged": n_images - n_unparsable,
                        "unparsable": n_unparsable, "testpoint_judgements": total}
    result["per_prompt"] = {str(i): {k: list(v) for k, v in d.items()} for i, d in sorted(per_prompt.items())}
    return result


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{100 * x:.2f}"


def report_markdown(result: Mapping[str, Any], title: str = "UniGenBench") -> str:
    o, c = result["overall"], result["counts"]
    lines = [f"# {title}", "",
             f"{c['images']} images of {c['prompts']} prompts judged ({c['unparsable']} unparsable answers left out), "
             f"{c['testpoint_judgements']} test-point judgements.", "",
             f"**Overall (mean of primary dimensions, leaderboard): {_fmt(o['primary_mean'])}**; pooled over all "
             f"test points: {_fmt(o['testpoint_mean'])}; mean of sub-dimensions: {_fmt(o['sub_dimension_mean'])}.", ""]
    if os.path.basename(str(result.get("chart", ""))):
        lines += [f"![accuracy per dimension]({os.path.basename(result['chart'])})", ""]
    for group, heading in (("primary", "Primary dimension"), ("sub_dimension", "Sub-dimension (test point)"),
                           ("theme", "Theme"), ("sub_theme", "Sub-theme"), ("subject", "Subject")):
        lines += [f"| {heading} | accuracy (%) | correct / total |", "|---|---:|---:|"]
        lines += [f"| {k} | {_fmt(v['accuracy'])} | {v['correct']} / {v['total']} |" for k, v in result[group].items()]
        lines.append("")
    return "\n".join(lines)


def _chart(result: Mapping[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import warnings

    from matplotlib import font_manager

    # a Chinese file's test point names need a CJK font: add the first one installed (matplotlib falls back glyph by
    # glyph along the family list); without one the names draw as boxes, without a warning per glyph
    installed = {f.name for f in font_manager.fontManager.ttflist}
    cjk = [n for n in ("Noto Sans CJK SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
                       "Microsoft YaHei", "SimHei", "PingFang SC", "Heiti SC", "Arial Unicode MS") if n in installed]
    style = {"font.family": ["sans-serif"], "font.sans-serif": ["DejaVu Sans", *cjk[:1]]} if cjk else {}
    with plt.rc_context(style), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from")
        fig, axes = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [1, 2.4]})
        for ax, group in zip(axes, ("primary", "sub_dimension")):
            names = list(result[group])
            values = [100 * result[group][n]["accuracy"] for n in names]
            ax.barh(range(len(names)), values, color="#4C72B0")
            ax.set_yticks(range(len(names)), names, fontsize=7 if group == "sub_dimension" else 9)
            ax.invert_yaxis()
            ax.set_xlim(0, 100)
            ax.set_xlabel("accuracy (%)")
            ax.set_title("primary dimensions" if group == "primary" else "sub-dimensions")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    return path


def write_outputs(result: dict, out_dir: str | os.PathLike, title: str = "UniGenBench", chart: bool = True,
                  bench: UniGenBench | None = None) -> dict:
    """scores.json, scores.csv (group, name, correct, total, accuracy), report.md, dimensions.png and report.html (one
    self-contained page, the chart inside; with ``bench`` it also lists every judged prompt) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if chart:
        png = _chart(result, out / "dimensions.png")
        if png is not None:
            result["chart"] = png.name
    (out / "scores.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with (out / "scores.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "name", "correct", "total", "accuracy"])
        for key in ("primary_mean", "testpoint_mean", "sub_dimension_mean"):
            writer.writerow(["overall", key, "", "", result["overall"][key]])
        for group in ("primary", "sub_dimension", "theme", "sub_theme", "subject"):
            for name, v in result[group].items():
                writer.writerow([group, name, v["correct"], v["total"], v["accuracy"]])
    (out / "report.md").write_text(report_markdown(result, title) + "\n", encoding="utf-8")
    png = out / result["chart"] if result.get("chart") else None
    prompts = None if bench is None else {it.index: (it.prompt, it.testpoints) for it in bench}
    page = report_html(result, title, png.read_bytes() if png is not None and png.is_file() else None, prompts)
    (out / "report.html").write_text(page, encoding="utf-8")
    return {"json": str(out / "scores.json"), "csv": str(out / "scores.csv"), "markdown": str(out / "report.md"),
            "html": str(out / "report.html")}


def load_result(path: str | os.PathLike) -> dict:
    """A run's scores.json (the file, or the run folder holding it)."""
    path = Path(path)
    path = path / "scores.json" if path.is_dir() else path
    if not path.is_file():
        raise UniGenBenchError(f"{path} does not exist; pass a run folder of `imgalign eval unigenbench` or its "
                               "scores.json")
    result = json.loads(path.read_text(encoding="utf-8"))
    if "per_prompt" not in result:
        raise UniGenBenchError(f"{path} has no per_prompt counts; it was not written by imgalign eval unigenbench")
    return result


def compare_runs(a: Mapping[str, Any], b: Mapping[str, Any], n_boot: int = 2000, seed: int = 0,
                 alpha: float = 0.05) -> dict:
    """Run b minus run a, with paired percentile-bootstrap intervals over the prompts both runs judged.

    Each bootstrap draw resamples prompts with replacement (the same draw for both runs) and recomputes every
    accuracy as correct / total over the drawn prompts, and the overall numbers from them.
    """
    import numpy as np

    common = sorted(set(a["per_prompt"]) & set(b["per_prompt"]), key=int)
    if not common:
        raise UniGenBenchError("the two runs share no judged prompt; compare runs of the same prompt file")
    dims = sorted({d for run in (a, b) for i in common for d in run["per_prompt"][i]} - {"all"})
    keys = dims + ["all"]

    def counts(run):  # [P, D] correct and total
        c = np.zeros((len(common), len(keys)))
        t = np.zeros_like(c)
        for p, i in enumerate(common):
            for d, key in enumerate(keys):
                c[p, d], t[p, d] = run["per_prompt"][i].get(key, (0, 0))
        return c, t

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(common), size=(n_boot, len(common)))
    weights = np.stack([np.bincount(row, minlength=len(common)) for row in draws]).astype(float)  # [B, P]
    weights = np.vstack([np.ones(len(common)), weights])  # row 0: the full sample

    def metrics(c, t):  # [B+1, M]: per-dimension accuracies, primary_mean, testpoint_mean
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = (weights @ c) / (weights @ t)
        return np.column_stack([acc[:, :-1], np.nanmean(acc[:, :-1], axis=1), acc[:, -1]])

    ma, mb = metrics(*counts(a)), metrics(*counts(b))
    names = [f"primary/{d}" for d in dims] + ["overall/primary_mean", "overall/testpoint_mean"]
    rows = {}
    for m, name in enumerate(names):
        delta = mb[:, m] - ma[:, m]
        finite = delta[1:][np.isfinite(delta[1:])]
        lo, hi = (np.quantile(finite, [alpha / 2, 1 - alpha / 2]) if len(finite) else (np.nan, np.nan))
        rows[name] = {"a": float(ma[0, m]), "b": float(mb[0, m]), "delta": float(delta[0]), "lo": float(lo),
                      "hi": float(hi)}
    return {"prompts": len(common), "n_boot": n_boot, "confidence": 1 - alpha, "metrics": rows}


def write_compare_outputs(cmp: Mapping[str, Any], out_dir: str | os.PathLike, name_a: str = "a",
                          name_b: str = "b") -> str:
    """compare.json, compare.md and compare.html (self-contained) in out_dir; returns the markdown."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(cmp, indent=2) + "\n", encoding="utf-8")
    text = compare_markdown(cmp, name_a, name_b)
    (out / "compare.md").write_text(text, encoding="utf-8")
    (out / "compare.html").write_text(compare_html(cmp, name_a, name_b), encoding="utf-8")
    return text


def compare_markdown(cmp: Mapping[str, Any], name_a: str = "a", name_b: str = "b") -> str:
    lines = [f"# UniGenBench: {name_b} vs {name_a}", "",
             f"Paired bootstrap over {cmp['prompts']} prompts ({cmp['n_boot']} draws, "
             f"{100 * cmp['confidence']:.0f}% intervals of {name_b} - {name_a}, accuracy in %).", "",
             f"| metric | {name_a} | {name_b} | difference | interval |", "|---|---:|---:|---:|---:|"]
    for name, r in cmp["metrics"].items():
        lines.append(f"| {name} | {_fmt(r['a'])} | {_fmt(r['b'])} | {_fmt(r['delta'])} | "
                     f"[{_fmt(r['lo'])}, {_fmt(r['hi'])}] |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Generation, and scoring a folder with a pointwise reward
# ---------------------------------------------------------------------------------------------------------


def image_seed(seed: int, index: int, k: int) -> int:
    """The seed of image k of prompt ``index``: each image has its own generator, so any subset can be redone."""
    return seed * 1_000_003 + index * 1_000 + k


def generate_images(pipe: Callable, bench: UniGenBench, out_dir: str | os.PathLike, *,
                    images_per_prompt: int = IMAGES_PER_PROMPT, seed: int = 0, num_inference_steps: int = 30,
                    guidance_scale: float = 5.0, size: int | None = None, suffix: str = ".png",
                    progress: bool = True, **pipe_kwargs: Any) -> int:
    """Write ``{index}_{k}.png`` for every prompt with a diffusers pipeline; existing files are kept (resume).
    Each image is written to a temporary name and renamed, so a killed run never leaves half an image. Returns the
    number of images written."""
    import torch
    from tqdm.auto import tqdm

    from imgalign.data.images import save_image_whole

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    written = 0
    for item in tqdm(list(bench), desc="generate", unit="prompt", disable=not progress):
        todo = [k for k in range(images_per_prompt) if not (out / image_name(item.index, k, suffix)).is_file()]
        if not todo:
            continue
        generators = [torch.Generator("cpu").manual_seed(image_seed(seed, item.index, k)) for k in todo]
        extra = {"height": size, "width": size} if size else {}
        images = pipe(prompt=item.prompt, num_images_per_prompt=len(todo), generator=generators,
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      **extra, **pipe_kwargs).images
        for k, image in zip(todo, images):
            save_image_whole(image, out / image_name(item.index, k, suffix))
            written += 1
    return written


def score_folder_with_reward(bench: UniGenBench, images_dir: str | os.PathLike, reward: Any, *,
                             images_per_prompt: int = IMAGES_PER_PROMPT, batch_size: int = 16,
                             suffix: str = ".png") -> dict:
    """Score ``{index}_{k}.png`` with a pointwise reward of the reward layer: per-image scores, the mean with a
    bootstrap interval over prompts, and the mean per theme and sub-theme."""
    import numpy as np

    from imgalign.data.images import read_image
    from imgalign.eval.preference import bootstrap_ci

    if getattr(reward, "pairwise", False):
        raise UniGenBenchError(f"reward '{getattr(reward, 'name', reward)}' is pairwise; a folder is scored with a "
                               "pointwise reward (a pairwise judge's win rates: `imgalign score`)")
    tasks = [(item, path) for item, _, path in image_tasks(bench, images_dir, images_per_prompt, suffix)]
    scores: list[float] = []
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start:start + batch_size]
        values = reward.score([read_image(p) for _, p in chunk], [it.prompt for it, _ in chunk])
        scores.extend(float(v) for v in values)
    per_prompt: dict[int, list[float]] = defaultdict(list)
    by_group: dict[str, dict[str, list[float]]] = {"theme": defaultdict(list), "sub_theme": defaultdict(list)}
    for (item, _), s in zip(tasks, scores):
        per_prompt[item.index].append(s)
        by_group["theme"][item.theme].append(s)
        by_group["sub_theme"][item.theme_sub_theme].append(s)
    prompt_means = np.array([np.nanmean(v) for v in per_prompt.values()])
    mean, lo, hi = bootstrap_ci(prompt_means[np.isfinite(prompt_means)])
    return {"reward": getattr(reward, "name", type(reward).__name__), "images": len(tasks), "mean": mean,
            "lo": lo, "hi": hi,
            "theme": {k: float(np.nanmean(v)) for k, v in sorted(by_group["theme"].items())},
            "sub_theme": {k: float(np.nanmean(v)) for k, v in sorted(by_group["sub_theme"].items())},
            "per_image": [{"file": p.name, "index": it.index, "score": s} for (it, p), s in zip(tasks, scores)]}


# ---------------------------------------------------------------------------------------------------------
# Command line: imgalign eval unigenbench
# ---------------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    """The arguments of `imgalign eval unigenbench` (registered by imgalign.eval.cli)."""
    p.add_argument("--prompts", help="UniGenBench CSV (test_prompts_en.csv, _en_long, _zh, _zh_long)")
    p.add_argument("--out", required=True, help="run folder: images/, answers.jsonl, scores.json/.csv, report.md, "
                   "report.html")
    p.add_argument("--images", help="folder of {index}_{k}.png (default OUT/images); generated there with --model")
    p.add_argument("--model", help="pipeline (hub id or folder) to generate the missing images with")
    p.add_argument("--lora", help="folder with pytorch_lora_weights.safetensors for --model")
    p.add_argument("--images-per-prompt", type=int, default=IMAGES_PER_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (smoke runs)")
    p.add_argument("--judge", choices=("openai", "transformers"), default="openai",
                   help="judge backend: an OpenAI-compatible endpoint or a local transformers VLM")
    p.add_argument("--base-url", default=None,
                   help="endpoint root, e.g. http://localhost:8000/v1 (default: $IMGALIGN_JUDGE_BASE_URL)")
    p.add_argument("--judge-model", default=None, help="judge model name (served) or path (transformers); default "
                   "$IMGALIGN_JUDGE_MODEL")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--concurrency", type=int, default=8, help="HTTP requests in flight")
    p.add_argument("--max-retries", type=int, default=10, help="re-asks of an unparsable answer")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--definitions", help="JSON file {test point: definition} added to the built-in definitions of "
                   "the file's language (English or Chinese)")
    p.add_argument("--retry-temperature", type=float, default=0.7, help="re-asks after an unparsable answer are "
                   "sampled at this temperature (0: greedy, the same answer again)")
    p.add_argument("--max-new-tokens", type=int, default=4096, help="longest judge answer (the reference: 4096)")
    p.add_argument("--judge-dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="--judge transformers: weight dtype")
    p.add_argument("--judge-device-map", default=None, help="--judge transformers: e.g. auto, to spread a 32B/72B "
                   "judge over the GPUs (instead of --device)")
    p.add_argument("--judge-batch-size", type=int, default=4, help="--judge transformers: images per generate call")
    p.add_argument("--image-format", choices=("JPEG", "PNG"), default="JPEG", help="how images travel over HTTP")
    p.add_argument("--reward", help="score the folder with this pointwise reward instead of a judge (e.g. toy, clip)")
    p.add_argument("--reward-arg", action="append", default=[], metavar="KEY=VALUE", help="reward constructor argument")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="compare two runs (folders or scores.json)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    out = Path(args.out)
    if args.compare:
        a, b = (load_result(x) for x in args.compare)
        cmp = compare_runs(a, b)
        text = write_compare_outputs(cmp, out, Path(args.compare[0]).name, Path(args.compare[1]).name)
        print(text)
        return 0
    if not args.prompts:
        raise UniGenBenchError("give --prompts CSV (a UniGenBench prompt file), or --compare RUN_A RUN_B")
    bench = load_unigenbench(args.prompts).head(args.limit)
    for warning in bench.warnings:
        print(f"note: {warning}")
    images = Path(args.images) if args.images else out / "images"
    if args.model:
        from imgalign.models.adapters import load_adapter

        adapter = load_adapter(args.model, device=args.device)
        if args.lora:
            adapter.pipe.load_lora_weights(args.lora)
        n = generate_images(adapter.pipe, bench, images, images_per_prompt=args.images_per_prompt, seed=args.seed,
                            num_inference_steps=args.steps, guidance_scale=args.guidance_scale, size=args.size,
                            progress=not args.quiet)
        print(f"generated {n} images in {images}")
    image_tasks(bench, images, args.images_per_prompt)  # every image is there before a reward or judge loads
    if args.reward:
        from imgalign.rewards.registry import build_reward, parse_value

        kwargs = {}
        for item in args.reward_arg:
            key, sep, value = item.partition("=")
            if not sep:
                raise UniGenBenchError(f"--reward-arg {item!r}: expected KEY=VALUE")
            kwargs[key] = parse_value(value)
        result = score_folder_with_reward(bench, images, build_reward(args.reward, **kwargs),
                                          images_per_prompt=args.images_per_prompt)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"reward_{args.reward}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"{args.reward}: {result['mean']:.4f} [{result['lo']:.4f}, {result['hi']:.4f}] over "
              f"{len(bench)} prompts ({result['images']} images) -> {out / f'reward_{args.reward}.json'}")
        return 0
    model = args.judge_model or os.environ.get("IMGALIGN_JUDGE_MODEL")
    if not model:
        raise UniGenBenchError("give --judge-model (or set IMGALIGN_JUDGE_MODEL), e.g. "
                               "CodeGoat24/UniGenBench-EvalModel-qwen3vl-32b-v1 served by vLLM")
    if args.judge == "openai":
        base_url = args.base_url or os.environ.get("IMGALIGN_JUDGE_BASE_URL")
        if not base_url:
            raise UniGenBenchError("give --base-url (or set IMGALIGN_JUDGE_BASE_URL), e.g. http://localhost:8000/v1")
        backend = make_judge_backend("openai", base_url=base_url, model=model, api_key_env=args.api_key_env,
                                     concurrency=args.concurrency, timeout=args.timeout, max_tokens=args.max_new_tokens,
                                     image_format=args.image_format, retry_temperature=args.retry_temperature)
    else:
        import torch

        dtype = None if args.judge_dtype == "auto" else getattr(torch, args.judge_dtype)
        backend = make_judge_backend("transformers", model=model, device=args.device, dtype=dtype,
                                     device_map=args.judge_device_map, batch_size=args.judge_batch_size,
                                     max_new_tokens=args.max_new_tokens, retry_temperature=args.retry_temperature)
    definitions: dict[str, str] = {}  # added to the file language's built-in definitions (judge_prompt)
    if args.definitions:
        try:
            extra = json.loads(Path(args.definitions).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UniGenBenchError(f"--definitions {args.definitions}: {e}; give a JSON object "
                                   "{\"test point\": \"definition\"}") from None
        if not isinstance(extra, dict):
            raise UniGenBenchError(f"--definitions {args.definitions}: expected a JSON object, got {type(extra).__name__}")
        definitions.update({str(k): str(v) for k, v in extra.items()})
    answers, stats = judge_images(bench, images, backend, out / ANSWERS_FILE, images_per_prompt=args.images_per_prompt,
                                  max_retries=args.max_retries, definitions=definitions, progress=not args.quiet)
    result = score_answers(bench, answers)
    result["judge"] = {"backend": args.judge, "model": model, **vars(stats)}
    paths = write_outputs(result, out, title=f"UniGenBench: {Path(args.prompts).name}", bench=bench)
    o = result["overall"]
    print(f"overall {_fmt(o['primary_mean'])} (mean of primary dimensions), {_fmt(o['testpoint_mean'])} (all test "
          f"points); {stats.cached} cached, {stats.asked} asked, {stats.retries} retries, {stats.unparsable} "
          f"unparsable -> {paths['markdown']}")
    return 0
