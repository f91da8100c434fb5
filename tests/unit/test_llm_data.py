"""LLM preference data: sources, formats, errors naming file and row, tokenisation with truncation."""

from __future__ import annotations

import json

import pytest
import torch

from imgalign.data.errors import DataError
from imgalign.llm.data import collate, load_llm_preferences, split_heldout, tokenize_preferences
from imgalign.llm.synthetic import sort_task, word_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def test_sort_task_truth():
    for row in sort_task(50, seed=3):
        digits = [int(x) for x in row["prompt"].split()[1:-1]]
        chosen = [int(x) for x in row["chosen"].split()]
        rejected = [int(x) for x in row["rejected"].split()]
        assert chosen == sorted(digits) and sorted(rejected) == chosen and rejected != chosen
    assert sort_task(5, seed=1) == sort_task(5, seed=1) != sort_task(5, seed=2)


def test_jsonl_pairs_tokenise_with_bos_and_eos(tmp_path, tok):
    path = write_jsonl([{"prompt": "sort 3 1 ->", "chosen": "1 3", "rejected": "3 1"}], tmp_path / "p.jsonl")
    data = load_llm_preferences(str(path))
    assert not data.listwise and len(data) == 1
    items, stats = tokenize_preferences(data, tok, max_length=16, max_prompt_length=8)
    v = tok.get_vocab()
    assert items[0]["prompt_ids"] == [v["<bos>"], v["sort"], v["3"], v["1"], v["->"]]
    assert items[0]["response_ids"] == [[v["1"], v["3"], v["<eos>"]], [v["3"], v["1"], v["<eos>"]]]
    assert items[0]["rewards"] == [1.0, 0.0]


def test_truncation_keeps_prompt_end_and_response_start(tmp_path, tok):
    rows = [{"prompt": "sort " + " ".join("0123456789") + " ->", "chosen": "0 1 2 3 4 5 6 7 8 9", "rejected": "1 0"}]
    data = load_llm_preferences(rows)
    items, stats = tokenize_preferences(data, tok, max_length=8, max_prompt_length=4)
    v = tok.get_vocab()
    assert items[0]["prompt_ids"] == [v["7"], v["8"], v["9"], v["->"]]  # the last 4 prompt tokens
    assert items[0]["response_ids"][0] == [v["0"], v["1"], v["2"], v["3"]]  # 8 - 4 tokens, start kept
    assert stats.n_prompt_truncated == 1 and stats.n_response_truncated == 1
    with pytest.raises(ValueError, match="max_prompt_length"):
        tokenize_preferences(data, tok, max_length=4, max_prompt_length=4)


def test_errors_name_file_line_and_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n" + "{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: not valid JSON"):
        load_llm_preferences(str(bad))
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n\n"
                   + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: missing column\(s\) \['rejected'\]"):
        load_llm_preferences(str(bad))
    bad.write_text(json.dumps({"prompt": "p", "chosen": "", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"line 1: 'chosen' is empty"):
        load_llm_preferences(str(bad))
    with pytest.raises(DataError, match=r"row 0: listwise rows need 'ranks'"):
        load_llm_preferences([{"prompt": "p", "responses": ["a", "b"]}])
    with pytest.raises(DataError, match=r"row 1: 3 responses, but earlier rows have 2"):
        load_llm_preferences([{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]},
                              {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2, 3]}])
    with pytest.raises(DataError, match="not found"):
        load_llm_preferences(str(tmp_path / "missing.jsonl"))


def test_listwise_ranks_and_scores_become_rewards():
    data = load_llm_preferences([{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 1, 3]},
                                 {"prompt": "q", "responses": ["a", "b", "c"], "scores": [0.1, 0.9, 0.5]}])
    assert data.listwise
    assert data.rows[0]["rewards"] == [-2.0, -1.0, -3.0]  # rank 1 = best = highest reward
    assert data.rows[1]["rewards"] == [0.1, 0.9, 0.5]


def test_conversational_rows_with_an_implicit_prompt(tok):
    user = {"role": "user", "content": "sort 2 1 ->"}
    data = load_llm_preferences([{"chosen": [user, {"role": "assistant", "content": "1 2"}],
                                  "rejected": [user, {"role": "assistant", "content": "2 1"}]}])
    assert data.rows[0]["prompt"] == [user]
    chat = copy_with_template(tok)
    items, _ = tokenize_preferences(data, chat, max_length=32, max_prompt_length=16)
    v = chat.get_vocab()
    assert items[0]["prompt_ids"] == [v["<bos>"], v["sort"], v["2"], v["1"], v["->"]]
    assert items[0]["response_ids"] == [[v["1"], v["2"], v["<eos>"]], [v["2"], v["1"], v["<eos>"]]]


def copy_with_template(tok):
    import copy

    chat = copy.deepcopy(tok)
    chat.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}<bos> {{ m['content'] }} "
                          "{% else %}{{ m['content'] }} <eos> {% endif %}{% endfor %}")
    return chat


def test_datasets_source_and_saved_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(sort_task(6, seed=0))
    assert len(load_llm_preferences(ds)) == 6
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_llm_preferences(str(tmp_path / "saved"), max_rows=4).rows[0]["responses"][0] == sort_task(1)[0]["chosen"]
    renamed = datasets.Dataset.from_list([{"question": "p", "chosen": "a", "rejected": "b"}])
    assert load_llm_preferences(renamed, columns={"question": "prompt"}).rows[0]["prompt"] == "p"


def test_collate_is_response_major_and_split_is_seeded():
    items = [{"prompt_ids": [1, 2], "response_ids": [[3], [4, 5]], "rewards": [1.0, 0.0]},
             {"prompt_ids": [1], "response_ids": [[6, 7], [8]], "rewards": [1.0, 0.0]}]
    b = collate(items, pad_token_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0], [1, 6, 7, 0], [1, 2, 4, 5], [1, 8, 0, 0]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    torch.testing.assert_close(b["rewards"], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    tr, he = split_heldout(list(range(20)), 0.25, seed=0)
    assert len(he) == 5 and sorted(tr + he) == list(range(20)) and split_heldout(list(range(20)), 0.25, 0) == (tr, he)
