"""A toy UniGenBench judge behind a real OpenAI-compatible HTTP endpoint (tests, scripts/bench_unigenbench.py).

    python -m imgalign.eval.judge_server --port 8011 --delay 0.05 --malformed-every 4

``POST /v1/chat/completions`` takes the request `imgalign.eval.unigenbench` sends (one image as a data URL and the
benchmark's instruction), reads the prompt and the test points back from the instruction, checks the image with
the exact toy evaluator (`imgalign.toy.evaluate`) and answers in the benchmark's layout
``<description>...<analysis>[...]</analysis><score>[...]</score></description>``. A toy test point
(`imgalign.eval.unigenbench_data.TOY_TESTPOINTS`) scores 1 when its evaluator criterion is fully met (1.0).

``malformed_every=n`` makes every n-th answer unusable, cycling through a missing score tag, a score list of the
wrong length and a non-binary score (answers with extra text around the tags are always well-formed), so retries
and the unparsable count are exercised. ``delay`` seconds are slept per request (a slow judge, for throughput).
The server is a `ThreadingHTTPServer`, so concurrent requests overlap; it binds 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import ast
import base64
import io
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from imgalign.eval.unigenbench_data import TOY_TESTPOINTS

_CRITERION = {point: criterion for criterion, point in TOY_TESTPOINTS.items()}


def toy_scores(image, prompt: str, testpoints: list[str]) -> list[int]:
    """1 per toy test point whose evaluator criterion is 1.0 on this image, else 0 (unknown test points: 0)."""
    from imgalign.toy import evaluate

    criteria = evaluate(image, prompt).criteria
    return [int(criteria.get(_CRITERION.get(p, ""), 0.0) == 1.0) for p in testpoints]


def toy_answer(image, instruction: str) -> str:
    """The well-formed answer to one UniGenBench instruction about one toy image."""
    prompt = re.search(r"<prompt>(.*?)</prompt>", instruction, re.S).group(1)
    points = ast.literal_eval(re.search(r"<checkpoint>(.*?)</checkpoint>", instruction, re.S).group(1))
    scores = toy_scores(image, prompt, points)
    analysis = [f"{p}: {'met' if s else 'not met'} according to the toy evaluator" for p, s in zip(points, scores)]
    return (f"Here is my evaluation.\n<description>\n<prompt>{prompt}</prompt>\n<checkpoint>{points}</checkpoint>\n"
            f"<analysis>{analysis}</analysis>\n<score>{scores}</score>\n</description>\nDone.")


def malform(answer: str, kind: int) -> str:
    if kind == 0:  # no score tag
        return re.sub(r"<score>.*?</score>", "", answer, flags=re.S)
    if kind == 1:  # one score too many
        return re.sub(r"<score>\[(.*?)\]</score>", r"<score>[\1, 1]</score>", answer, flags=re.S)
    return re.sub(r"<score>\[(.*?)\]</score>", "<score>['yes']</score>", answer, flags=re.S)  # not binary


class ToyJudgeServer:
    """``with ToyJudgeServer(delay=0.0, malformed_every=0) as server: server.base_url`` (``http://127.0.0.1:P/v1``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, delay: float = 0.0, malformed_every: int = 0):
        from PIL import Image

        self.delay, self.malformed_every = delay, malformed_every
        self.requests = 0
        self.malformed = 0
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": f"no route {self.path}"})
                try:
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    content = body["messages"][-1]["content"]
                    url = next(c["image_url"]["url"] for c in content if c.get("type") == "image_url")
                    text = next(c["text"] for c in content if c.get("type") == "text")
                    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
                    answer = toy_answer(image, text)
                except Exception as e:  # a bad request is the client's fault: say what
                    return self._send(400, {"error": f"bad request: {type(e).__name__}: {e}"})
                with lock:
                    server.requests += 1
                    n = server.requests
                    bad = server.malformed_every and n % server.malformed_every == 0
                    server.malformed += bool(bad)
                if bad:
                    answer = malform(answer, (n // server.malformed_every) % 3)
                if server.delay:
                    time.sleep(server.delay)
                self._send(200, {"id": f"toy-{n}", "object": "chat.completion", "model": body.get("model", "toy"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": answer}}]})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://{host}:{self.port}/v1"
        self._thread: threading.Thread | None = None

    def start(self) -> ToyJudgeServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ToyJudgeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds slept per request")
    p.add_argument("--malformed-every", type=int, default=0, help="every n-th answer is malformed (0: never)")
    args = p.parse_args(argv)
    server = ToyJudgeServer(port=args.port, delay=args.delay, malformed_every=args.malformed_every)
    print(f"toy judge listening on {server.base_url}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
