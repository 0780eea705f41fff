"""The exported HTML pages render in a real browser, offline, without console errors.

Each kind of page is generated with the CLI into a temporary folder, opened in headless
Chromium (driven by selenium + chromedriver) with the network turned off, and checked:

* every figure the file defines (one ``Plotly.newPlot("<div id>", …)`` call each) is drawn:
  its div has plotly's ``_fullData``/``_fullLayout`` and an ``svg.main-svg`` of non-zero size;
* the heatmap traces the file defines are all drawn (``g.hm image``), folded sections
  (``<details>``, e.g. the decode steps) opened first;
* every figure that overlays attention on the image draws both the image (``g.im image``) and
  its heatmaps, for the decision token and for a token chosen with ``--overlay-token``;
* an empty plot is a placeholder with its reason, never a blank figure;
* the browser console shows no errors, and the page fetched nothing (it is self-contained).

The answer over a split (``explain --split … --pages wrong``) is clicked through: a question id behind the count of
wrong answers on ``population.html`` opens that question's page, which shows its verdict, drawn from the folder's
one copy of plotly.js.

Needs Chromium and chromedriver (Debian: ``apt-get install -y chromium chromium-driver``)
and the ``selenium`` package (in the ``test`` extra). Without them the tests are skipped,
saying what is missing. ``CHROME_BIN`` and ``CHROMEDRIVER`` override where they are looked for.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mclcbf_diag.cli import main

INSTALL = "install them with `apt-get install -y chromium chromium-driver` (Debian/Ubuntu)"
RENDER_TIMEOUT_S = 60


def _find(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if Path(os.environ[env]).is_file() else None
    return next((p for p in map(shutil.which, names) if p), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver",
                                    reason="selenium is not installed (pip install -e .[test])")
    from selenium.webdriver.chrome.service import Service

    chrome = _find("CHROME_BIN", "chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
    driver_path = _find("CHROMEDRIVER", "chromedriver")
    if chrome is None:
        pytest.skip(f"Chromium not found (looked for chromium, chromium-browser, google-chrome; set CHROME_BIN); "
                    f"{INSTALL}")
    if driver_path is None:
        pytest.skip(f"chromedriver not found (set CHROMEDRIVER); {INSTALL}")

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", "--window-size=1280,1024",
                 f"--user-data-dir={profile}",
                 # network off: every request goes to a dead proxy, every host name fails to resolve
                 "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=subprocess.DEVNULL)
    try:
        driver = webdriver.Chrome(service=service, options=opts)
    except Exception as exc:  # a broken install should say so, not pass silently
        pytest.fail(f"could not start headless Chromium ({chrome}) with {driver_path}: "
                    f"{str(exc).strip().splitlines()[0]}")
    driver.set_page_load_timeout(RENDER_TIMEOUT_S)
    driver.set_script_timeout(RENDER_TIMEOUT_S)
    yield driver
    driver.quit()


# ----------------------------------------------------------------------------- pages
def _run_cli(argv: list[str]) -> None:
    assert main(argv) == 0, f"mclcbf-diag {' '.join(argv)} failed"


def _trace_page(out: Path) -> Path:
    # with τ = 0 the barrier never fires (h ≥ 0): the empty plots must say why
    _run_cli(["trace", "--sample", "25", "--set", "tau=0", "--overlay-token", "truck", "--out", str(out)])
    return out / "trace.html"


def _trace_decode_page(out: Path) -> Path:
    # prefill plus two generated tokens: one section of figures per step
    _run_cli(["trace", "--sample", "25", "--preset", "fixed", "--max-new-tokens", "2", "--out", str(out)])
    return out / "trace.html"


def _explain_page(out: Path) -> Path:
    _run_cli(["explain", "--sample", "25", "--k-max", "8", "--out", str(out)])
    return next(out.glob("explain-*.html"))


def _pope_page(out: Path) -> Path:
    argv = ["pope", "--split", "adversarial", "--limit", "8", "--out", str(out)]
    assert main(argv) == 0, f"mclcbf-diag {' '.join(argv)} failed"
    return out / "summary.html"


def _pope_text_page(out: Path) -> Path:
    # steps that fire and generated text: a histogram, two answer kinds, changed questions
    _run_cli(["pope", "--split", "adversarial", "--limit", "16", "--preset", "fixed", "--set", "tau=0.6",
              "--set", "tokens=after_image", "--generate", "1", "--out", str(out)])
    return out / "summary.html"


def _flow_page(out: Path) -> Path:
    _run_cli(["flow", "--sample", "25", "--window", "2", "--out", str(out)])
    return next(out.glob("flow-*.html"))


PAGES = {"trace": _trace_page, "trace-decode": _trace_decode_page, "explain": _explain_page, "pope": _pope_page,
         "pope-text": _pope_text_page, "flow": _flow_page}


def _expected(html: str) -> dict[str, list[str]]:
    """Figure div id → trace types, for every ``Plotly.newPlot("id", [traces…], …)`` call."""
    body = html.split("</head>", 1)[-1]  # plotly.js itself sits in <head>
    decoder = json.JSONDecoder()
    figures = {}
    for m in re.finditer(r"Plotly\.newPlot\(\s*[\"']([^\"']+)[\"']\s*,\s*", body):
        traces, _ = decoder.raw_decode(body, m.end())
        figures[m.group(1)] = [t.get("type", "scatter") for t in traces]
        _VISIBLE_HEATMAPS[m.group(1)] = sum(t.get("type") == "heatmap" and t.get("visible", True) is True
                                            for t in traces)
    return figures


_VISIBLE_HEATMAPS: dict[str, int] = {}  # figure id → heatmaps shown at load (a slider may hide the others)


_OPEN_JS = """
document.querySelectorAll('details:not([open])').forEach(d => { d.open = true; });
"""  # the page's own toggle handler redraws the figures inside, as a user's click would

_OVERLAY_JS = """
return arguments[0].map(id => { const p = document.getElementById(id);
  return [p.querySelectorAll('g.im image').length, p.querySelectorAll('g.hm image').length]; });
