"""`imgalign eval <benchmark>`: the benchmark sub-commands, each module adding its own arguments."""

from __future__ import annotations


def add_eval_arguments(parser) -> None:
    """Register `imgalign eval unigenbench` and `imgalign eval dreambench` on the `eval` parser (from imgalign.cli)."""
    from imgalign.eval import dreambench, unigenbench

    benches = parser.add_subparsers(dest="benchmark", required=True)
    unigenbench.add_arguments(benches.add_parser(
        "unigenbench", help="UniGenBench: generate 4 images per prompt, judge every test point",
        description=unigenbench.__doc__.split("\n\n")[0]))
    dreambench.add_arguments(benches.add_parser(
        "dreambench", help="DreamBench: subject fidelity (DINO, CLIP-I) and prompt fidelity (CLIP-T), 4 images per "
        "prompt", description=dreambench.__doc__.split("\n\n")[0]))
