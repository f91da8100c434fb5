"""`imgalign generate` writes prompts.tsv as it goes and a rerun skips the prompts it already finished."""

from __future__ import annotations

import pytest

from imgalign.cli import main


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from imgalign.models.tiny import save_tiny_pipeline

    return str(save_tiny_pipeline("sd15", tmp_path_factory.mktemp("tiny") / "sd15"))


@pytest.fixture
def calls(monkeypatch):
    """The prompts the sampler is called with, in order."""
    import imgalign.guidance.cli as guidance_cli

    seen: list[str] = []
    prepare = guidance_cli.prepare_guidance

    def counting(args, adapter):
        sample = prepare(args, adapter)

        def wrapped(**kw):
            seen.append(kw["prompt"])
            return sample(**kw)

        return wrapped

    monkeypatch.setattr(guidance_cli, "prepare_guidance", counting)
    return seen


PROMPTS = ["a red circle", "a blue square", "two green triangles"]


def _generate(model, out):
    argv = ["generate", "--model", model, "--out", str(out), "--steps", "2", "--size", "32", "--num-images", "2"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    return main(argv)


def test_generate_writes_the_mapping_per_image_and_reruns_only_missing_prompts(tiny_sd, calls, tmp_path, capsys):
    out = tmp_path / "gen"
    assert _generate(tiny_sd, out) == 0
    assert calls == PROMPTS
    tsv = (out / "prompts.tsv").read_text().splitlines()
    assert tsv == [f"{i:05d}_{j:02d}.png\t{p}" for i, p in enumerate(PROMPTS) for j in range(2)]
    assert (out / "prompts.txt").read_text().splitlines() == [p for p in PROMPTS for _ in range(2)]
    kept = (out / "00000_00.png").read_bytes()

    (out / "00001_01.png").unlink()  # as if the run had been stopped while writing prompt 1
    calls.clear()
    capsys.readouterr()
    assert _generate(tiny_sd, out) == 0
    assert calls == ["a blue square"]  # only the prompt with a missing image is generated again
    assert "skipped 2 of 3 prompts" in capsys.readouterr().out
    assert (out / "00001_01.png").is_file() and (out / "00000_00.png").read_bytes() == kept
    tsv = (out / "prompts.tsv").read_text().splitlines()
    assert len(tsv) == len(set(tsv)) == 6  # every image once, no duplicate lines
    assert sorted(tsv) == sorted(f"{i:05d}_{j:02d}.png\t{p}" for i, p in enumerate(PROMPTS) for j in range(2))
    assert (out / "prompts.txt").read_text().splitlines() == [p for p in PROMPTS for _ in range(2)]

    calls.clear()
    assert _generate(tiny_sd, out) == 0  # all done: nothing to generate
    assert calls == []
    assert len((out / "prompts.tsv").read_text().splitlines()) == 6


def test_generate_redoes_images_listed_under_another_prompt(tiny_sd, calls, tmp_path):
    out = tmp_path / "gen"
    out.mkdir()
    assert _generate(tiny_sd, out) == 0
    lines = (out / "prompts.tsv").read_text().splitlines()
    # an interrupted run wrote one image of prompt 2 under a different prompt, and a line without a tab
    (out / "prompts.tsv").write_text("\n".join(lines[:4] + [lines[4].replace("two green", "three green"), "junk"]) + "\n")
    calls.clear()
    assert _generate(tiny_sd, out) == 0
    assert calls == ["two green triangles"]
    tsv = (out / "prompts.tsv").read_text().splitlines()
    assert sorted(tsv) == sorted(lines) and len(tsv) == 6