"""

_STATE_JS = """
const ids = arguments[0];
const plots = ids.map(id => document.getElementById(id));
const drawn = plots.filter(p => p && p._fullData && p._fullLayout && p.querySelector('svg.main-svg')
    && p.querySelector('svg.main-svg').getBoundingClientRect().width > 0);
return {
  ready: document.readyState,
  plotlyLoaded: typeof window.Plotly === 'object',
  plotDivs: document.querySelectorAll('.js-plotly-plot').length,
  drawn: drawn.length,
  missing: ids.filter((id, i) => !plots[i]),
  traces: Object.fromEntries(drawn.map(p => [p.id, p._fullData.map(t => t.type)])),
  heatmapTraces: drawn.flatMap(p => p._fullData).filter(t => t.type === 'heatmap' && t.visible === true).length,
  heatmapImages: document.querySelectorAll('.js-plotly-plot g.hm image').length,
  resources: performance.getEntriesByType('resource').map(r => r.name)
              .filter(n => !n.startsWith('data:') && !n.startsWith('blob:')),
};
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(PAGES))
def test_page_renders_offline(kind, browser, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = PAGES[kind](tmp_path / "out")
    figures = _expected(page.read_text(encoding="utf-8"))
    ids = list(figures)
    heatmaps = sum(_VISIBLE_HEATMAPS[i] for i in figures)  # a slider shows one layer's maps at a time
    assert ids, f"{page.name} defines no figures"
    assert len(set(ids)) == len(ids), f"duplicate figure div ids in {page.name}: {ids}"

    browser.get_log("browser")  # drop anything left from an earlier page
    browser.get(page.resolve().as_uri())
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while browser.execute_script("return document.readyState") != "complete" or not browser.execute_script(
            "return typeof window.Plotly === 'object'"):
        assert time.monotonic() < deadline, f"{kind}: the page did not load plotly.js"
        time.sleep(0.1)
    browser.execute_script(_OPEN_JS)  # folded sections (decode steps, long tables) are part of the page
    while True:
        state = browser.execute_script(_STATE_JS, ids)
        if state["ready"] == "complete" and state["drawn"] == len(ids):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{kind}: after {RENDER_TIMEOUT_S} s only {state['drawn']} of {len(ids)} figures rendered "
                        f"(plotly loaded: {state['plotlyLoaded']}, missing divs: {state['missing']})")
        time.sleep(0.1)

    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, f"{kind}: browser console errors: {[e['message'] for e in errors]}"
    assert state["plotDivs"] == len(ids), f"{kind}: {state['plotDivs']} plot divs for {len(ids)} newPlot calls"
    assert state["traces"] == figures, f"{kind}: the traces drawn differ from the traces in the file"
    assert state["heatmapTraces"] == heatmaps, f"{kind}: {state['heatmapTraces']} heatmaps drawn, file has {heatmaps}"
    assert state["heatmapImages"] == heatmaps, f"{kind}: {state['heatmapImages']} heatmap images for {heatmaps}"
    if kind.startswith("trace") or kind == "explain":
        assert heatmaps >= 1, "the attention heatmaps are missing"
    overlays = [i for i in ids if "image" in figures[i] and "heatmap" in figures[i]]
    if kind.startswith("trace") or kind == "explain":  # first: the image with the decision token's attention
        assert overlays and overlays[0] == ids[0], figures[ids[0]]
        drawn = browser.execute_script(_OVERLAY_JS, overlays)
        for fid, (images, heat) in zip(overlays, drawn):
            panels = figures[fid].count("image")
            assert images == panels, f"{kind}: {fid} drew {images} of its {panels} images"
            assert heat == _VISIBLE_HEATMAPS[fid] >= panels, f"{kind}: {fid} drew {heat} heatmaps"
    if kind == "trace":  # the decision token and the chosen token 'truck'; nothing fired: reasons, no blanks
        assert len(overlays) == 2
        html = page.read_text(encoding="utf-8")
        assert "Attention of the token &#x27;truck&#x27;" in html or "Attention of the token 'truck'" in html
        reasons = browser.execute_script("return [...document.querySelectorAll('.nofigure')].map(e => e.innerText)")
        assert reasons and all("did not fire" in r for r in reasons), reasons
    if kind == "trace-decode":  # the summary across steps, then one folded section per decode step
        heads = browser.execute_script("return [...document.querySelectorAll('h2')].map(h => h.innerText)")
        assert "Across generation steps" in heads
        assert any(h.startswith("Per-layer plots, decode step 1: reads ") for h in heads), heads
    if kind.startswith("pope"):
        assert browser.execute_script("return document.querySelectorAll('.updatemenu-button').length") >= 2
    assert state["resources"] == [], f"{kind}: the page fetched {state['resources']}: it must be self-contained"


