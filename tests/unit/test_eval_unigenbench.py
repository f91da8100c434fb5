"""imgalign.eval.unigenbench: the loader on the real CSVs, judge prompt and answer parsing, scoring, resume, and the
HTTP judge against a local OpenAI-compatible server that answers from the exact toy evaluator."""

from __future__ import annotations

import ast
import base64
import csv
import dataclasses
import json
import os
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgalign.eval import unigenbench as ugb
from imgalign.eval.judge_server import ToyJudgeServer, toy_answer
from imgalign.eval.unigenbench_data import (
    SUB_THEMES,
    SUB_THEMES_ZH,
    TESTPOINT_DEFINITIONS_EN,
    TESTPOINT_DEFINITIONS_ZH,
    TESTPOINTS_ZH_TO_EN,
    TOY_DEFINITIONS,
    TOY_TESTPOINTS,
)


def _shared_unigenbench() -> Path | None:
    """$IMGALIGN_UNIGENBENCH_DIR, else a sibling shared/data/unigenbench folder of an ancestor of this file."""
    env = os.environ.get("IMGALIGN_UNIGENBENCH_DIR")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / "unigenbench"
        if candidate.is_dir():
            return candidate
    return None


DATA = _shared_unigenbench()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "test_prompts_en.csv").is_file(),
                                reason="UniGenBench CSVs not found (set IMGALIGN_UNIGENBENCH_DIR)")
needs_zh_data = pytest.mark.skipif(DATA is None or not (DATA / "test_prompts_zh.csv").is_file(),
                                   reason="the Chinese UniGenBench CSVs are not in the data folder (set "
                                          "IMGALIGN_UNIGENBENCH_DIR to a copy of UniGenBench's data/)")
TOY_DEFS = {**TESTPOINT_DEFINITIONS_EN, **TOY_DEFINITIONS}


# ----------------------------------------------------------------------------------------------- loader ---


@needs_data
@pytest.mark.parametrize("name", ["test_prompts_en.csv", "test_prompts_en_long.csv"])
def test_real_files_load_with_every_test_point_and_normalised_categories(name):
    bench = ugb.load_unigenbench(DATA / name)
    assert len(bench) == 600 and sorted(it.index for it in bench) == list(range(600))
    with (DATA / name).open(encoding="utf-8", newline="") as f:
        raw = {int(r["index"]): r["sub_dims_en"] for r in csv.DictReader(f)}
    for it in bench:  # every test point parsed, parallel to its description
        assert len(it.testpoints) == len(it.descriptions) >= 1
        assert all(p in TESTPOINT_DEFINITIONS_EN for p in it.testpoints), it.testpoints  # the 27 known names
        assert it.sentence in ("Descriptive", "Imperative")
        assert it.sub_theme in SUB_THEMES[it.theme], (it.theme, it.raw_sub_theme)  # every spelling is covered
        if it.index != 509 or "long" not in name:
            assert list(it.testpoints) == json.loads(raw[it.index])["Testpoints"]
        ugb.judge_prompt(it)  # every row builds a judge prompt
    assert Counter(it.theme for it in bench)["Art"] == 157
    assert {it.theme_sub_theme for it in bench} == {f"{t} / {s}" for t, subs in SUB_THEMES.items() for s in subs}
    # 28 raw spellings -> 20 sub-themes (27 in the long file: it has no "Logo/icon design")
    assert len({it.raw_sub_theme for it in bench}) == (28 if name == "test_prompts_en.csv" else 27)
    assert len({ugb.primary_dimension(p) for it in bench for p in it.testpoints}) == 10
    counts = Counter(p for it in bench for p in it.testpoints)
    assert len(counts) == 27
    if name == "test_prompts_en.csv":
        assert counts["Style"] == 250 and counts["Attribute - Color"] == 30 and sum(counts.values()) == 1813
        assert bench.warnings == []
    else:  # the public long file's row 509 misses a comma between two test points: repaired and reported
        assert len(bench.warnings) == 1 and "index 509" in bench.warnings[0]
        assert bench.by_index()[509].testpoints[1:3] == ("Grammar - Negation", "Attribute - Color")
        with pytest.raises(ugb.UniGenBenchError, match=r"line 511 \(index 509\).*not valid JSON"):
            ugb.load_unigenbench(DATA / name, repair=False)


def _dims(points=("Style", "Attribute - Color"), descs=("ink", "red"), **over):
    d = {"Primary Categories": "Art", "Secondary Categories": "Art-Graphic Art", "Subjects": "Animal",
         "Sentence Structure": "descriptive sentence pattern", "Testpoints": list(points),
         "Testpoint Description": list(descs)}
    d.update(over)
    return json.dumps(d)


