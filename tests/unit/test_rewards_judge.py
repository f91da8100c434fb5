"""VLM pairwise judge: verdict parser, order swap, OpenAI-compatible HTTP backend on loopback, local VLM backend."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from imgalign.rewards import build_reward
from imgalign.rewards.vlm_judge import (
    JudgeRequestError,
    OpenAIJudgeBackend,
    VLMJudge,
    parse_verdict,
)

# (judge output, expected P(image 1 preferred)); None = unparseable
CORPUS = [
    ("Image 1 is better.", 1.0),
    ("Image 2 is better.", 0.0),
    ("Both images are equally good.", 0.5),
    ("**Image 2** is better", 0.0),
    ("Conclusion: Image 2 is better than Image 1.", 0.0),
    ("Image 1 is better than Image 2 in every respect.", 1.0),
    ("The first image is clearly superior.", 1.0),
    ("I think the second image is better aligned with the caption.", 0.0),
    ("Image one is better", 1.0),
    ("image #2 is the better one", 0.0),
    ("Image 1 is worse than image 2.", 0.0),
    ("Image 2 is not as good as Image 1.", 1.0),
    ("Image 2 is less aligned with the caption.", 1.0),
    ("I prefer Image 2.", 0.0),
    ("I would choose image 1.", 1.0),
    ("Answer: 2", 0.0),
    ("Final answer: Image 1", 1.0),
    ("[[A]]", 1.0),
    ("B", 0.0),
    ("2", 0.0),
    ("The better image is Image 2.", 0.0),
    ("Answer: A tie.", 0.5),
    ("It's a tie.", 0.5),
    ("Neither image is better; both miss the blue square.", 0.5),
    ("Both images are about equally good at following the prompt.", 0.5),
    # the conclusion wins over earlier statements
    ("Image 1 is better in colour, but overall Image 2 is better.", 0.0),
    ("Image 1 is better at first glance. However, looking at the counts, Image 2 is better.", 0.0),
    ("Image 2 is more faithful. Conclusion: Image 1 is better.", 1.0),
    # thinking blocks are skipped
    ("<think>Image 2 looks better at first... no.</think>\nImage 1 is better.", 1.0),
    ("<think>hmm, Image 1 is better</think>", 1.0),
    # score pairs (UnifiedReward-2.0 style); the last pair is the final one
    ("Alignment: Image 1: 0.3, Image 2: 0.7\nFinal Score: Image 1: 0.6, Image 2: 0.4", 1.0),
    ("Image 1 score: 6/10\nImage 2 score: 8/10", 0.0),
    ("Image 1: 5, Image 2: 5", 0.5),
    # unreadable
    ("", None),
    ("I cannot see any images.", None),
    ("Image 1 shows a cat. Image 2 shows a dog.", None),
    ("Image 1 is not better than image 2.", None),
    (None, None),
]


@pytest.mark.parametrize("text, expected", CORPUS)
def test_parse_verdict_corpus(text, expected):
    assert parse_verdict(text) == expected


def _images(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 24, 24, generator=generator)


def test_order_swap_cancels_position_bias():
    """A judge that always answers "Image 1 is better." is pure position bias: with swap every pair is 0.5."""
    calls = []

    def always_first(image_1, image_2, text):
        calls.append(text)
        return "Image 1 is better."

    a, b = _images(3), _images(3, seed=1)
    biased = VLMJudge(backend=always_first, swap=False)
    assert biased.compare(a, b, "a red circle").tolist() == [1.0, 1.0, 1.0]
    fair = VLMJudge(backend=always_first, swap=True)
    assert fair.compare(a, b, "a red circle").tolist() == [0.5, 0.5, 0.5]
    assert len(calls) == 3 + 6
    assert "a red circle" in calls[0]
    # win rates over a group: swap -> all 0.5; no swap -> position decides
    assert fair.group_win_rates(_images(4), "x").tolist() == [0.5] * 4
    assert biased.group_win_rates(_images(3), "x").tolist() == [1.0, 0.5, 0.0]


def test_judge_ties_and_unparseable_count_half_and_are_counted():
    answers = iter(["Both images are equally good.", "no idea", "Image 2 is better."])
    judge = VLMJudge(backend=lambda a, b, t: next(answers), swap=False)
    assert judge.compare(_images(3), _images(3, 1), ["p1", "p2", "p3"]).tolist() == [0.5, 0.5, 0.0]
    assert judge.stats == {"judgements": 3, "unparseable": 1, "ties": 1, "errors": 0}
    with pytest.raises(TypeError, match="pairwise"):
        judge.score(_images(1), "p")


def test_judge_prefers_content_with_swap():
    """A judge that really prefers brighter images keeps its preference under swap."""

    def brighter(image_1, image_2, text):
        import numpy as np

        return "Image 1 is better." if np.asarray(image_1).mean() > np.asarray(image_2).mean() else "Image 2 is better."

    judge = VLMJudge(backend=brighter, swap=True)
    dark, light = torch.full((2, 3, 8, 8), 0.2), torch.full((2, 3, 8, 8), 0.8)
    assert judge.compare(light, dark, "p").tolist() == [1.0, 1.0]
    assert judge.compare(dark, light, "p").tolist() == [0.0, 0.0]
    rates = judge.group_win_rates(torch.stack([torch.full((3, 8, 8), v) for v in (0.1, 0.9, 0.5)]), "p")
    assert rates.tolist() == [0.0, 1.0, 0.5]


class _JudgeServer:
    """A tiny OpenAI-compatible chat-completions server on loopback, scripted per test."""

    def __init__(self, respond):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.active = 0
        self.max_active = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.requests.append(body)
                    outer.headers.append(dict(self.headers))
                    outer.active += 1
                    outer.max_active = max(outer.max_active, outer.active)
                    number = len(outer.requests)
                try:
                    status, payload = respond(number, body, self.path)
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with lock:
                        outer.active -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _answer(text):
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


def _decode_image(url):
    from PIL import Image

    assert url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_http_backend_request_format_batching_and_swap():
    def respond(number, body, path):
        time.sleep(0.05)  # overlap, so concurrency is observable
        image_1 = _decode_image(body["messages"][0]["content"][0]["image_url"]["url"])
        image_2 = _decode_image(body["messages"][0]["content"][1]["image_url"]["url"])
        # a content-aware judge: the brighter image wins
        better = 1 if sum(image_1.convert("L").getdata()) > sum(image_2.convert("L").getdata()) else 2
        return 200, _answer(f"The brighter one wins. Image {better} is better.")

    with _JudgeServer(respond) as server:
        judge = build_reward("vlm_judge", backend="openai", base_url=server.url, model="judge-model",
                             api_key="secret", concurrency=4, timeout=5, max_retries=0, swap=True)
        dark, light = torch.full((3, 3, 16, 16), 0.2), torch.full((3, 3, 16, 16), 0.8)
        probs = judge.compare(light, dark, ["a red circle", "two squares", "a cat"])
        assert probs.tolist() == [1.0, 1.0, 1.0]
        assert len(server.requests) == 6  # 3 pairs x 2 orders
        assert server.max_active > 1  # sent concurrently
        body = server.requests[0]
        assert body["model"] == "judge-model" and body["temperature"] == 0.0
        content = body["messages"][0]["content"]
        assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
        assert "Text Caption: [" in content[2]["text"]
        captions = sorted(r["messages"][0]["content"][2]["text"].rsplit("[", 1)[1] for r in server.requests)
        assert captions == sorted(["a red circle]", "two squares]", "a cat]"] * 2)
        assert server.headers[0]["Authorization"] == "Bearer secret"
        assert judge.backend.stats == {"requests": 6, "retries": 0, "failures": 0}


def test_http_backend_retries_server_errors_then_succeeds():
    def respond(number, body, path):
        if number <= 2:
            return 503, {"error": "overloaded"}
        return 200, _answer("Image 2 is better.")

    with _JudgeServer(respond) as server:
        backend = OpenAIJudgeBackend(server.url, "m", max_retries=3, backoff=0.01, timeout=5)
        judge = VLMJudge(backend=backend, swap=False)
        assert judge.compare(_images(1), _images(1, 1), "p").tolist() == [0.0]
        assert len(server.requests) == 3
        assert backend.stats["retries"] == 2


def test_http_backend_timeout_retry_and_final_error():
    def respond(number, body, path):
        if number == 1:
            time.sleep(1.0)  # longer than the client's timeout
        return 200, _answer("Image 1 is better.")

    with _JudgeServer(respond) as server:
        backend = OpenAIJudgeBackend(server.url, "m", max_retries=1, backoff=0.01, timeout=0.3)
        assert VLMJudge(backend=backend, swap=False).compare(_images(1), _images(1, 1), "p").tolist() == [1.0]
        assert backend.stats["retries"] == 1

    def bad_request(number, body, path):
        return 400, {"error": {"message": "image too large"}}

    with _JudgeServer(bad_request) as server:
        backend = OpenAIJudgeBackend(server.url, "m", max_retries=3, backoff=0.01, timeout=5)
        with pytest.raises(JudgeRequestError, match="HTTP 400.*image too large"):
            VLMJudge(backend=backend, swap=False).compare(_images(1), _images(1, 1), "p")
        assert len(server.requests) == 1  # a 400 is not retried
        tolerant = VLMJudge(backend=backend, swap=False, on_error="tie")
        assert tolerant.compare(_images(2), _images(2, 1), "p").tolist() == [0.5, 0.5]
        assert tolerant.stats["errors"] == 2


def test_transformers_backend_runs_a_local_vlm(tmp_path):
    """A tiny random LLaVA saved by path: the local backend builds chat prompts with two images, generates and
    parses (random text is unparseable -> 0.5)."""
    from imgalign.rewards.testing import save_tiny_vlm

    directory = save_tiny_vlm(tmp_path / "vlm")
    judge = build_reward("vlm_judge", backend="transformers", model=str(directory), max_new_tokens=4, swap=True)
    probs = judge.compare(_images(2), _images(2, 1), ["a red circle", "a blue square"])
    assert probs.shape == (2,)
    assert set(probs.tolist()) <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert judge.stats["judgements"] == 4 and len(judge.last_outputs) == 4


def test_http_backend_single_image_requests_and_sampled_reasks():
    """UniGenBench's requests carry one image (image_2=None); a re-ask (attempt > 0) is sampled, not greedy."""
    from PIL import Image

    from imgalign.rewards.vlm_judge import JudgeRequest

    with _JudgeServer(lambda number, body, path: (200, _answer("ok"))) as server:
        backend = OpenAIJudgeBackend(server.url, "m", concurrency=1, timeout=5)
        image = Image.new("RGB", (8, 8), "red")
        assert backend.generate([JudgeRequest(image, None, "first"), JudgeRequest(image, None, "again", attempt=2)]) \
            == ["ok", "ok"]
        first, again = server.requests
        assert [p["type"] for p in first["messages"][0]["content"]] == ["image_url", "text"]
        assert _decode_image(first["messages"][0]["content"][0]["image_url"]["url"]).getpixel((4, 4))[0] > 200
        assert (first["temperature"], again["temperature"]) == (0.0, 0.7)


