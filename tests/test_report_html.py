"""report.py: one self-contained, escaped, offline HTML page."""

import re

import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from mclcbf_diag.errors import UserError
from mclcbf_diag.report.html import Section, figure_html, write_figures, write_page

EVIL = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"


def _fig(y):
    return go.Figure(go.Scatter(x=[0, 1, 2], y=y, name="line"))


def test_figure_html_is_a_fragment_without_plotlyjs():
    frag = figure_html(_fig([1, 2, 3]), div_id="my-div")
    assert frag.lstrip().startswith("<div") and 'id="my-div"' in frag
    assert "<html" not in frag and len(frag) < 100_000  # no 4 MB bundle inside
    assert "<script src" not in frag


def test_page_self_contained_and_escaped(tmp_path):
    table = pd.DataFrame({"metric": [EVIL, "ok"], EVIL: [1.0, 2.0]})
    sections = [
        Section(heading=EVIL, text=f"first {EVIL}\n\nsecond paragraph ‖θ*‖",
                figures=[_fig([1, 2, 3]), _fig([3, 2, 1])], table=table),
        Section(heading="trusted", html='<p class="mine">toolkit fragment</p>'),
    ]
    out = write_page(tmp_path / "deep" / "dir" / "r.html", f"title {EVIL}", sections)
    assert out == tmp_path / "deep" / "dir" / "r.html"
    raw = out.read_bytes()
    page = raw.decode("utf-8")  # valid UTF-8
    assert '<meta charset="utf-8">' in page and "‖θ*‖" in page
    bundle = get_plotlyjs()
    assert page.count(bundle) == 1
    rest = page.replace(bundle, "")
    assert EVIL not in rest
    assert rest.count(ESCAPED) >= 5  # <title>, <h1>, <h2>, paragraph, table cell/header
    assert f"<title>title {ESCAPED}</title>" in rest and f"<h2>{ESCAPED}</h2>" in rest
    assert f"<td class=\"text\">{ESCAPED}</td>" in rest and f"<th>{ESCAPED}</th>" in rest
    assert "cdn.plot.ly" not in rest and "https://" not in rest and "http://" not in rest
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, flags=re.I)
    assert '<p class="mine">toolkit fragment</p>' in rest  # trusted html is verbatim
    assert rest.count('class="plotly-graph-div"') == 2
    assert "<p>second paragraph ‖θ*‖</p>" in rest


def test_write_figures_one_section_per_figure(tmp_path):
    out = write_figures(tmp_path / "f.html", {"logit_lens": _fig([1, 2, 3]), "barrier": _fig([0, 1, 0])}, "Trace")
    page = out.read_text(encoding="utf-8").replace(get_plotlyjs(), "")
    assert "<h2>logit_lens</h2>" in page and "<h2>barrier</h2>" in page
    assert page.count('class="plotly-graph-div"') == 2 and page.count("<section>") == 2


def test_unwritable_path_is_user_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    target = afile / "x.html"
    with pytest.raises(UserError) as info:
        write_page(target, "t", [Section(heading="h")])
    msg = str(info.value)
    assert str(target) in msg and "--out" in msg and "\n" not in msg


def test_tables_are_for_reading(tmp_path):
    import json

    table = pd.DataFrame({"margin (logit Yes − No)": [0.8208501935005188, -1.7339e-7], "fired": [True, False],
                          "evidence": [json.dumps({"m_base": 0.8208501935005188, "label": "no"}), "{}"],
                          "n": [3, 4]}, index=[7, 8])
    page = write_page(tmp_path / "t.html", "t", [Section("tab", table=table)]).read_text(encoding="utf-8")
    body = page.split("</head>", 1)[1]
    assert "<th>margin (logit Yes − No)</th>" in body and "<th></th>" not in body  # no index column
    assert "<td>0.821</td>" in body and "<td>-1.73e-07</td>" in body and "0.82085" not in body
    assert '<td class="text">yes</td>' in body and '<td class="text">no</td>' in body
    assert "m_base = 0.821; label = no" in body and "{&quot;" not in body  # evidence as key = value, not JSON
    assert ">7<" not in body  # the pandas index is gone
    long = pd.DataFrame({"x": range(40)})
    folded = write_page(tmp_path / "l.html", "t", [Section("long", table=long)]).read_text(encoding="utf-8")
    assert "<details><summary>show the table (40 rows)</summary>" in folded


def test_no_figure_shows_its_reason_and_sections_fold(tmp_path):
    from mclcbf_diag.report.html import NoFigure

    nf = NoFigure("Propagation", f"no propagation: {EVIL}")
    page = write_page(tmp_path / "n.html", "t", [
        Section("plots", figures=[nf, _fig([1, 2])], lines=["first sentence.", EVIL]),
        Section("later", figures=[_fig([3, 4])], collapsed=True)]).read_text(encoding="utf-8")
    rest = page.replace(get_plotlyjs(), "")
    assert f'<div class="nofigure"><b>Propagation</b>: no propagation: {ESCAPED}</div>' in rest
    assert rest.count('class="plotly-graph-div"') == 2  # the placeholder is no figure
    assert f"<li>first sentence.</li><li>{ESCAPED}</li>" in rest and EVIL not in rest
    assert rest.index("<details>") < rest.index('id="fig-1-0"') < rest.index("</details>")
    assert "Plotly.Plots.resize" in rest  # a folded figure is redrawn when opened


def test_pages_can_share_one_plotlyjs_file(tmp_path):
    from mclcbf_diag.report.html import PLOTLY_JS, write_plotlyjs

    shared = write_plotlyjs(tmp_path)
    assert shared == tmp_path / PLOTLY_JS and shared.read_text(encoding="utf-8") == get_plotlyjs()
    before = shared.stat().st_mtime_ns
    assert write_plotlyjs(tmp_path).stat().st_mtime_ns == before  # an up-to-date copy is left alone
    fig = go.Figure(go.Scatter(x=[0, 1], y=[1, 0]))
    page = write_page(tmp_path / "a.html", "t", [Section("s", figures=[fig])], plotlyjs=PLOTLY_JS).read_text()
    assert f'<script type="text/javascript" src="{PLOTLY_JS}"></script>' in page and get_plotlyjs()[:500] not in page
    inline = write_page(tmp_path / "b.html", "t", [Section("s", figures=[fig])]).read_text()
    assert get_plotlyjs()[:500] in inline  # the default stays self-contained
