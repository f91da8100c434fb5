"""`imgalign train|generate|score|eval|demo|env` — one command per job."""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from imgalign.config import config_help, load_config
    from imgalign.recipes import get_recipe

    recipe = get_recipe(args.method)
    if args.help_config:
        print(config_help(recipe.Config))
        return 0
    recipe.train(load_config(recipe.Config, args.config, args.overrides))  # a ConfigError reaches main()
    return 0


def _generate(args) -> int:
    """Images as out/{prompt:05d}_{image:02d}.png; each written image's `filename<TAB>prompt` is appended (and
    flushed) to prompts.tsv at once, so an interrupted run keeps its mapping; a rerun skips the prompts whose images
    all exist and are listed there. prompts.txt (one prompt per image line, every prompt) is written at the end."""
    import os
    from pathlib import Path

    import torch

    from imgalign.data.prompts import load_prompt_file
    from imgalign.guidance.cli import prepare_guidance
    from imgalign.models.adapters import load_adapter

    prompts = list(args.prompt or []) + (load_prompt_file(args.prompts) if args.prompts else [])
    if not prompts:
        print("error: give --prompt TEXT (repeatable) or --prompts FILE", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def one_line(text: str) -> str:  # a prompt as it is stored in prompts.tsv
        return " ".join(str(text).split())

    def names(i: int) -> list[str]:
        return [f"{i:05d}_{j:02d}.png" for j in range(args.num_images)]

    tsv = out / "prompts.tsv"
    listed: dict[str, str] = {}  # filename -> prompt; the last line wins
    if tsv.is_file():
        for line in tsv.read_text(encoding="utf-8").splitlines():
            name, sep, text = line.partition("\t")
            if sep:
                listed[name] = text
    done = {i for i, prompt in enumerate(prompts)
            if all(listed.get(f) == one_line(prompt) and (out / f).is_file() for f in names(i))}
    todo = [i for i in range(len(prompts)) if i not in done]
    for i in todo:  # their images are written afresh: drop stale lines so every file is listed once
        for f in names(i):
            listed.pop(f, None)
    if tsv.is_file():
        tmp = tsv.with_name(tsv.name + ".tmp")
        tmp.write_text("".join(f"{f}\t{t}\n" for f, t in listed.items() if (out / f).is_file()), encoding="utf-8")
        os.replace(tmp, tsv)
    if done:
        print(f"skipped {len(done)} of {len(prompts)} prompts already generated in {out} (listed in {tsv.name})")

    n = 0
    if todo:
        adapter = load_adapter(args.model, device=args.device)
        few_step = {}
        if args.lora:
            adapter.pipe.load_lora_weights(args.lora)
            from imgalign.recipes.flash_dmd import use_student_sampler

            few_step = use_student_sampler(adapter.pipe, Path(args.lora))
        sample = prepare_guidance(args, adapter)
        from tqdm.auto import tqdm

        with tsv.open("a", encoding="utf-8") as mapping:
            for i in tqdm(todo, desc="generate", unit="prompt"):
                gen = torch.Generator("cpu").manual_seed(args.seed + i)
                kw = {"height": args.size, "width": args.size} if args.size else {}
                steps = {} if few_step else {"num_inference_steps": args.steps, "guidance_scale": args.guidance_scale}
                images = sample(prompt=prompts[i], num_images_per_prompt=args.num_images, generator=gen, **steps,
                                **few_step, **kw).images
                for name, img in zip(names(i), images):
                    img.save(out / name)
                    mapping.write(f"{name}\t{one_line(prompts[i])}\n")
                    mapping.flush()
                    n += 1
    (out / "prompts.txt").write_text("\n".join(p for p in prompts for _ in range(args.num_images)) + "\n")
    print(f"wrote {n} images to {out}" + (f" ({len(done)} prompts skipped)" if done else ""))
    return 0


def _env(args) -> int:
    import json
    import platform

    import torch

    from imgalign.config import package_versions

    info = {"python": platform.python_version(), "platform": platform.platform(), **package_versions(),
            "cuda": torch.cuda.is_available(), "cpu_threads": torch.get_num_threads()}
    print(json.dumps(info, indent=2))
    return 0


def _select_experts(args) -> int:
    from imgalign.data.experts import select_experts

    summary = select_experts(args.source, args.reward, args.top, args.out, split=args.split, image_root=args.image_root)
    print(f"kept {summary['kept']} of {summary['images_scored']} images by {args.reward} (best {summary['score_best']:.4f}, "
          f"last kept {summary['score_last_kept']:.4f}, mean of all {summary['score_mean_all']:.4f}): {summary['out']}")
    return 0


def _demo(args) -> int:
    from imgalign.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgalign", description=__doc__,
                                epilog="--debug (anywhere): show the traceback of a user error")
    sub = p.add_subparsers(dest="command", required=True)

    from imgalign.recipes import RECIPES, describe

    t = sub.add_parser("train", help="train with one method: imgalign train diffusion-dpo --config FILE key=value ...",
                       description="Methods:\n" + describe(), formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("method", help="one of: " + ", ".join(RECIPES))
    t.add_argument("--config", help="YAML config file (configs/<method>/<family>.yaml)")
    t.add_argument("--help-config", action="store_true", help="list every config key with its type, default and help")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5 run.max_steps=100")
    t.set_defaults(func=_train)

    from imgalign.guidance.cli import add_guidance_arguments

    g = sub.add_parser("generate", help="generate images with a pipeline (+ LoRA, RLG or NPO guidance)")
    g.add_argument("--model", required=True, help="hub id or local pipeline folder")
    g.add_argument("--lora", help="folder with pytorch_lora_weights.safetensors")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--prompts", help="prompt file (.txt, .jsonl, .csv)")
    g.add_argument("--out", required=True, help="output folder")
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance-scale", type=float, default=5.0)
    g.add_argument("--size", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    add_guidance_arguments(g)
    g.set_defaults(func=_generate)

    try:
        from imgalign.rewards.cli import add_score_arguments, run_score

        s = sub.add_parser("score", help="score a folder of images with one or more rewards")
        add_score_arguments(s)
        s.set_defaults(func=run_score)
    except ImportError:
        pass

    from imgalign.eval.cli import add_eval_arguments

    add_eval_arguments(sub.add_parser("eval", help="run a benchmark: imgalign eval unigenbench|dreambench ..."))

    x = sub.add_parser("select-experts", help="Diffusion-DRO's expert demonstrations: the top-k images of a dataset "
                       "by a reward, written as an unpaired JSONL with their scores")
    x.add_argument("--source", required=True, help="Pick-a-Pic-layout pairs (both images of each pair are scored) or "
                   "an unpaired JSONL {image, caption, label}")
    x.add_argument("--reward", required=True, help="reward name (imgalign.rewards), e.g. pickscore, hpsv2, toy_preference")
    x.add_argument("--top", type=int, default=500, help="how many images to keep (reference: 500)")
    x.add_argument("--out", required=True, help="folder for experts.jsonl, images/ and summary.json")
    x.add_argument("--split", default="train")
    x.add_argument("--image-root", default=None)
    x.set_defaults(func=_select_experts)

    d = sub.add_parser("demo", help="the embedded default: Diffusion-DPO on the toy world, before/after report")
    d.add_argument("--out", default="outputs/demo", help="output folder")
    d.add_argument("--steps", type=int, default=None, help="override the number of DPO steps")
    d.add_argument("--tiny", action="store_true", help="use a tiny random pipeline built in code instead of the toy model")
    d.add_argument("--model", default=None, help="another toy-world pipeline folder, e.g. assets/toy/sd3 (the "
                   "flow-matching toy); default: assets/toy/sd")
    d.set_defaults(func=_demo)

    e = sub.add_parser("env", help="print versions and hardware, for bug reports")
    e.set_defaults(func=_env)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. A UserError (bad config, data, path or checkpoint) prints one `error:` block and returns
    2; other exceptions are bugs and keep their traceback. --debug or IMGALIGN_DEBUG=1 re-raise UserErrors."""
    import os

    from imgalign.errors import UserError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("IMGALIGN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _run(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}\n(a traceback: rerun with --debug or IMGALIGN_DEBUG=1)", file=sys.stderr)
        return 2


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train":  # dotted overrides may come before or after --config
        bad = [e for e in extra if e.startswith("-") or "=" not in e]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like key=value)")
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
