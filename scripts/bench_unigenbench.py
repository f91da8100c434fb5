"""Toy UniGenBench end to end over real HTTP, judge throughput, and the scoring time.

    python scripts/bench_unigenbench.py --pipeline assets/toy/sd [--lora dpo=outputs/demo/dpo] \\
        [--lora grpo=outputs/pg/lora] --prompts 50 --out outputs/ugb-toy

1. A toy UniGenBench: the first --prompts toy test prompts written in the benchmark's CSV layout, whose test points
   are the toy evaluator's criteria (`imgalign.eval.unigenbench.toy_items`), read back through the real loader.
2. A judge process (`python -m imgalign.eval.judge_server`) serving the OpenAI chat-completions API on 127.0.0.1,
   answering from the exact toy evaluator in the benchmark's layout, every --malformed-every-th answer malformed.
3. For the base pipeline and each --lora: 4 images per prompt (`generate_images`), judged over HTTP through the
   reward layer's OpenAI client (8 requests in flight, PNG so the judge sees the exact pixels), scored; each
   sub-dimension's accuracy is checked against the toy evaluator's own numbers on the same files (exit 1 if they
   differ), and every LoRA run is compared with the base (paired bootstrap over prompts).
4. Throughput: the same images judged with 1 and with 8 concurrent requests against a judge that answers after
   --delay seconds (images per second, and the ratio; target >= 6x).
5. Scoring time: `score_answers` on 2,400 cached answers (600 toy prompts x 4), CPU seconds (target < 1 s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from imgalign.eval import unigenbench as ugb
from imgalign.eval.unigenbench_data import TESTPOINT_DEFINITIONS_EN, TOY_DEFINITIONS, TOY_TESTPOINTS

DEFINITIONS = {**TESTPOINT_DEFINITIONS_EN, **TOY_DEFINITIONS}


class JudgeProcess:
    """The toy judge as a separate process; its URL is the first line it prints."""

    def __init__(self, delay: float = 0.0, malformed_every: int = 0):
        self.proc = subprocess.Popen([sys.executable, "-m", "imgalign.eval.judge_server", "--port", "0", "--delay",
                                      str(delay), "--malformed-every", str(malformed_every)],
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        self.base_url = line.strip().rsplit(" ", 1)[-1]
        if not self.base_url.startswith("http"):
            self.close()
            raise RuntimeError(f"the judge server did not start: {line!r}")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def evaluator_truth(bench, images: Path, k: int) -> dict[str, float]:
    """Per test point, the fraction of images whose toy criterion is 1.0, straight from the evaluator."""
    from imgalign.toy import evaluate

    hits, totals = Counter(), Counter()
    for it in bench:
        for j in range(k):
            criteria = evaluate(Image.open(images / ugb.image_name(it.index, j)).convert("RGB"), it.prompt).criteria
            for criterion, value in criteria.items():
                totals[TOY_TESTPOINTS[criterion]] += 1
                hits[TOY_TESTPOINTS[criterion]] += value == 1.0
    return {p: hits[p] / totals[p] for p in totals}


def judge(bench, images: Path, answers: Path, base_url: str, concurrency: int, k: int):
    backend = ugb.make_judge_backend("openai", base_url=base_url, model="toy-judge", image_format="PNG",
                                     concurrency=concurrency, timeout=60, max_retries=2)
    return ugb.judge_images(bench, images, backend, answers, images_per_prompt=k, definitions=DEFINITIONS,
                            progress=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="assets/toy/sd")
    p.add_argument("--lora", action="append", default=[], metavar="NAME=PATH", help="a LoRA run to compare")
    p.add_argument("--prompts", type=int, default=50, help="toy test prompts in the toy UniGenBench")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--malformed-every", type=int, default=5)
    p.add_argument("--delay", type=float, default=0.05, help="judge answer delay for the throughput test (s)")
    p.add_argument("--throughput-images", type=int, default=64)
    p.add_argument("--out", default="outputs/ugb-toy")
    args = p.parse_args()

    from imgalign.models.adapters import load_adapter
    from imgalign.toy import load_prompt_set

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    k = args.images_per_prompt
    ugb.write_unigenbench_csv(out / "toy_unigenbench.csv", ugb.toy_items(load_prompt_set("test")[:args.prompts]))
    bench = ugb.load_unigenbench(out / "toy_unigenbench.csv")
    report: dict = {"prompts": len(bench), "images_per_prompt": k, "runs": {}}
    runs = [("base", None)] + [tuple(x.split("=", 1)) for x in args.lora]
    ok = True
    with JudgeProcess(malformed_every=args.malformed_every) as server:
        for name, lora in runs:
            run = out / name
            t0 = time.perf_counter()
            adapter = load_adapter(args.pipeline)
            if lora:
                adapter.pipe.load_lora_weights(lora)
            ugb.generate_images(adapter.pipe, bench, run / "images", images_per_prompt=k, seed=0,
                                num_inference_steps=args.steps, guidance_scale=args.guidance_scale, size=32,
                                progress=False)
            t1 = time.perf_counter()
            records, stats = judge(bench, run / "images", run / ugb.ANSWERS_FILE, server.base_url, 8, k)
            t2 = time.perf_counter()
            result = ugb.score_answers(bench, records)
            result["judge"] = vars(stats)
            ugb.write_outputs(result, run, title=f"toy UniGenBench: {name}")
            truth = evaluator_truth(bench, run / "images", k)
            got = {n: v["accuracy"] for n, v in result["sub_dimension"].items()}
            diff = max(abs(got[n] - truth[n]) for n in truth) if set(got) == set(truth) else float("inf")
            ok &= diff == 0.0
            report["runs"][name] = {"overall": {k_: v for k_, v in result["overall"].items() if k_ != "averaging"},
                                    "sub_dimension": got, "evaluator": truth, "max_abs_difference": diff,
                                    "judge": vars(stats), "generate_s": t1 - t0, "judge_s": t2 - t1}
            print(f"[{name}] overall {100 * result['overall']['primary_mean']:.2f} (primary mean), "
                  f"{100 * result['overall']['testpoint_mean']:.2f} (all test points); {stats.asked} asked, "
                  f"{stats.cached} cached, {stats.retries} retries, {stats.unparsable} unparsable; "
                  f"max |judge - evaluator| = {diff}")
            for n in sorted(truth):
                print(f"    {n:<40} judge {100 * got.get(n, float('nan')):6.2f}   evaluator {100 * truth[n]:6.2f}")
    base = ugb.load_result(out / "base")
    for name, _ in runs[1:]:
        cmp = ugb.compare_runs(base, ugb.load_result(out / name))
        (out / f"compare_base_{name}.md").write_text(ugb.compare_markdown(cmp, "base", name))
        report["runs"][name]["compare_with_base"] = cmp["metrics"]
        m = cmp["metrics"]["overall/primary_mean"]
        print(f"[{name} - base] primary mean {100 * m['delta']:+.2f} [{100 * m['lo']:+.2f}, {100 * m['hi']:+.2f}]")

    # throughput: 1 vs 8 requests in flight against a judge that answers after a fixed delay
    n_prompts = max(1, args.throughput_images // k)
    sub = bench.head(n_prompts)
    rates = {}
    with JudgeProcess(delay=args.delay) as server:
        for concurrency in (1, 8):
            answers = out / f"throughput_{concurrency}.jsonl"
            answers.unlink(missing_ok=True)
            t0 = time.perf_counter()
            judge(sub, out / "base" / "images", answers, server.base_url, concurrency, k)
            rates[concurrency] = n_prompts * k / (time.perf_counter() - t0)
    report["throughput"] = {"delay_s": args.delay, "images": n_prompts * k, "images_per_s_1": rates[1],
                            "images_per_s_8": rates[8], "ratio": rates[8] / rates[1]}
    print(f"judge throughput ({n_prompts * k} images, {args.delay}s per answer): 1 request {rates[1]:.1f} img/s, "
          f"8 requests {rates[8]:.1f} img/s, ratio {rates[8] / rates[1]:.2f}x (target >= 6x)")

    # scoring time on 2,400 cached answers
    big = ugb.UniGenBench("toy-600", "en", ugb.toy_items(load_prompt_set("train")[:600]))
    rng = np.random.default_rng(0)
    records = [{"file": ugb.image_name(it.index, j), "index": it.index, "k": j, "testpoints": list(it.testpoints),
                "scores": rng.integers(0, 2, len(it.testpoints)).tolist()} for it in big for j in range(4)]
    t0 = time.process_time()
    ugb.score_answers(big, records)
    cpu = time.process_time() - t0
    report["scoring"] = {"answers": len(records), "cpu_s": cpu}
    print(f"scoring {len(records)} cached answers: {cpu:.3f} s CPU (target < 1 s)")
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out / 'bench.json'}; judge == evaluator on every run: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
