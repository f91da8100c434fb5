"""UniGenBench reports as self-contained HTML pages: one file, inline CSS, the chart embedded as a base64 PNG, no
script and no external asset, so a report can be mailed, attached to an issue or opened offline.

:func:`report_html` renders a run (`imgalign.eval.unigenbench.score_answers` output, with ``judge`` stats when
present); :func:`compare_html` renders :func:`imgalign.eval.unigenbench.compare_runs` output. Every piece of text
from the data (test point and category names, run names, the judge model) is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 70em;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.bar { width: 14em; }
.bar > div { background: #4C72B0; height: 0.8em; }
.up { color: #1a7f37; } .down { color: #c62828; }
img { max-width: 100%; border: 1px solid #ddd; }
"""

#: (result key, section heading, first column)
GROUPS = (("primary", "Primary dimensions", "primary dimension"),
          ("sub_dimension", "Sub-dimensions (test points)", "sub-dimension"),
          ("theme", "Themes", "theme"), ("sub_theme", "Sub-themes", "theme / sub-theme"),
          ("subject", "Subjects", "subject"))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(x: Any) -> str:
    x = float(x)
    return "nan" if x != x else f"{100 * x:.2f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[tuple[str, str]]]) -> str:
    """rows: cells of (css class, already-escaped html)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f'<td class="{c}">{v}</td>' if c else f"<td>{v}</td>" for c, v in row)
                     + "</tr>" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def _page(title: str, body: str) -> str:
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{_e(title)}</title>\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n<h1>{_e(title)}</h1>\n{body}\n</body>\n</html>\n")


def _accuracy_table(cells: Mapping[str, Mapping[str, Any]], heading: str) -> str:
    rows = []
    for name, v in cells.items():
        acc = float(v["accuracy"])
        width = 0.0 if acc != acc else max(0.0, min(100.0, 100 * acc))
        rows.append([("", _e(name)), ("num", _pct(acc)), ("num", f"{int(v['correct'])} / {int(v['total'])}"),
                     ("bar", f'<div style="width: {width:.1f}%"></div>')])
    return _table([heading, "accuracy (%)", "correct / total", ""], rows)


def report_html(result: Mapping[str, Any], title: str = "UniGenBench", chart_png: bytes | None = None,
                prompts: Mapping[int, tuple[str, Sequence[str]]] | None = None) -> str:
    """One run: counts, the overall numbers with their averaging, the chart, a table per grouping, judge stats, and
    with ``prompts`` (index -> (prompt, test points)) every judged prompt, lowest accuracy first (collapsed)."""
    o, c = result["overall"], result["counts"]
    parts = [f"<p>{int(c['images'])} images of {int(c['prompts'])} prompts judged ({int(c['unparsable'])} unparsable "
             f"answers left out), {int(c['testpoint_judgements'])} test-point judgements.</p>",
             "<h2>Overall</h2>",
             _table(["number", "value (%)", "averaging"], [
                 [("", "<strong>primary_mean</strong>"), ("num", f"<strong>{_pct(o['primary_mean'])}</strong>"),
                  ("", "mean of the primary-dimension accuracies (the leaderboard's overall)")],
                 [("", "testpoint_mean"), ("num", _pct(o["testpoint_mean"])),
                  ("", "all (image, test point) judgements pooled")],
                 [("", "sub_dimension_mean"), ("num", _pct(o["sub_dimension_mean"])),
                  ("", "mean of the sub-dimension (test point) accuracies")]])]
    if chart_png:
        data = base64.b64encode(chart_png).decode("ascii")
        parts.append(f'<img alt="accuracy per dimension" src="data:image/png;base64,{data}">')
    for group, heading, column in GROUPS:
        if result.get(group):
            parts += [f"<h2>{_e(heading)}</h2>", _accuracy_table(result[group], column)]
    if prompts:
        parts.append(_prompt_table(result, prompts))
    judge = result.get("judge")
    if judge:
        parts += ["<h2>Judge</h2>", _table(["judge", "value"], [[("", _e(k)), ("num" if isinstance(v, (int, float)) else "",
                                                                     _e(v))] for k, v in judge.items()])]
    return _page(title, "\n".join(parts))


def _prompt_table(result: Mapping[str, Any], prompts: Mapping[int, tuple[str, Sequence[str]]]) -> str:
    rows = []
    for index, cells in result.get("per_prompt", {}).items():
        correct, total = cells["all"]
        prompt, points = prompts.get(int(index), ("", ()))
        rows.append((correct / total if total else float("nan"), int(index), prompt, points, correct, total))
    rows.sort(key=lambda r: (r[0], r[1]))
    table = _table(["index", "prompt", "test points", "accuracy (%)", "correct / total"], [
        [("num", str(i)), ("", _e(prompt)), ("", _e(", ".join(points))), ("num", _pct(acc)), ("num", f"{c} / {t}")]
        for acc, i, prompt, points, c, t in rows])
    return (f"<h2>Prompts</h2>\n<details>\n<summary>{len(rows)} judged prompts, lowest accuracy first</summary>\n"
            f"{table}\n</details>")


def compare_html(cmp: Mapping[str, Any], name_a: str = "a", name_b: str = "b") -> str:
    """Two runs side by side: accuracy of each, the difference b - a and its paired bootstrap interval; a
    difference whose interval excludes 0 is coloured."""
    title = f"UniGenBench: {name_b} vs {name_a}"
    rows = []
    for name, r in cmp["metrics"].items():
        lo, hi = float(r["lo"]), float(r["hi"])
        css = "num up" if lo > 0 else "num down" if hi < 0 else "num"
        rows.append([("", _e(name)), ("num", _pct(r["a"])), ("num", _pct(r["b"])), (css, _pct(r["delta"])),
                     ("num", f"[{_pct(lo)}, {_pct(hi)}]")])
    body = (f"<p>Paired bootstrap over {int(cmp['prompts'])} prompts ({int(cmp['n_boot'])} draws, "
            f"{100 * float(cmp['confidence']):.0f}% percentile intervals of {_e(name_b)} - {_e(name_a)}, accuracy "
            "in %). overall/primary_mean is the mean of the primary-dimension accuracies (the leaderboard's overall), "
            "overall/testpoint_mean pools all test-point judgements.</p>\n"
            + _table(["metric", name_a, name_b, "difference", "interval"], rows))
    return _page(title, body)
