"""Toy preference pairs: labels from evaluator scores, parquet readable by load_preference_pairs, ties counted."""

from __future__ import annotations

import pytest

from imgalign.toy.pairs import generate_toy_pairs, label_from_scores, online_rl_prompt_files

PROMPTS = ["a red circle", "two blue squares on a white background", "a green triangle left of a yellow circle"]


def test_label_from_scores():
    assert label_from_scores(0.75, 0.5) == 1.0
    assert label_from_scores(0.25, 0.5) == 0.0
    assert label_from_scores(0.5, 0.5) == 0.5


@pytest.fixture(scope="module")
def pairs(tiny_pipelines, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_pairs") / "pairs.parquet"
    stats = generate_toy_pairs(tiny_pipelines("sd15"), PROMPTS, out, n_pairs=5, num_inference_steps=2,
                               guidance_scale=1.0, seed=0, batch_size=4)
    return out, stats


def test_generate_toy_pairs_writes_valid_parquet(pairs):
    from imgalign.data import load_preference_pairs

    out, stats = pairs
    assert stats["n_pairs"] == 5 and stats["n_flipped"] == 0
    loaded = load_preference_pairs(str(out), keep_ties=True)
    assert len(loaded) == 5
    assert loaded.stats.n_ties == stats["n_ties"]  # ties are counted the same way on both sides
    item = loaded[0]
    assert item["caption"] == PROMPTS[0]
    assert item["winner"].size == (32, 32)
    dropped = load_preference_pairs(str(out))  # default drops ties
    assert len(dropped) == 5 - stats["n_ties"]


def test_label_noise_flips_decided_labels_only(pairs, tiny_pipelines, tmp_path):
    import pyarrow.parquet as pq

    out, stats = pairs
    noisy_out = tmp_path / "noisy.parquet"
    noisy = generate_toy_pairs(tiny_pipelines("sd15"), PROMPTS, noisy_out, n_pairs=5, num_inference_steps=2,
                               guidance_scale=1.0, seed=0, label_noise=1.0, batch_size=4)
    clean = pq.read_table(out).column("label_0").to_pylist()
    flipped = pq.read_table(noisy_out).column("label_0").to_pylist()
    assert noisy["n_ties"] == stats["n_ties"]
    assert noisy["n_flipped"] == 5 - stats["n_ties"]
    assert flipped == [label if label == 0.5 else 1.0 - label for label in clean]


def test_online_rl_prompt_files_exist():
    files = online_rl_prompt_files()
    assert set(files) == {"train", "validation", "test"}
    assert all(path.exists() for path in files.values())


def test_best_and_worst_of_k_images(tiny_pipelines, tmp_path, monkeypatch):
    """k = 4 with fidelity scores 0.1, 0.9, 0.5, 0.3 per prompt: best is image 1, worst image 0, kept in sampling
    order -> jpg_0 scores 0.1, jpg_1 0.9, label_0 = 0. Ranked by the rater's preference instead (here 1 - score):
    best is image 0, worst image 1 -> label_0 = 1."""
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from imgalign.toy import evaluator

    def scripted():
        cycle = iter([0.1, 0.9, 0.5, 0.3] * 3)
        return lambda image, prompt: (lambda s: SimpleNamespace(score=s, preference=1 - s))(next(cycle))

    monkeypatch.setattr(evaluator, "evaluate", scripted())
    stats = generate_toy_pairs(tiny_pipelines("sd15"), PROMPTS, tmp_path / "k4.parquet", n_pairs=3,
                               num_inference_steps=1, guidance_scale=1.0, images_per_prompt=4, criterion="score")
    assert stats["n_ties"] == 0 and stats["mean_score_0"] == pytest.approx(0.1)
    assert stats["mean_abs_score_diff"] == pytest.approx(0.8)
    assert pq.read_table(tmp_path / "k4.parquet").column("label_0").to_pylist() == [0.0] * 3
    monkeypatch.setattr(evaluator, "evaluate", scripted())
    stats = generate_toy_pairs(tiny_pipelines("sd15"), PROMPTS, tmp_path / "k4p.parquet", n_pairs=3,
                               num_inference_steps=1, guidance_scale=1.0, images_per_prompt=4)  # preference
    assert stats["criterion"] == "preference" and stats["mean_score_0"] == pytest.approx(0.9)
    assert pq.read_table(tmp_path / "k4p.parquet").column("label_0").to_pylist() == [1.0] * 3
    with pytest.raises(ValueError, match="criterion must be"):
        generate_toy_pairs(tiny_pipelines("sd15"), PROMPTS, tmp_path / "x.parquet", n_pairs=1, criterion="taste")
    with pytest.raises(ValueError, match="images_per_prompt must be at least 2"):
        generate_toy_pairs(tiny_pipelines("sd15"), PROMPTS, tmp_path / "x.parquet", n_pairs=1, images_per_prompt=1)