# ----------------------------------------------------------------------------- a split's answer, clicked through
SPLIT_LIMIT = 21  # the embedded adversarial split's first wrong answer is its 21st question (question_id 21)


def _wait_for_figures(browser, ids: list[str], what: str) -> dict:
    deadline = time.monotonic() + RENDER_TIMEOUT_S
    while True:
        state = browser.execute_script(_STATE_JS, ids)
        if state["ready"] == "complete" and state["plotlyLoaded"] and state["drawn"] == len(ids):
            return state
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: after {RENDER_TIMEOUT_S} s only {state['drawn']} of {len(ids)} figures rendered "
                        f"(plotly loaded: {state['plotlyLoaded']}, missing divs: {state['missing']})")
        time.sleep(0.1)


@pytest.mark.slow
def test_a_question_id_behind_a_count_opens_that_questions_verdict(browser, tmp_path, monkeypatch):
    """explain --split … --pages wrong: population.html links each wrong answer's id to its page; clicking it in a
    browser opens a page that shows that question's verdict, drawn offline from the folder's one plotly.min.js."""
    import pandas as pd
    from plotly.offline import get_plotlyjs
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "split"
    _run_cli(["explain", "--split", "adversarial", "--limit", str(SPLIT_LIMIT), "--batch-size", str(SPLIT_LIMIT),
              "--k-max", "2", "--bisect-steps", "1", "--no-sweep", "--pages", "wrong", "--out", str(out)])
    questions = pd.read_parquet(out / "questions.parquet")
    wrong = questions[questions.kind == "wrong"]
    wrong = wrong.set_index(wrong.question_id.astype(str))
    assert len(questions) == SPLIT_LIMIT and len(wrong) >= 1
    # a page per wrong answer, each under 1 MB, plotly.js stored once in the folder
    pages = sorted((out / "pages").iterdir())
    assert {p.name for p in pages} == {f"explain-adversarial-{i}.html" for i in wrong.index}
    assert all(p.stat().st_size < 1_000_000 for p in pages), [(p.name, p.stat().st_size) for p in pages]
    signature = get_plotlyjs()[1000:1200]
    holders = [p for p in out.rglob("*") if p.suffix in (".html", ".js") and signature in p.read_text(encoding="utf-8")]
    assert holders == [out / "plotly.min.js"]

    population = out / "population.html"
    browser.get_log("browser")
    browser.get(population.as_uri())
    _wait_for_figures(browser, list(_expected(population.read_text(encoding="utf-8"))), "population.html")
    section = next(s for s in browser.find_elements(By.TAG_NAME, "section")
                   if s.find_element(By.TAG_NAME, "h2").text.startswith("Wrong answers ("))
    count = int(re.search(r"\((\d+)\)", section.find_element(By.TAG_NAME, "h2").text).group(1))
    links = [a for a in section.find_elements(By.CSS_SELECTOR, 'a[href^="pages/"]') if a.is_displayed()]
    assert count == len(wrong) and {a.text for a in links} == {f"adversarial:{i}" for i in wrong.index}

    link = links[0]
    qid = link.text.split(":", 1)[1]
    link.click()
    WebDriverWait(browser, RENDER_TIMEOUT_S).until(
        lambda d: d.current_url.endswith(f"/pages/explain-adversarial-{qid}.html")
        and d.execute_script("return document.readyState") == "complete")
    page = out / "pages" / f"explain-adversarial-{qid}.html"
    state = _wait_for_figures(browser, list(_expected(page.read_text(encoding="utf-8"))), page.name)
    assert state["drawn"] >= 3  # the prefill trace plots, from the run's records
    shown = browser.find_element(By.TAG_NAME, "body").text
    row = wrong.loc[qid]
    assert f"question_id {qid}: {row['text']}" in shown
    assert f"outcome {row['outcome'].upper()}" in shown
    assert f"top decisive cause: {row['top_cause']} ({row['top_cause_title']})" in shown
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, f"browser console errors: {[e['message'] for e in errors]}"
    scripts = browser.execute_script("return [...document.scripts].map(s => s.src).filter(Boolean)")
    assert scripts == [(out / "plotly.min.js").as_uri()]  # plotly.js from the folder's one copy
    assert state["resources"] == [], f"the page fetched {state['resources']}"  # and nothing from the web