def _write(path, rows, header=("index", "prompt_en", "sub_dims_en")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_small_file_normalises_spellings(tmp_path):
    bench = ugb.load_unigenbench(_write(tmp_path / "p.csv", [[0, "a cat", _dims()], [1, "a dog", _dims(
        **{"Secondary Categories": "Brand New Sub-theme"})]]))
    a, b = bench.items
    assert (a.sub_theme, a.raw_sub_theme, a.sentence) == ("Graphic Art", "Art-Graphic Art", "Descriptive")
    assert b.sub_theme == "Brand New Sub-theme"  # kept as written, and reported
    assert len(bench.warnings) == 1 and "Brand New Sub-theme" in bench.warnings[0]


@pytest.mark.parametrize("rows,header,match", [
    ([[0, "a cat", _dims()]], ("index", "prompt", "sub_dims_en"), r"missing \['prompt_en'\]"),
    ([[0, "a cat", _dims()], [1, "a dog", '{"Testpoints": ["Style"'], ], None, r"line 3 \(index 1\).*not valid JSON"),
    ([[0, "a cat", _dims(descs=("ink",))]], None, r"line 2 \(index 0\): 2 test points but 1 descriptions"),
    ([[0, "a cat", json.dumps({"Testpoints": ["Style"], "Testpoint Description": ["x"]})]], None, "lacks the key"),
    ([[0, "a cat", _dims()], [0, "a dog", _dims()]], None, r"index 0 repeats the row on line 2"),
    ([["x", "a cat", _dims()]], None, r"index 'x' is not a non-negative integer"),
    ([[0, "  ", _dims()]], None, "prompt_en column is empty"),
    ([[0, "a cat", _dims(points=())]], None, "non-empty list of test point names"),
    ([[0, "a cat", "[1, 2]"]], None, "must be a JSON object"),
])
def test_malformed_rows_are_refused_naming_the_row(tmp_path, rows, header, match):
    path = _write(tmp_path / "bad.csv", rows, header or ("index", "prompt_en", "sub_dims_en"))
    with pytest.raises(ugb.UniGenBenchError, match=match):
        ugb.load_unigenbench(path)


def test_chinese_layout_keys_are_read(tmp_path):
    dims = {"一级垂类": "艺术", "二级垂类": "平面艺术", "主体": "动物", "考点": ["风格", "属性-数量"], "句式": "描述式",
            "考点对应描述": ["古典水墨画风格", "两只熊猫"]}
    bench = ugb.load_unigenbench(_write(tmp_path / "zh.csv", [[0, "两只熊猫", json.dumps(dims, ensure_ascii=False)]],
                                        ("index", "prompt_zh", "sub_dims_zh")))
    assert bench.language == "zh" and bench.items[0].testpoints == ("风格", "属性-数量")
    assert ugb.primary_dimension("属性-数量") == "属性"
    assert bench.warnings == [] and bench.items[0].sub_theme == "平面艺术"
    assert "考点说明:「\n风格: 艺术、绘画、摄影、设计风格" in ugb.judge_prompt(bench.items[0])  # the Chinese protocol
    odd = ugb.BenchItem(0, "p", "艺术", "其他", "动物", "描述式", ("风格", "新考点"), ("a", "b"))
    with pytest.raises(ugb.UniGenBenchError, match=r"no definition for the test point\(s\) \['新考点'\]"):
        ugb.judge_prompt(odd)
    assert "新考点: 自定义" in ugb.judge_prompt(odd, {"新考点": "自定义"})  # definitions= adds names


# ------------------------------------------------------------------------------------------ Chinese files ---


def test_chinese_tables_mirror_the_english_ones():
    assert set(TESTPOINTS_ZH_TO_EN) == set(TESTPOINT_DEFINITIONS_ZH)  # 27 Chinese test points, each defined
    assert sorted(TESTPOINTS_ZH_TO_EN.values()) == sorted(TESTPOINT_DEFINITIONS_EN)  # one to one onto the English
    assert len({ugb.primary_dimension(p) for p in TESTPOINT_DEFINITIONS_ZH}) == 10
    assert [len(v) for v in SUB_THEMES_ZH.values()] == [len(v) for v in SUB_THEMES.values()]  # 4+3+2+2+9 = 20


# toy prompts (the toy HTTP judge reads them) under Chinese categories and test points, spelt as the public zh CSVs
ZH_ITEMS = [
    ugb.BenchItem(0, "two red circles", "艺术", "艺术-平面艺术", "动物", "描述式句式", ("风格", "属性-数量"),
                  ("古典水墨画风格", "两只熊猫")),
    ugb.BenchItem(1, "a blue square", "设计", "logo/icon设计", "其他实体", "指令式", ("文本生成", "世界知识", "属性-颜色"),
                  ("“你好”", "埃及金字塔", "蓝色")),
]


def test_chinese_file_is_judged_with_the_reference_chinese_protocol(tmp_path, capsys):
    """A Chinese-layout file (prompt_zh, sub_dims_zh, Chinese keys) loads with its spellings normalised, gets the
    reference's Chinese instruction and definitions, and runs through the CLI and an HTTP judge without
    --definitions."""
    from imgalign.cli import main

    ugb.write_unigenbench_csv(tmp_path / "zh.csv", ZH_ITEMS, language="zh")
    with open(tmp_path / "zh.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["index", "prompt_zh", "sub_dims_zh"]
    assert json.loads(rows[0]["sub_dims_zh"])["考点"] == ["风格", "属性-数量"]
    bench = ugb.load_unigenbench(tmp_path / "zh.csv")
    assert bench.language == "zh" and bench.warnings == []
    a, b = bench.items
    assert (a.sub_theme, a.raw_sub_theme, a.sentence) == ("平面艺术", "艺术-平面艺术", "描述式")
    assert (b.theme_sub_theme, b.sentence) == ("设计 / logo/icon设计", "指令式")
    prompt = ugb.judge_prompt(a)
    assert prompt.startswith("你是一个精确且客观的中文图像描述系统。") and "提示词为「two red circles」" in prompt
    assert "<checkpoint>['风格', '属性-数量']</checkpoint>" in prompt and "Checkpoint" not in prompt
    assert ("考点说明:「\n风格: 艺术、绘画、摄影、设计风格，及对应艺术家名称\n属性-数量: 重点考察三个或三个以上的数字难点\n」"
            in prompt)
    assert "考点描述说明:「\n风格: 古典水墨画风格\n属性-数量: 两只熊猫\n」" in prompt
    with pytest.raises(ugb.UniGenBenchError, match="the en definitions cover 27"):
        ugb.judge_prompt(a, language="en")  # Chinese names have no English definitions

    _toy_images(tmp_path / "images", bench, k=2)
    with ToyJudgeServer() as server:
        assert main(["eval", "unigenbench", "--prompts", str(tmp_path / "zh.csv"), "--images", str(tmp_path / "images"),
                     "--images-per-prompt", "2", "--base-url", server.base_url, "--judge-model", "toy",
                     "--image-format", "PNG", "--quiet", "--out", str(tmp_path / "run")]) == 0
        assert server.requests == 4
    capsys.readouterr()
    scores = json.loads((tmp_path / "run" / "scores.json").read_text(encoding="utf-8"))
    assert scores["counts"] == {"prompts": 2, "images": 4, "judged": 4, "unparsable": 0, "testpoint_judgements": 10}
    assert set(scores["sub_dimension"]) == {"风格", "属性-数量", "文本生成", "世界知识", "属性-颜色"}
    assert set(scores["primary"]) == {"风格", "属性", "文本生成", "世界知识"} and scores["primary"]["属性"]["total"] == 4
    assert set(scores["theme"]) == {"艺术", "设计"}
    assert "属性-数量" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")


@needs_zh_data
@pytest.mark.parametrize("name", ["test_prompts_zh.csv", "test_prompts_zh_long.csv"])
def test_real_chinese_files_load_normalised_with_every_test_point_defined(name):
    bench = ugb.load_unigenbench(DATA / name)
    assert len(bench) == 600 and bench.language == "zh" and bench.warnings == []
    for it in bench:
        assert all(p in TESTPOINT_DEFINITIONS_ZH for p in it.testpoints), it.testpoints
        assert it.sub_theme in SUB_THEMES_ZH[it.theme], (it.theme, it.raw_sub_theme)
        assert it.sentence in ("描述式", "指令式")
        ugb.judge_prompt(it)
    assert {it.theme_sub_theme for it in bench} == {f"{t} / {s}" for t, subs in SUB_THEMES_ZH.items() for s in subs}
    assert len({p for it in bench for p in it.testpoints}) == 27
    english = DATA / name.replace("_zh", "_en")
    if english.is_file():  # the same benchmark in English: the test points correspond row by row
        en = ugb.load_unigenbench(english).by_index()
        assert all([TESTPOINTS_ZH_TO_EN[p] for p in it.testpoints] == list(en[it.index].testpoints) for it in bench)


# ------------------------------------------------------------------------------ judge prompt and parsing ---


ITEM = ugb.BenchItem(index=7, prompt="two pandas in ink", theme="Art", sub_theme="Graphic Art", subject="Animal",
                     sentence="Descriptive", testpoints=("Style", "Attribute - Quantity"), descriptions=("ink", "two"))


def test_judge_prompt_lists_test_points_definitions_and_descriptions():
    text = ugb.judge_prompt(ITEM)
    assert "\u300ctwo pandas in ink\u300d" in text and "<prompt>two pandas in ink</prompt>" in text
    assert "<checkpoint>['Style', 'Attribute - Quantity']</checkpoint>" in text
    assert "\nStyle: Art, painting, photography, design styles" in text and "\nAttribute - Quantity: ink" not in text
    assert "Checkpoints Description:\u300c\nStyle: ink\nAttribute - Quantity: two\n\u300d" in text
    assert "<score>A list using square brackets" in text


@pytest.mark.parametrize("answer,scores,error", [
    ("<description><analysis>['ok', 'no']</analysis><score>[1, 0]</score></description>", [1, 0], None),
    ("Sure!\n<analysis>[\"a\", \"b\"]</analysis>\n<score>\n[1.0, \"1\"]\n</score>\nHope this helps.", [1, 1], None),
    ("<think>maybe <score>[0]</score></think><analysis>['a','b']</analysis><score>[0, 1]</score>", [0, 1], None),
    ("<score>[1, 1]</score>", [1, 1], None),  # no analysis: the scores decide
    ("<score>[1, 0, 1]</score>", None, "3 values for 2 test points"),
    ("<analysis>['a']</analysis><score>[1, 0]</score>", None, "<analysis> has 1 entries"),
    ("<analysis>['a', 'b']</analysis> scores: 1, 0", None, "no <score>"),
    ("<score>[1, 2]</score>", None, "not 0 or 1"),
    ("<score>yes, yes</score>", None, "does not hold a list"),
    ("", None, "empty answer"),
])
def test_parse_judge_answer(answer, scores, error):
    parsed = ugb.parse_judge_answer(answer, 2)
    assert parsed.scores == scores
    assert (parsed.error is None) if error is None else (error in parsed.error)


def _toy_images(folder: Path, items, k: int = 2, seed: int = 0) -> None:
    """Exact renders of each toy prompt (a renderer sample is checked exactly by the evaluator), plus a wrong
    render for half of them so the accuracies are not all 1."""
    from imgalign.toy import parse, perturb_scene, render

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for it in items:
        for j in range(k):
            scene = parse(it.prompt) if j % 2 == 0 else perturb_scene(parse(it.prompt), rng)
            render(scene, rng)[0].save(folder / ugb.image_name(it.index, j))


class Scripted:
    """A backend answering fn(image, text) per request, counting its generate() calls."""

    def __init__(self, answers):
        self.answers, self.calls = answers, 0

    def generate(self, requests):
        self.calls += 1
        return [self.answers(r.image_1, r.text) for r in requests]


def test_retries_and_the_unparsable_count(tmp_path):
    bench = ugb.UniGenBench("toy", "en", ugb.toy_items(["a red circle", "two blue squares"]))
    _toy_images(tmp_path / "img", bench, k=2)
    seen = Counter()

    def answer(image, key):  # prompt 0: malformed twice, then right; prompt 1: always wrong length
        seen[key] += 1
        if "two blue squares" in key:
            return "<score>[1]</score>"
        return "garbage" if seen[key] % 3 else toy_answer(image, key)

    backend = ugb.make_judge_backend(answer)
    records, stats = ugb.judge_images(bench, tmp_path / "img", backend, tmp_path / "a.jsonl", images_per_prompt=2,
                                      max_retries=2, definitions=TOY_DEFS, batch_size=1, progress=False)
    assert [r["scores"] is None for r in records] == [False, False, True, True]
    assert [r["attempts"] for r in records] == [3, 3, 3, 3]
    assert (stats.unparsable, stats.retries, stats.requests, stats.asked) == (2, 8, 12, 4)
    assert "4 values" not in records[2]["error"] and "1 values for 4 test points" in records[2]["error"]
    result = ugb.score_answers(bench, records)
    assert result["counts"] == {"prompts": 1, "images": 4, "judged": 2, "unparsable": 2, "testpoint_judgements": 8}


# ---------------------------------------------------------------------------------------------- scoring ---


def _hand_bench():
    a = ugb.BenchItem(0, "p0", "Art", "Graphic Art", "Animal", "Descriptive",
                      ("Style", "Attribute - Color", "Attribute - Shape"), ("s", "c", "h"))
    b = ugb.BenchItem(1, "p1", "Design", "UI Design", "Scene", "Imperative", ("Style", "World Knowledge"), ("s", "w"))
    return ugb.UniGenBench("hand", "en", [a, b])


def _hand_answers(b_scores=((1, 0), (0, 0))):
    rows = [(0, 0, [1, 1, 0]), (0, 1, [0, 1, 1]), (1, 0, list(b_scores[0])), (1, 1, list(b_scores[1])), (1, 2, None)]
    bench = _hand_bench().by_index()
    return [{"file": f"{i}_{k}.png", "index": i, "k": k, "testpoints": list(bench[i].testpoints), "scores": s}
            for i, k, s in rows]


def test_scores_against_hand_computed_accuracies():
    """Prompt 0 (Art / Graphic Art; Style, Attribute - Color, Attribute - Shape), two images: [1,1,0] and [0,1,1].
    Prompt 1 (Design / UI Design; Style, World Knowledge), images [1,0], [0,0] and one unparsable (left out).
      Style: 1+0+1+0 = 2/4; World Knowledge: 0/2; Attribute - Color 2/2, Attribute - Shape 1/2 -> Attribute 3/4.
      primary_mean = (2/4 + 3/4 + 0/2) / 3 = 5/12; testpoint_mean = (1+1+0+0+1+1+1+0+0+0) / 10 = 5/10;
      sub_dimension_mean = (2/4 + 2/2 + 1/2 + 0/2) / 4 = 1/2; theme Art 4/6, Design 1/4."""
    r = ugb.score_answers(_hand_bench(), _hand_answers())
    acc = lambda g, k: r[g][k]["accuracy"]  # noqa: E731
    assert (r["primary"]["Style"]["correct"], r["primary"]["Style"]["total"]) == (2, 4)
    assert acc("primary", "Attribute") == 3 / 4 and acc("primary", "World Knowledge") == 0
    assert acc("sub_dimension", "Attribute - Shape") == 1 / 2 and acc("sub_dimension", "Attribute - Color") == 1
    assert r["overall"]["primary_mean"] == pytest.approx(5 / 12)
    assert r["overall"]["testpoint_mean"] == pytest.approx(5 / 10)
    assert r["overall"]["sub_dimension_mean"] == pytest.approx(1 / 2)
    assert acc("theme", "Art") == pytest.approx(4 / 6) and acc("theme", "Design") == pytest.approx(1 / 4)
    assert acc("sub_theme", "Design / UI Design") == pytest.approx(1 / 4) and acc("subject", "Scene") == 1 / 4
    assert r["counts"] == {"prompts": 2, "images": 5, "judged": 4, "unparsable": 1, "testpoint_judgements": 10}
    assert r["per_prompt"]["1"] == {"Style": [1, 2], "World Knowledge": [0, 2], "all": [1, 4]}


def test_outputs_json_csv_markdown_chart(tmp_path):
    r = ugb.score_answers(_hand_bench(), _hand_answers())
    paths = ugb.write_outputs(r, tmp_path)
    assert json.loads(Path(paths["json"]).read_text())["overall"]["primary_mean"] == pytest.approx(5 / 12)
    rows = list(csv.DictReader(open(paths["csv"], encoding="utf-8")))
    assert {"group": "primary", "name": "Attribute", "correct": "3", "total": "4", "accuracy": "0.75"} in rows
    text = Path(paths["markdown"]).read_text()
    assert "41.67" in text and "| Attribute - Shape | 50.00 | 1 / 2 |" in text and "dimensions.png" in text
    assert (tmp_path / "dimensions.png").stat().st_size > 0


def test_compare_paired_bootstrap(tmp_path):
    a = ugb.score_answers(_hand_bench(), _hand_answers())
    same = ugb.compare_runs(a, a, n_boot=200)
    assert all(m["delta"] == 0 and m["lo"] == 0 and m["hi"] == 0 for m in same["metrics"].values())
    b = ugb.score_answers(_hand_bench(), _hand_answers(b_scores=((1, 1), (1, 1))))  # prompt 1 all right
    cmp = ugb.compare_runs(a, b, n_boot=500)
    m = cmp["metrics"]["overall/testpoint_mean"]
    assert (m["a"], m["b"], m["delta"]) == pytest.approx((5 / 10, 8 / 10, 3 / 10))
    assert 0 <= m["lo"] <= m["delta"] <= m["hi"]
    assert cmp["metrics"]["primary/World Knowledge"]["delta"] == 1.0
    assert cmp["metrics"]["primary/Attribute"]["delta"] == 0.0  # prompt 0 did not change
    assert "| overall/testpoint_mean | 50.00 | 80.00 | 30.00 |" in ugb.compare_markdown(cmp)


class StrictHTML(HTMLParser):
    """Fails on an end tag that does not close the open element, keeps the text and the attributes seen."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.text, self.attrs, self.tags = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-3:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    @classmethod
    def check(cls, page: str) -> StrictHTML:
        parser = cls()
        parser.feed(page)
        parser.close()
        assert parser.stack == [] and page.startswith("<!DOCTYPE html>")
        assert "script" not in parser.tags and not any(k in ("href", "srcset") for k, _ in parser.attrs)
        assert all(v.startswith("data:image/png;base64,") for k, v in parser.attrs if k == "src")  # no external asset
        return parser


def test_html_report_is_self_contained_escaped_and_holds_the_numbers(tmp_path):
    bench = _hand_bench()
    evil = '<script>alert("x")</script> & a cat'
    bench.items[0] = dataclasses.replace(bench.items[0], prompt=evil, theme="Art <b>")
    r = ugb.score_answers(bench, _hand_answers())
    r["judge"] = {"backend": "openai", "model": "<img src=x onerror=alert(1)>", "retries": 3, "unparsable": 1}
    paths = ugb.write_outputs(r, tmp_path, title="run <1>", bench=bench)
    page = Path(paths["html"]).read_text(encoding="utf-8")
    parsed = StrictHTML.check(page)
    text = " ".join(parsed.text)
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; a cat" in page
    assert evil in text and "Art <b>" in text and "<img src=x onerror=alert(1)>" in text and "run <1>" in text
    # the numbers of the result (hand-computed in test_scores_against_hand_computed_accuracies), with the averaging
    assert "41.67" in text and "50.00" in text and "mean of the primary-dimension accuracies" in text
    assert "75.00 3 / 4" in " ".join(text.split()) and "Attribute - Shape 50.00 1 / 2" in " ".join(text.split())
    assert "Design / UI Design 25.00 1 / 4" in " ".join(text.split())
    (src,) = [v for k, v in parsed.attrs if k == "src"]  # the chart, embedded
    assert base64.b64decode(src.split(",", 1)[1]) == (tmp_path / "dimensions.png").read_bytes()
    # the prompts, lowest accuracy first: prompt 1 (1/4) before prompt 0 (4/6)
    assert text.index("p1") < text.index(evil)


def test_compare_html(tmp_path):
    a = ugb.score_answers(_hand_bench(), _hand_answers())
    b = ugb.score_answers(_hand_bench(), _hand_answers(b_scores=((1, 1), (1, 1))))
    text = ugb.write_compare_outputs(ugb.compare_runs(a, b, n_boot=200), tmp_path, "base <a>", "tuned")
    assert "| overall/testpoint_mean | 50.00 | 80.00 | 30.00 |" in text
    page = (tmp_path / "compare.html").read_text(encoding="utf-8")
    words = " ".join(" ".join(StrictHTML.check(page).text).split())
    assert "overall/testpoint_mean 50.00 80.00 30.00" in words and "base <a>" in words and "<a>" not in page
    assert json.loads((tmp_path / "compare.json").read_text())["metrics"]["overall/testpoint_mean"]["b"] == 0.8


# ------------------------------------------------------------------------------------------------ resume ---


class FakePipe:
    """A pipeline stand-in: image k is noise from its own generator's seed; raises KeyboardInterrupt (a kill) on
    call number `die_at`."""

    def __init__(self, die_at: int | None = None):
        self.calls, self.die_at = 0, die_at

    def __call__(self, prompt, num_images_per_prompt, generator, **kw):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        images = [Image.fromarray(np.random.default_rng(g.initial_seed()).integers(0, 255, (16, 16, 3), np.uint8))
                  for g in generator]
        return type("Out", (), {"images": images})()


def test_killed_generation_and_judging_resume_to_the_same_result(tmp_path):
    bench = ugb.UniGenBench("toy", "en", ugb.toy_items(["a red circle", "two blue squares", "a green triangle"]))
    ugb.generate_images(FakePipe(), bench, tmp_path / "full", images_per_prompt=2, progress=False)
    with pytest.raises(KeyboardInterrupt):
        ugb.generate_images(FakePipe(die_at=2), bench, tmp_path / "killed", images_per_prompt=2, progress=False)
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == ["0_0.png", "0_1.png"]
    pipe = FakePipe()
    assert ugb.generate_images(pipe, bench, tmp_path / "killed", images_per_prompt=2, progress=False) == 4
    assert pipe.calls == 2  # prompt 0 was not generated again
    for name in os.listdir(tmp_path / "full"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes()

    def answer(image, text):  # deterministic per image: scores from the image's first pixel
        n = text.split("<checkpoint>")[1].split("</checkpoint>")[0].count(",") + 1
        bit = int(np.asarray(image)[0, 0, 0] > 127)
        return f"<score>{[bit] * n}</score>"

    def dying(after):
        calls = {"n": 0}

        def fn(image, text):
            calls["n"] += 1
            if calls["n"] > after:
                raise KeyboardInterrupt
            return answer(image, text)
        return fn

    kw = dict(images_per_prompt=2, definitions=TOY_DEFS, batch_size=1, progress=False)
    full, _ = ugb.judge_images(bench, tmp_path / "full", ugb.make_judge_backend(answer), tmp_path / "full.jsonl", **kw)
    with pytest.raises(KeyboardInterrupt):
        ugb.judge_images(bench, tmp_path / "killed", ugb.make_judge_backend(dying(3)), tmp_path / "k.jsonl", **kw)
    with open(tmp_path / "k.jsonl", "a") as f:
        f.write('{"file": "2_1.png", "ind')  # a line cut short by the kill
    counted = Scripted(answer)
    resumed, stats = ugb.judge_images(bench, tmp_path / "killed", counted, tmp_path / "k.jsonl", **kw)
    assert (stats.cached, stats.asked, counted.calls) == (3, 3, 3)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "answer"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(full)
    assert ugb.score_answers(bench, resumed) == ugb.score_answers(bench, full)
    (tmp_path / "killed" / "0_0.png").write_bytes((tmp_path / "full" / "1_0.png").read_bytes())  # image changed
    _, stats = ugb.judge_images(bench, tmp_path / "killed", Scripted(answer), tmp_path / "k.jsonl", **kw)
    assert (stats.cached, stats.asked) == (5, 1)


# -------------------------------------------------------------------------------------------- HTTP judge ---


def _toy_truth(bench, folder, k):
    """Per test point: the fraction of images whose toy evaluator criterion is 1.0 (the toy evaluator's own
    numbers, computed here without any judge)."""
    from imgalign.toy import evaluate

    hits = Counter()
    totals = Counter()
    for it in bench:
        for j in range(k):
            criteria = evaluate(Image.open(folder / ugb.image_name(it.index, j)).convert("RGB"), it.prompt).criteria
            for criterion, value in criteria.items():
                totals[TOY_TESTPOINTS[criterion]] += 1
                hits[TOY_TESTPOINTS[criterion]] += value == 1.0
    return {p: hits[p] / totals[p] for p in totals}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from imgalign.toy import load_prompt_set

    root = tmp_path_factory.mktemp("toy_ugb")
    bench = ugb.UniGenBench("toy", "en", ugb.toy_items(load_prompt_set("test")[:12]))
    ugb.write_unigenbench_csv(root / "toy.csv", bench)
    _toy_images(root / "images", bench, k=2, seed=1)
    return root, ugb.load_unigenbench(root / "toy.csv")


def test_http_judge_against_the_local_toy_server_matches_the_evaluator(toy_run):
    root, bench = toy_run
    assert [it.testpoints for it in bench] == [it.testpoints for it in ugb.toy_items([it.prompt for it in bench])]
    with ToyJudgeServer(malformed_every=3) as server:
        backend = ugb.make_judge_backend("openai", base_url=server.base_url, model="toy", image_format="PNG",
                                         concurrency=4, max_retries=1, timeout=30)
        records, stats = ugb.judge_images(bench, root / "images", backend, root / "http.jsonl", images_per_prompt=2,
                                          definitions=TOY_DEFS, progress=False)
        assert server.malformed > 0 and stats.retries == server.malformed and stats.unparsable == 0
    result = ugb.score_answers(bench, records)
    truth = _toy_truth(bench, root / "images", 2)
    assert {k: v["accuracy"] for k, v in result["sub_dimension"].items()} == pytest.approx(truth)
    assert 0 < result["overall"]["testpoint_mean"] < 1


def test_cli_judge_compare_and_reward(toy_run, tmp_path, capsys):
    from imgalign.cli import main

    root, bench = toy_run
    with ToyJudgeServer() as server:
        args = ["eval", "unigenbench", "--prompts", str(root / "toy.csv"), "--images", str(root / "images"),
                "--images-per-prompt", "2", "--base-url", server.base_url, "--judge-model", "toy", "--image-format",
                "PNG", "--quiet"]
        # the toy "Background" test point needs its definition: the CLI refuses it clearly (exit 2)
        assert main(args + ["--out", str(tmp_path / "run")]) == 2
        assert "no definition for the test point(s) ['Background']" in capsys.readouterr().err
        nobg = [it for it in bench if "Background" not in it.testpoints]
        ugb.write_unigenbench_csv(tmp_path / "nobg.csv", nobg)
        args[3] = str(tmp_path / "nobg.csv")
        assert main(args + ["--out", str(tmp_path / "run")]) == 0
        assert main(args + ["--out", str(tmp_path / "run")]) == 0  # everything cached
        assert f"{2 * len(nobg)} cached, 0 asked" in capsys.readouterr().out
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert scores["counts"]["images"] == 2 * len(nobg) and scores["judge"]["unparsable"] == 0
    assert main(["eval", "unigenbench", "--compare", str(tmp_path / "run"), str(tmp_path / "run"),
                 "--out", str(tmp_path / "cmp")]) == 0
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["metrics"]["overall/primary_mean"]["delta"] == 0
    assert (tmp_path / "cmp" / "compare.html").is_file() and (tmp_path / "run" / "report.html").is_file()
    assert nobg[0].prompt in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")  # the prompts listed
    assert main(["eval", "unigenbench", "--prompts", str(root / "toy.csv"), "--images", str(root / "images"),
                 "--images-per-prompt", "2", "--reward", "toy", "--out", str(tmp_path / "rw")]) == 0
    from imgalign.toy import evaluate

    got = json.loads((tmp_path / "rw" / "reward_toy.json").read_text())
    want = [evaluate(Image.open(root / "images" / r["file"]).convert("RGB"), bench.by_index()[r["index"]].prompt).score
            for r in got["per_image"]]
    assert [r["score"] for r in got["per_image"]] == pytest.approx(want)
    assert main(["eval", "unigenbench", "--out", str(tmp_path / "x")]) == 2  # no --prompts: a user error


def test_cli_generates_missing_images_with_the_toy_pipeline(tmp_path):
    from imgalign.cli import main

    toy_sd = Path(__file__).resolve().parents[2] / "assets" / "toy" / "sd"
    if not (toy_sd / "model_index.json").is_file():
        pytest.skip("assets/toy/sd is not built")
    ugb.write_unigenbench_csv(tmp_path / "toy.csv", ugb.toy_items(["a red circle", "two blue squares"]))
    args = ["eval", "unigenbench", "--prompts", str(tmp_path / "toy.csv"), "--model", str(toy_sd), "--steps", "2",
            "--size", "32", "--images-per-prompt", "2", "--reward", "toy", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(args) == 0
    names = sorted(p.name for p in (tmp_path / "run" / "images").iterdir())
    assert names == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]
    first = (tmp_path / "run" / "images" / "1_1.png").read_bytes()
    (tmp_path / "run" / "images" / "1_1.png").unlink()
    assert main(args) == 0  # resumes: only the missing image is drawn, from its own seed
    assert (tmp_path / "run" / "images" / "1_1.png").read_bytes() == first


# ------------------------------------------------------------------------------- local transformers judge ---


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def tiny_qwen(request, tmp_path_factory):
    """A tiny random Qwen2.5-VL / Qwen3-VL (the classes of the released UniGenBench evaluation models) saved by path."""
    from imgalign.rewards.testing_qwen import save_tiny_qwen_vl

    return save_tiny_qwen_vl(tmp_path_factory.mktemp(request.param), family=request.param)


def _spy_generate(backend, monkeypatch, replace=None):
    """Record every model.generate call's inputs and options; ``replace(**kwargs)`` stands in for the model."""
    calls, real = [], backend.model.generate

    def generate(**kwargs):
        calls.append(kwargs)
        return (replace or real)(**kwargs)

    monkeypatch.setattr(backend.model, "generate", generate)
    return calls


def test_transformers_judge_runs_a_local_qwen_vl_end_to_end(tiny_qwen, tmp_path, monkeypatch):
    """Loaded by path through AutoModelForImageTextToText / AutoProcessor: each request is a chat turn with the image
    expanded into the model's image tokens, generation is bounded, the random model's text is decoded, counted
    unparsable after the re-ask (sampled, not greedy) and cached in the progress file."""
    bench = ugb.UniGenBench("toy", "en", ugb.toy_items(["a red circle", "two blue squares"]))
    _toy_images(tmp_path / "img", bench, k=2)
    backend = ugb.make_judge_backend("transformers", model=str(tiny_qwen), device="cpu", max_new_tokens=5)
    calls = _spy_generate(backend, monkeypatch)
    records, stats = ugb.judge_images(bench, tmp_path / "img", backend, tmp_path / "a.jsonl", images_per_prompt=2,
                                      max_retries=1, definitions=TOY_DEFS, progress=False)
    assert (stats.asked, stats.requests, stats.retries, stats.unparsable) == (4, 8, 4, 4)
    assert all(r["scores"] is None and r["attempts"] == 2 and isinstance(r["answer"], str) for r in records)
    assert all(r["error"] for r in records)
    # one batch of 4 first asks (greedy), one of 4 re-asks (sampled); every call bounded by max_new_tokens
    assert [(c["max_new_tokens"], c["do_sample"]) for c in calls] == [(5, False), (5, True)]
    assert calls[1]["temperature"] == 0.7 and calls[1]["top_k"] == 0
    first = calls[0]
    tokenizer = backend.processor.tokenizer
    pad, image_pad = tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids, mask, grid = first["input_ids"], first["attention_mask"], first["image_grid_thw"]  # [4, L], [4, L], [4, 3]
    assert ids.shape[0] == 4 and grid.shape == (4, 3) and first["pixel_values"].shape[0] == int(grid.prod(1).sum())
    merge = backend.processor.image_processor.merge_size ** 2
    assert (ids == image_pad).sum(1).tolist() == (grid.prod(1) // merge).tolist()  # one image per request, expanded
    assert mask[:, -1].all() and (ids[mask == 0] == pad).all()  # left padding
    for row, item in zip(ids, [bench.items[0]] * 2 + [bench.items[1]] * 2):
        text = tokenizer.decode(row[row != image_pad], skip_special_tokens=False).replace("<|endoftext|>", "")
        assert text.startswith("<|im_start|>system") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert "<|vision_start|><|vision_end|>" + ugb.judge_prompt(item, TOY_DEFS) + "<|im_end|>" in text
    cached = ugb.read_answers(tmp_path / "a.jsonl")
    assert [cached[r["file"]]["answer"] for r in records] == [r["answer"] for r in records]
    assert ugb.score_answers(bench, records)["counts"]["unparsable"] == 4
    calls.clear()  # a rerun asks nothing: the unparsable answers are cached too
    _, stats = ugb.judge_images(bench, tmp_path / "img", backend, tmp_path / "a.jsonl", images_per_prompt=2,
                                max_retries=1, definitions=TOY_DEFS, progress=False)
    assert (stats.cached, stats.asked, calls) == (4, 0, [])


def test_transformers_judge_decodes_and_parses_a_forced_answer(tiny_qwen, tmp_path, monkeypatch):
    """The model's generate is replaced by one that appends known token ids (the answer, <|im_end|>, then padding,
    as a batch comes back from generate); the backend's slicing and the processor's decoding must return the answer
    text exactly, and the scores follow."""
    bench = ugb.UniGenBench("toy", "en", ugb.toy_items(["a red circle", "two blue squares", "a green triangle"]))
    _toy_images(tmp_path / "img", bench, k=2)
    backend = ugb.make_judge_backend("transformers", model=str(tiny_qwen), max_new_tokens=512, batch_size=3)
    tokenizer = backend.processor.tokenizer

    def answer_for(prompt: str) -> str:
        points = ast.literal_eval(re.search(r"<checkpoint>(.*?)</checkpoint>", prompt).group(1))
        bit = 0 if "<prompt>two blue squares</prompt>" in prompt else 1
        return (f"<think>Checking {len(points)} points.</think>\n<description>\n<analysis>{['seen'] * len(points)}"
                f"</analysis>\n<score>{[bit] * len(points)}</score>\n</description>")

    def forced(input_ids, **kwargs):
        rows = [tokenizer(answer_for(tokenizer.decode(row, skip_special_tokens=True)),
                          add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for row in input_ids]
        width = max(map(len, rows))
        new = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    calls = _spy_generate(backend, monkeypatch, forced)
    records, stats = ugb.judge_images(bench, tmp_path / "img", backend, tmp_path / "a.jsonl", images_per_prompt=2,
                                      definitions=TOY_DEFS, progress=False)
    assert len(calls) == 2 and (stats.unparsable, stats.retries) == (0, 0)  # 6 images in batches of 3
    for r in records:
        item = bench.by_index()[r["index"]]
        assert r["answer"] == answer_for(ugb.judge_prompt(item, TOY_DEFS))  # decoded exactly, special tokens gone
        assert r["scores"] == [int(r["index"] != 1)] * len(item.testpoints)
        assert r["analysis"] == ["seen"] * len(item.testpoints)
    result = ugb.score_answers(bench, records)
    n = [len(it.testpoints) for it in bench]
    assert result["overall"]["testpoint_mean"] == pytest.approx((n[0] + n[2]) / sum(n))
    assert result["theme"]["Toy"]["correct"] == 2 * (n[0] + n[2])


def test_cli_transformers_judge_passes_its_options(tiny_qwen, tmp_path, monkeypatch, capsys):
    """`--judge transformers` with --judge-dtype / --judge-batch-size / --max-new-tokens / --retry-temperature reaches
    the local backend: generate sees the bound and the re-ask temperature, batches hold 2 images, scores are written."""
    import json

    from imgalign.cli import main
    from imgalign.rewards import vlm_judge

    bench = ugb.UniGenBench("toy", "en", ugb.toy_items(["a red circle", "two blue squares"]))
    _toy_images(tmp_path / "images", bench, k=2)
    ugb.write_unigenbench_csv(tmp_path / "toy.csv", bench.items)
    (tmp_path / "defs.json").write_text(json.dumps(TOY_DEFINITIONS))
    calls, real_init = [], vlm_judge.TransformersJudgeBackend.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        real = self.model.generate
        self.model.generate = lambda **kw: (calls.append(kw), real(**kw))[1]

    monkeypatch.setattr(vlm_judge.TransformersJudgeBackend, "__init__", init)
    assert main(["eval", "unigenbench", "--prompts", str(tmp_path / "toy.csv"), "--images", str(tmp_path / "images"),
                 "--images-per-prompt", "2", "--judge", "transformers", "--judge-model", str(tiny_qwen),
                 "--judge-dtype", "float32",
                 "--judge-batch-size", "2", "--max-new-tokens", "3", "--retry-temperature", "0.9",
                 "--max-retries", "1", "--definitions", str(tmp_path / "defs.json"), "--out", str(tmp_path / "run"),
                 "--quiet"]) == 0
    assert all(c["max_new_tokens"] == 3 and c["input_ids"].shape[0] <= 2 for c in calls) and len(calls) == 4
    assert [c.get("temperature") for c in calls if c["do_sample"]] == [0.9, 0.9]
    result = json.loads((tmp_path / "run" / "scores.json").read_text())
    assert result["judge"]["backend"] == "transformers" and result["judge"]["unparsable"] == 4
    assert (tmp_path / "run" / "report.html").is_file()
    calls.clear()  # a missing image is reported before the judge loads
    (tmp_path / "images" / "1_1.png").unlink()
    assert main(["eval", "unigenbench", "--prompts", str(tmp_path / "toy.csv"), "--images", str(tmp_path / "images"),
                 "--images-per-prompt", "2", "--judge", "transformers", "--judge-model", str(tmp_path / "nowhere"),
                 "--out", str(tmp_path / "run2"), "--quiet"]) == 2
    assert "1 of 4 images are missing (first: ['1_1.png'])" in capsys.readouterr().err
