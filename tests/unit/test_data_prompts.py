"""imgalign.data.prompts: .txt / .jsonl / .csv prompt files, and the real UniGenBench files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgalign.data import DataError, load_prompt_file, load_prompt_records

UNIGENBENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "unigenbench"


def test_txt_skips_blank_and_comment_lines(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# header\na red cube\n\n   \n  two blue spheres  \n# another\n")
    assert load_prompt_file(p) == ["a red cube", "two blue spheres"]
    assert [r.line for r in load_prompt_records(p)] == [2, 5]


def test_jsonl_prompt_caption_named_field_and_bare_strings(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(
        json.dumps({"prompt": "a", "seed": 1})
        + "\n\n"
        + json.dumps({"caption": "b"})
        + "\n"
        + json.dumps("c")
        + "\n"
    )
    assert load_prompt_file(p) == ["a", "b", "c"]
    assert load_prompt_records(p)[0].fields == {"seed": 1}
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"text": "x"}) + "\n")
    assert load_prompt_file(q, column="text") == ["x"]


@pytest.mark.parametrize(
    "content, needle",
    [
        ('{"prompt": "a"}\n{"prompt": \n', r"line 2: not valid JSON"),
        ('{"prompt": "a"}\n{"text": "b"}\n', r"line 2: no prompt column.*found text"),
        ('{"prompt": ""}\n', r"line 1: field 'prompt' must be a non-empty string"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(content)
    with pytest.raises(DataError, match=needle) as e:
        load_prompt_file(p)
    assert "bad.jsonl" in str(e.value)


def test_csv_prompt_caption_and_named_column(tmp_path):
    p = tmp_path / "p.csv"
    p.write_text('id,caption\n1,"a cat, sitting"\n2,"a dog\nrunning"\n3,bird\n')
    assert load_prompt_file(p) == ["a cat, sitting", "a dog\nrunning", "bird"]
    assert [r.line for r in load_prompt_records(p)] == [2, 3, 5]  # quoted newline spans lines
    assert load_prompt_records(p)[0].fields == {"id": "1"}
    assert load_prompt_file(p, column="id") == ["1", "2", "3"]


def test_csv_errors(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("id,text\n1,a\n")
    with pytest.raises(DataError, match=r"bad\.csv line 1 \(header\): no prompt column.*found id, text"):
        load_prompt_file(p)
    p.write_text('prompt\na\n""\n')
    with pytest.raises(DataError, match=r"bad\.csv line 3: empty 'prompt'"):
        load_prompt_file(p)
    with pytest.raises(DataError, match="no column 'nope'"):
        load_prompt_file(p, column="nope")


def test_unknown_extension_and_missing_file(tmp_path):
    (tmp_path / "p.yaml").write_text("a")
    with pytest.raises(DataError, match="unsupported prompt file type"):
        load_prompt_file(tmp_path / "p.yaml")
    with pytest.raises(DataError, match="not found"):
        load_prompt_file(tmp_path / "missing.txt")


@pytest.mark.skipif(not UNIGENBENCH.is_dir(), reason="UniGenBench prompt files not present")
def test_real_unigenbench_files():
    for name in ("test_prompts_en.csv", "test_prompts_en_long.csv"):
        records = load_prompt_records(UNIGENBENCH / name)
        assert len(records) == 600
        assert records[0].fields["index"] == "0"
        assert json.loads(records[0].fields["sub_dims_en"])["Testpoints"]  # test points ride along
    assert load_prompt_file(UNIGENBENCH / "test_prompts_en.csv")[0].startswith(
        "In the style of classical ink"
    )
    train = load_prompt_file(UNIGENBENCH / "train_prompt.txt")
    assert len(train) == 10000 and all(train)


@pytest.mark.parametrize(
    "name, content, line",
    [
        ("p.txt", b"a red cube\nbad \xff byte\nthree\n", 2),
        ("p.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n{"prompt": "c"}\n', 2),
        ("p.csv", b'id,prompt\n1,a\n2,"caf\xe9\nau lait"\n3,c\n', 3),
    ],
)
def test_non_utf8_line_named_or_skipped_and_counted(tmp_path, name, content, line):
    from imgalign.data import PromptStats

    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=rf"{name} line {line}: not UTF-8 \(byte 0x(ff|e9) at position \d+\); "
                                        r"re-save the file as UTF-8.*on_error=\"skip\""):
        load_prompt_file(p)
    stats = PromptStats()
    assert len(load_prompt_file(p, on_error="skip", stats=stats)) == 2
    assert stats.n_skipped == 1 and stats.skipped == {"bad_encoding": 1}
    assert f"line {line}" in stats.examples[0] and "2 prompts, 1 lines skipped (bad_encoding: 1)" in stats.summary()
    with pytest.warns(UserWarning, match="1 lines skipped"):  # without stats, a warning tells
        load_prompt_file(p, on_error="skip")


def test_skip_counts_bad_jsonl_lines_and_keeps_line_numbers(tmp_path):
    from imgalign.data import PromptStats

    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\nnot json\n{"text": "b"}\n{"prompt": ""}\n{"prompt": "e"}\n')
    stats = PromptStats()
    records = load_prompt_records(p, on_error="skip", stats=stats)
    assert [(r.prompt, r.line) for r in records] == [("a", 1), ("e", 5)]
    assert stats.skipped == {"bad_json": 1, "missing_prompt": 1, "empty_prompt": 1}
    with pytest.raises(ValueError, match="on_error"):
        load_prompt_file(p, on_error="ignore")


def test_bom_still_dropped(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes("\ufeffa cat\nb\n".encode())
    assert load_prompt_file(p) == ["a cat", "b"]
