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