def test_transformers_backend_runs_a_local_qwen_vl_pairwise(tmp_path):
    """A tiny random Qwen2.5-VL (the UnifiedReward judges' class) with two images per request, loaded with a
    device_map and a tokenizer without a pad token (the backend pads with eos)."""
    from transformers import AutoTokenizer

    from imgalign.rewards.testing_qwen import save_tiny_qwen_vl

    directory = save_tiny_qwen_vl(tmp_path / "qwen")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(directory)
    judge = build_reward("vlm_judge", backend="transformers", model=str(directory), max_new_tokens=3, swap=True,
                         device_map="cpu")
    backend = judge.backend
    assert backend.processor.tokenizer.pad_token == "<|im_end|>" and backend.device.type == "cpu"
    seen = []
    generate = backend.model.generate
    backend.model.generate = lambda **kw: seen.append(kw) or generate(**kw)
    probs = judge.compare(_images(2), _images(2, 1), ["a red circle", "a blue square"])
    assert probs.shape == (2,) and judge.stats["judgements"] == 4 and len(judge.last_outputs) == 4
    (call,) = seen  # 4 requests in one batch: 8 images, two image placeholders per prompt
    image_pad = backend.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    vision_start = backend.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert call["image_grid_thw"].shape[0] == 8 and (call["input_ids"] == vision_start).sum(1).tolist() == [2] * 4
    assert int((call["input_ids"] == image_pad).sum()) == int(call["image_grid_thw"].prod(1).sum()) // 4
