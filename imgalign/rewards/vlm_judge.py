"""Pairwise VLM judge in the UnifiedReward style (Wang et al., 2025; the reward of Pref-GRPO).

The judge sees image 1, image 2 and the caption, and is asked which image matches the caption better and looks
better, ending with one of the conclusions UnifiedReward's pairwise models are trained to give: "Image 1 is
better.", "Image 2 is better." or "Both images are equally good." :func:`parse_verdict` reads the verdict from
free-form output (markdown, thinking blocks, "Answer: 2", score pairs, ...). Ties and unparseable answers count
0.5. With ``swap=True`` every pair is also judged in the opposite order and the two verdicts are averaged,
P(a > b) = (v(a, b) + 1 - v(b, a)) / 2, which cancels a judge's position bias (one that always picks the first
image gives exactly 0.5).

Backends (anything with ``generate(requests) -> list[str]`` works):

- :class:`OpenAIJudgeBackend`: an OpenAI-compatible ``/v1/chat/completions`` endpoint, the way vLLM and SGLang
  serve judges (``vllm serve CodeGoat24/UnifiedReward-2.0-qwen3vl-8b``). Images travel as base64 data URLs.
  A batch is sent as concurrent requests (``concurrency``), each with a ``timeout`` and ``max_retries`` retries
  with exponential backoff on connection errors, timeouts, 429 and 5xx; the server batches them.
- :class:`TransformersJudgeBackend`: a local transformers vision-language model (``AutoModelForImageTextToText``
  + ``AutoProcessor`` with a chat template: LLaVA, Qwen2.5-VL and Qwen3-VL are tested), greedy decoding in batches;
  ``device_map="auto"`` spreads a large judge over the GPUs.
- :class:`CallableJudgeBackend`: wraps ``fn(image_1, image_2, text) -> str``.

The HTTP and transformers backends take requests with one image (``image_2=None``: UniGenBench's judge) or two.
A request's ``attempt`` > 0 marks a re-ask after an unusable answer: it is sampled at ``retry_temperature``
(default 0.7) instead of decoded greedily, since a greedy judge asked again repeats the same answer.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .base import PairwiseReward
from .images import unit_to_pil
from .loading import from_pretrained

DEFAULT_TEMPLATE = (
    "You are given a text caption and two generated images, Image 1 (shown first) and Image 2 (shown second). "
    "Judge which image is better: first how faithfully it shows everything the caption asks for (objects, "
    "counts, colours, attributes, spatial relations), then its overall visual quality (coherence, artifacts, "
    "aesthetics). Explain briefly, then finish with exactly one conclusion: \"Image 1 is better.\", "
    "\"Image 2 is better.\" or \"Both images are equally good.\"\n"
    "Text Caption: [{prompt}]"
)


# ---------------------------------------------------------------------------------------------------------
# Verdict parsing
# ---------------------------------------------------------------------------------------------------------

_ADVERBS = r"(?:(?:clearly|slightly|much|far|significantly|definitely|overall|marginally|a\s+bit|somewhat|the)\s+)*"
_COPULA = r"(?:(?:is|was|seems|appears|looks|seems\s+to\s+be|appears\s+to\s+be)\s+)?"
_BETTER = (
    rf"{_COPULA}{_ADVERBS}(?:better|superior|preferred|preferable|stronger|the\s+winner|the\s+best|wins|"
    r"more\s+(?:aligned|accurate|faithful|appealing|consistent|preferable))\b"
)
_WORSE = rf"{_COPULA}{_ADVERBS}(?:worse|inferior|weaker|not\s+as\s+good|less\s+(?:aligned|accurate|faithful|appealing|preferred))\b"
_NOUN = r"(?:image|picture|img|photo|option|candidate|generation)"
_FIRST = rf"(?:{_NOUN}\s*[-#_]?\s*(?:1|one|a)\b(?!\.\d)|(?:the\s+)?(?:first|left|1st)\s+(?:{_NOUN}|one))"
_SECOND = rf"(?:{_NOUN}\s*[-#_]?\s*(?:2|two|b)\b(?!\.\d)|(?:the\s+)?(?:second|right|2nd)\s+(?:{_NOUN}|one))"
_CHOOSE = r"(?:i\s+)?(?:would\s+)?(?:prefer(?:s|red)?|choose|chose|pick|select|favou?r|vote\s+for)\s+"
_TIE = (
    r"(?:\b(?:both|the\s+two)\s+(?:images\s+|pictures\s+)?(?:are\s+)?(?:(?:about|roughly|almost)\s+)?"
    r"(?:equally|similarly|equal(?:ly)?\s+in\s+quality)\b"
    r"|\bequally\s+(?:good|bad|well|preferred|matched)\b|\b(?:it'?s\s+)?an?\s+(?:tie|draw)\b|\btie\b"
    r"|\bneither\s+(?:image\s+|one\s+)?is\s+(?:clearly\s+)?better\b|\bno\s+(?:clear\s+)?(?:winner|preference)\b"
    r"|\bequal\s+(?:quality|preference)\b)"
)
_KEYWORD = r"(?:final\s+answer|answer|verdict|choice|winner|decision|conclusion|result|output|preference|better\s+image)"
_VERBAL = [
    (re.compile(_TIE), 0.5),
    (re.compile(rf"{_FIRST}\s+{_BETTER}"), 1.0),
    (re.compile(rf"{_SECOND}\s+{_BETTER}"), 0.0),
    (re.compile(rf"{_FIRST}\s+{_WORSE}"), 0.0),
    (re.compile(rf"{_SECOND}\s+{_WORSE}"), 1.0),
    (re.compile(rf"{_CHOOSE}{_FIRST}"), 1.0),
    (re.compile(rf"{_CHOOSE}{_SECOND}"), 0.0),
    (re.compile(rf"\b{_KEYWORD}\s*(?:is|:|=|-)?\s*(?:that\s+)?{_FIRST}"), 1.0),
    (re.compile(rf"\b{_KEYWORD}\s*(?:is|:|=|-)?\s*(?:that\s+)?{_SECOND}"), 0.0),
    (re.compile(rf"\b{_KEYWORD}\s*(?:is|:|=|-)?\s*[\[(\"']*\s*(?:1|one|first|a(?=\s*(?:$|[\])\"'.,;!])))(?![\w.])"), 1.0),
    (re.compile(rf"\b{_KEYWORD}\s*(?:is|:|=|-)?\s*[\[(\"']*\s*(?:2|two|second|b(?=\s*(?:$|[\])\"'.,;!])))(?![\w.])"), 0.0),
    (re.compile(rf"\b{_KEYWORD}\s*(?:is|:|=|-)?\s*(?:an?\s+)?(?:tie|draw|equal|both)\b"), 0.5),
]
_SCORE_1 = re.compile(r"\b(?:image|picture)\s*[-#]?\s*1\s*(?:score|rating)?\s*[:=]\s*(\d+(?:\.\d+)?)")
_SCORE_2 = re.compile(r"\b(?:image|picture)\s*[-#]?\s*2\s*(?:score|rating)?\s*[:=]\s*(\d+(?:\.\d+)?)")
_BARE = {
    "1": 1.0, "one": 1.0, "a": 1.0, "first": 1.0, "image 1": 1.0, "image one": 1.0, "image a": 1.0, "left": 1.0,
    "2": 0.0, "two": 0.0, "b": 0.0, "second": 0.0, "image 2": 0.0, "image two": 0.0, "image b": 0.0, "right": 0.0,
    "tie": 0.5, "equal": 0.5, "both": 0.5, "draw": 0.5, "same": 0.5,
}
_CONCLUSION_MARK = re.compile(r"(?:final\s+answer|conclusion|verdict|final\s+verdict|therefore|overall|in\s+summary)\s*[:,-]?")


def _clean(text: str) -> str:
    text = text.replace("\u2019", "'")
    text = re.sub(r"[*_`#>]+", " ", text)  # markdown emphasis, headers, code
    text = re.sub(r"[ \t]+", " ", text)
    return text.lower().strip()


def _last_verdict(text: str) -> float | None:
    """The verdict whose match *ends* last in ``text`` (conclusions come at the end)."""
    best: tuple[int, float] | None = None
    for pattern, value in _VERBAL:
        for match in pattern.finditer(text):
            if best is None or match.end() > best[0]:
                best = (match.end(), value)
    return None if best is None else best[1]


def parse_verdict(text: str | None) -> float | None:
    """P(image 1 preferred) read from a judge's answer: 1.0 (image 1), 0.0 (image 2), 0.5 (tie), None (unreadable).

    Strips ``<think>`` blocks and markdown; prefers what follows the last "conclusion / final answer" marker;
    otherwise takes the last verdict in the text; falls back to "Image 1: 7, Image 2: 5"-style score pairs and to
    bare answers ("2", "[[A]]", "Image 1").
    """
    if not text:
        return None
    raw = text
    if "</think>" in raw:
        after = raw.rsplit("</think>", 1)[1]
        # the answer follows the thinking; if nothing does, fall back to what the model thought
        raw = after if after.strip() else raw.replace("<think>", " ").replace("</think>", " ")
    elif "<think>" in raw:  # an unclosed thinking block: the model never finished
        raw = raw.replace("<think>", " ")
    text = _clean(raw)
    if not text:
        return None
    marks = list(_CONCLUSION_MARK.finditer(text))
    if marks:
        verdict = _last_verdict(text[marks[-1].start() :])
        if verdict is not None:
            return verdict
    verdict = _last_verdict(text)
    if verdict is not None:
        return verdict
    s1, s2 = _SCORE_1.findall(text), _SCORE_2.findall(text)
    if s1 and s2:  # the last pair is the final one (per-dimension scores come first)
        a, b = float(s1[-1]), float(s2[-1])
        return 1.0 if a > b else 0.0 if a < b else 0.5
    bare = re.sub(r"[\[\]().,;:!\"'{}]+", " ", text).strip()
    bare = re.sub(r"\s+", " ", bare)
    return _BARE.get(bare)


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------


@dataclass
class JudgeRequest:
    image_1: Any  # PIL image
    image_2: Any  # PIL image (None for single-image judges such as UniGenBench's)
    text: str  # the full instruction, caption included
    attempt: int = 0  # 0: first ask; n > 0: the n-th re-ask after an unusable answer (backends may sample then)


class JudgeBackend(Protocol):
    def generate(self, requests: Sequence[JudgeRequest]) -> list[str]: ...


class JudgeRequestError(RuntimeError):
    """A judge request failed for good (after retries, or with a non-retryable HTTP status)."""


class CallableJudgeBackend:
    """``fn(image_1, image_2, text) -> str`` as a backend (tests, custom clients)."""

    def __init__(self, fn: Callable[[Any, Any, str], str]):
        self.fn = fn

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str]:
        return [self.fn(r.image_1, r.image_2, r.text) for r in requests]


def image_data_url(image, image_format: str = "JPEG", quality: int = 95) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=image_format, **({"quality": quality} if image_format == "JPEG" else {}))
    mime = "jpeg" if image_format.upper() == "JPEG" else image_format.lower()
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


class OpenAIJudgeBackend:
    """OpenAI-compatible chat-completions client (vLLM / SGLang / any compatible server), stdlib only.

    ``base_url`` is the API root (e.g. ``http://localhost:8000/v1``); ``api_key`` defaults to the environment
    variable named by ``api_key_env`` (``OPENAI_API_KEY``), and may be empty for local servers.
    """

    retry_statuses = (408, 409, 425, 429, 500, 502, 503, 504)

    def __init__(
        self,
        base_url: str = "http://localhost:8000/v1",
        model: str = "CodeGoat24/UnifiedReward-2.0-qwen3vl-8b",
        *,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        concurrency: int = 8,
        max_tokens: int = 512,
        temperature: float = 0.0,
        retry_temperature: float = 0.7,
        image_format: str = "JPEG",
        jpeg_quality: int = 95,
        extra_body: dict[str, Any] | None = None,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env, "")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = max(1, concurrency)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.retry_temperature = retry_temperature
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.extra_body = dict(extra_body or {})
        self.stats = {"requests": 0, "retries": 0, "failures": 0}
        self._lock = threading.Lock()

    def payload(self, request: JudgeRequest) -> dict[str, Any]:
        """The images (one or two, in order), then the text; re-asks at ``max(temperature, retry_temperature)``."""
        content = [
            {"type": "image_url", "image_url": {"url": image_data_url(image, self.image_format, self.jpeg_quality)}}
            for image in (request.image_1, request.image_2) if image is not None
        ]
        content.append({"type": "text", "text": request.text})
        temperature = max(self.temperature, self.retry_temperature) if request.attempt else self.temperature
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.max_tokens,
            "temperature": temperature,
            **self.extra_body,
        }

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                with self._lock:
                    self.stats["retries"] += 1
                # exponential backoff with jitter, capped at 30 s
                time.sleep(min(30.0, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _message_text(json.loads(response.read().decode("utf-8")))
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode("utf-8", "replace")[:300]
                if exc.code not in self.retry_statuses:
                    raise JudgeRequestError(f"judge endpoint {self.url} answered HTTP {exc.code}: {detail}") from exc
                last_error = JudgeRequestError(f"HTTP {exc.code}: {detail}")
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                last_error = exc
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
                last_error = JudgeRequestError(f"malformed response from {self.url}: {exc}")
        raise JudgeRequestError(
            f"judge endpoint {self.url} failed after {self.max_retries + 1} attempts: {last_error}"
        ) from last_error

    def _one(self, request: JudgeRequest) -> str:
        with self._lock:
            self.stats["requests"] += 1
        try:
            return self._post(json.dumps(self.payload(request)).encode("utf-8"))
        except JudgeRequestError:
            with self._lock:
                self.stats["failures"] += 1
            raise

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str]:
        if len(requests) <= 1 or self.concurrency == 1:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            return list(pool.map(self._one, requests))  # keeps the order of the requests


def _message_text(response: dict[str, Any]) -> str:
    content = response["choices"][0]["message"].get("content")
    if content is None:
        return ""
    if isinstance(content, list):  # some servers return content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


class TransformersJudgeBackend:
    """A local transformers VLM (``AutoModelForImageTextToText``) with its processor's chat template.

    Each request becomes one user turn: its images (one or two) as image entries, then the text; the processor
    expands the image placeholders (e.g. Qwen-VL's ``<|image_pad|>``) and batches with left padding. First asks are
    decoded greedily; re-asks (``attempt > 0``) are sampled at ``retry_temperature`` with top-k / top-p off (Qwen2.5-VL's
    recommended generation settings, top_k=1 and top_p=0.001, would make sampling greedy again), from a seed fixed per
    attempt so a rerun draws the same answers. ``device_map`` (e.g. "auto") loads a large model across the GPUs
    with accelerate instead of moving it to ``device``.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        processor: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_new_tokens: int = 512,
        batch_size: int = 4,
        retry_temperature: float = 0.7,
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        load_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        self.model = from_pretrained(AutoModelForImageTextToText, model, param="model", **load_kwargs)
        if device_map is None:
            self.model.to(device)
        self.model.eval().requires_grad_(False)
        self.processor = from_pretrained(AutoProcessor, processor or model, param="processor",
                                         trust_remote_code=trust_remote_code)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only generation needs left padding in a batch
            if tokenizer.pad_token is None and tokenizer.eos_token is not None:
                tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; batches only need some id
        # inputs go where the model's embeddings are (the first device of a device_map)
        self.device = self.model.device if device_map is not None else torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.batch_size = max(1, batch_size)
        self.retry_temperature = retry_temperature
        self.seed = seed

    def _prompt(self, request: JudgeRequest) -> tuple[str, list[Any]]:
        images = [image for image in (request.image_1, request.image_2) if image is not None]
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": request.text}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
        return text, images

    def _generate(self, chunk: Sequence[JudgeRequest], sample: bool) -> list[str]:
        prompts = [self._prompt(r) for r in chunk]
        inputs = self.processor(text=[t for t, _ in prompts], images=[i for _, images in prompts for i in images],
                                return_tensors="pt", padding=True).to(self.device)
        options: dict[str, Any] = {"do_sample": False}
        if sample:
            options = {"do_sample": True, "temperature": self.retry_temperature, "top_k": 0, "top_p": 1.0}
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=sample):
            if sample:
                torch.manual_seed(self.seed + max(r.attempt for r in chunk))
            generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **options)
        new_tokens = generated[:, inputs["input_ids"].shape[1] :]  # [batch, new tokens], after the left-padded prompt
        return self.processor.batch_decode(new_tokens, skip_special_tokens=True)

    def generate(self, requests: Sequence[JudgeRequest]) -> list[str]:
        outputs: list[str | None] = [None] * len(requests)
        for sample in (False, True):  # first asks greedy, re-asks sampled; each in batches
            chosen = [i for i, r in enumerate(requests) if bool(r.attempt and self.retry_temperature > 0) == sample]
            for start in range(0, len(chosen), self.batch_size):
                ids = chosen[start : start + self.batch_size]
                for i, text in zip(ids, self._generate([requests[i] for i in ids], sample)):
                    outputs[i] = text
        return outputs  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------------------


