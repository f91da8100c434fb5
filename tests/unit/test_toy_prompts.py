"""The shipped toy prompt sets: reproducible from their builder, disjoint by meaning, strictly loaded."""

import pytest

from imgalign.toy.grammar import PROMPT_KINDS, parse
from imgalign.toy.prompts import PROMPT_DIR, SPLIT_SIZES, build_prompt_sets, load_prompt_set, load_prompts


def test_shipped_files_equal_the_builder_output(tmp_path):
    built = build_prompt_sets(tmp_path)
    for split, prompts in built.items():
        shipped = (PROMPT_DIR / f"{split}.txt").read_text(encoding="utf-8")
        assert shipped == (tmp_path / f"{split}.txt").read_text(encoding="utf-8"), (
            f"{PROMPT_DIR / split}.txt is stale; rebuild it with "
            "python -c 'from imgalign.toy.prompts import main; main()'"
        )
        assert load_prompt_set(split) == prompts


def test_splits_have_their_sizes_and_are_disjoint_by_text_and_meaning():
    splits = {split: load_prompt_set(split) for split in SPLIT_SIZES}
    assert {split: len(prompts) for split, prompts in splits.items()} == SPLIT_SIZES
    keys = {split: [parse(text).canonical_key() for text in prompts] for split, prompts in splits.items()}
    for split, split_keys in keys.items():
        assert len(set(split_keys)) == len(split_keys), f"{split} repeats a scene"
    assert not set(splits["test"]) & set(splits["train"])
    assert not set(keys["test"]) & (set(keys["train"]) | set(keys["validation"]))
    assert not set(keys["validation"]) & set(keys["train"])
    # Every prompt kind is tested.
    assert {parse(text).kind for text in splits["test"]} == set(PROMPT_KINDS)


def test_seed_and_sizes_control_the_sets():
    small = build_prompt_sets(sizes={"test": 5, "train": 20})
    assert build_prompt_sets(sizes={"test": 5, "train": 20}) == small
    assert build_prompt_sets(seed=1, sizes={"test": 5, "train": 20}) != small
    # The test split is drawn first, so it does not depend on the train size.
    assert build_prompt_sets(sizes={"test": 5, "train": 50})["test"] == small["test"]


def test_load_prompts_names_the_file_and_line_of_a_bad_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\n\ntwo blue squares\na purple circle\n", encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_prompts(path)
    assert str(error.value).startswith(f"{path}:4: ")
    assert "'purple'" in str(error.value)
    path.write_text("a red circle\n\ntwo blue squares\n", encoding="utf-8")
    assert load_prompts(path) == ["a red circle", "two blue squares"]  # blank lines are skipped
    with pytest.raises(ValueError, match="unknown prompt split 'dev'"):
        load_prompt_set("dev")