class VLMJudge(PairwiseReward):
    """Pairwise judge reward: ``compare(a, b, prompts)`` = P(a preferred), ``group_win_rates`` over all pairs.

    ``backend``: ``"openai"`` (kwargs go to :class:`OpenAIJudgeBackend`: ``base_url``, ``model``, ``timeout``,
    ``max_retries``, ``concurrency``, ...), ``"transformers"`` (kwargs to :class:`TransformersJudgeBackend`:
    ``model``, ...), a backend object, or a callable ``fn(image_1, image_2, text) -> str``.
    ``on_error="tie"`` turns failed requests into 0.5 (counted in ``stats``) instead of raising.
    """

    name = "vlm_judge"

    def __init__(
        self,
        backend: str | JudgeBackend | Callable[[Any, Any, str], str] = "openai",
        *,
        swap: bool = True,
        template: str = DEFAULT_TEMPLATE,
        on_error: str = "raise",
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        batch_size: int | None = None,
        **backend_kwargs: Any,
    ):
        super().__init__(device=device, dtype=dtype, batch_size=batch_size)
        if "{prompt}" not in template:
            raise ValueError("the judge template must contain '{prompt}' where the caption goes")
        if on_error not in ("raise", "tie"):
            raise ValueError(f"on_error must be 'raise' or 'tie', got {on_error!r}")
        if backend == "openai":
            self.backend = OpenAIJudgeBackend(**backend_kwargs)
        elif backend == "transformers":
            backend_kwargs.setdefault("device", self.device)
            self.backend = TransformersJudgeBackend(**backend_kwargs)
        elif hasattr(backend, "generate"):
            self.backend = backend
        elif callable(backend):
            self.backend = CallableJudgeBackend(backend)
        else:
            raise ValueError(f"backend must be 'openai', 'transformers', a backend or a callable, got {backend!r}")
        self.swap = swap
        self.template = template
        self.on_error = on_error
        self.stats = {"judgements": 0, "unparseable": 0, "ties": 0, "errors": 0}
        self.last_outputs: list[str] = []

    def modules(self) -> dict[str, torch.nn.Module]:
        model = getattr(self.backend, "model", None)
        return {"model": model} if isinstance(model, torch.nn.Module) else {}

    def _judge(self, requests: list[JudgeRequest]) -> list[float]:
        try:
            texts = self.backend.generate(requests)
        except JudgeRequestError:
            if self.on_error == "raise":
                raise
            texts = None
        if texts is None:  # a failed batch: judge one by one so one bad request does not sink the others
            texts = []
            for request in requests:
                try:
                    texts.extend(self.backend.generate([request]))
                except JudgeRequestError:
                    self.stats["errors"] += 1
                    texts.append("")
        self.last_outputs = list(texts)
        verdicts = []
        for text in texts:
            verdict = parse_verdict(text)
            self.stats["judgements"] += 1
            if verdict is None:
                self.stats["unparseable"] += 1
                verdict = 0.5
            elif verdict == 0.5:
                self.stats["ties"] += 1
            verdicts.append(verdict)
        return verdicts

    def _compare(self, images_a, images_b, prompts, **kwargs) -> torch.Tensor:
        pil_a, pil_b = unit_to_pil(images_a), unit_to_pil(images_b)
        if prompts is None:
            raise ValueError("the VLM judge needs the prompts")
        texts = [self.template.format(prompt=p) for p in prompts]
        requests = [JudgeRequest(a, b, t) for a, b, t in zip(pil_a, pil_b, texts)]
        if self.swap:
            requests += [JudgeRequest(b, a, t) for a, b, t in zip(pil_a, pil_b, texts)]
        verdicts = torch.tensor(self._judge(requests), dtype=torch.float32)
        batch = len(pil_a)
        if not self.swap:
            return verdicts
        forward, backward = verdicts[:batch], verdicts[batch:]
        return 0.5 * (forward + (1.0 - backward))
