"""Self-contained HTML reports: one file that opens offline, with plotly.js embedded once.

:func:`write_page` lays out a title and a list of :class:`Section` objects (heading, text,
figures, a table, and optionally a trusted HTML fragment). Every piece of user-provided text
(title, headings, paragraphs, table cells) is HTML-escaped; only ``Section.html`` is inserted
verbatim, and it is meant for fragments the toolkit itself produced (e.g. :func:`figure_html`),
never for strings that came from a user, a dataset, or a model's output.

Tables are shown for reading, not for parsing: :func:`display_table` drops the pandas index,
rounds floats to 3 significant digits (the parquet/CSV files keep full precision), writes
booleans as yes/no and JSON objects (e.g. a cause's evidence) as "key = value" text; a long
table folds away under a ``<details>`` summary. A figure that would be empty is a
:class:`NoFigure` in a section's figures: the page shows its reason instead of a blank plot.

Pages are written atomically (:func:`mclcbf_diag.storage.atomic_write`: a temporary file in
the same folder, fsync, rename, fsync of the folder), so a full disk or a kill leaves the
previous page or none, never a truncated one.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from mclcbf_diag.errors import UserError
from mclcbf_diag.storage import atomic_write, reason, show

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; padding: 0 1rem; color: #222; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .3rem; }
section { margin-bottom: 2.5rem; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: right; }
th { background: #f3f3f3; }
.figure { min-height: 450px; }
.nofigure { border: 1px dashed #bbb; background: #fafafa; padding: .8rem 1rem; margin: 1rem 0; color: #444; }
.nofigure b { color: #222; }
ul.lines { padding-left: 1.2rem; } ul.lines li { margin: .25rem 0; }
details > summary { cursor: pointer; color: #225; margin: .5rem 0; }
td.text { text-align: left; max-width: 28rem; }
th { text-align: left; }
"""

# a figure inside a folded <details> is drawn at a guessed size: redraw it when it opens
_RESIZE_JS = ("document.querySelectorAll('details').forEach(d => d.addEventListener('toggle', () => { if (d.open) "
              "d.querySelectorAll('.js-plotly-plot').forEach(p => window.Plotly && Plotly.Plots.resize(p)); }));")
FOLD_ROWS = 25  # a table longer than this folds away under <details>


@dataclass(frozen=True)
class NoFigure:
    """A figure that has nothing to draw: the page shows ``title`` and ``reason`` in its place."""

    title: str
    reason: str

    def _repr_html_(self) -> str:  # notebooks show the reason where a figure would be
        return no_figure_html(self)

    def show(self) -> None:
        """Like ``Figure.show()``: in a notebook the reason is displayed, elsewhere printed."""
        try:
            from IPython import get_ipython
            from IPython.display import HTML, display
        except ImportError:
            get_ipython = None
        if get_ipython is not None and get_ipython() is not None:
            display(HTML(self._repr_html_()))
        else:
            print(f"{self.title}: {self.reason}")


@dataclass
class Section:
    """One block of a report page. ``html`` is a TRUSTED fragment inserted verbatim: pass only
    markup the toolkit generated (never user-, data- or model-provided strings).

    ``lines`` are shown as a list (one sentence each), ``text`` as paragraphs (blank-line
    separated); ``figures`` may hold :class:`NoFigure` placeholders; ``table`` is shown with
    :func:`display_table` (``table_note`` under it); ``collapsed`` folds the whole section.
    """

    heading: str
    text: str = ""
    figures: Sequence[go.Figure | NoFigure] = ()
    table: pd.DataFrame | None = None
    html: str | None = None
    lines: Sequence[str] = ()
    collapsed: bool = False
    table_note: str = ""


def fmt_value(x, signed: bool = False) -> str:
    """A number in a sentence: 3 significant digits (signed with ``signed``), "n/a" when not finite."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return "n/a"
    return f"{x:+.3g}" if signed else f"{x:.3g}"


def layer_list(layers) -> str:
    """Layers in a sentence: "1, 2, 3", or "none"."""
    layers = list(layers)
    return ", ".join(map(str, layers)) if layers else "none"


def display_value(v) -> str:
    """One cell as text: floats to 3 significant digits, booleans yes/no, JSON objects as "key = value"."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return _num(float(v))
    if isinstance(v, Mapping):
        return key_values(v)
    if isinstance(v, str) and v.startswith("{") and v.endswith("}"):
        try:
            obj = json.loads(v)
        except ValueError:
            return v
        return key_values(obj) if isinstance(obj, dict) else v
    if isinstance(v, (list, tuple)):
        return ", ".join(display_value(x) for x in v) if v else "none"
    return str(v)


def key_values(d: Mapping) -> str:
    """``{"a": 0.123456, "b": "x"}`` → ``a = 0.123; b = x`` (the keys sorted as given)."""
    return "; ".join(f"{k} = {display_value(x)}" for k, x in d.items()) if d else "–"


def _num(x: float) -> str:
    if not math.isfinite(x):
        return "n/a" if math.isnan(x) else ("∞" if x > 0 else "−∞")
    if x == 0:
        return "0"
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.3g}"


def display_table(table: pd.DataFrame) -> str:
    """An HTML table for reading: no index, every cell through :func:`display_value`, escaped.

    Text-heavy columns (sentences, evidence) are left-aligned; numbers stay right-aligned.
    """
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    rows = []
    for values in table.itertuples(index=False, name=None):
        cells = []
        for v in values:
            text = display_value(v)
            cls = ' class="text"' if not _looks_numeric(text) and text != "–" else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    out = f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody>\n</table>"
    if len(table) > FOLD_ROWS:
        out = f"<details><summary>show the table ({len(table)} rows)</summary>\n{out}\n</details>"
    return out


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def figure_html(fig: go.Figure, div_id: str | None = None) -> str:
    """A ``<div>`` fragment drawing ``fig``; it relies on plotly.js being loaded by the page."""
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def no_figure_html(nf: NoFigure) -> str:
    """The placeholder of an empty figure: its title and why it has nothing to draw (escaped)."""
    return f'<div class="nofigure"><b>{html.escape(nf.title)}</b>: {html.escape(nf.reason)}</div>'


def _section_html(section: Section, index: int) -> str:
    heading = html.escape(section.heading)
    parts = [f"<section>\n<details>\n<summary><h2 style=\"display:inline\">{heading}</h2></summary>"
             if section.collapsed else f"<section>\n<h2>{heading}</h2>"]
    for para in (p.strip() for p in section.text.split("\n\n")):
        if para:
            parts.append(f"<p>{html.escape(para)}</p>")
    if section.lines:
        parts.append('<ul class="lines">' + "".join(f"<li>{html.escape(x)}</li>" for x in section.lines) + "</ul>")
    for j, fig in enumerate(section.figures):
        if isinstance(fig, NoFigure):
            parts.append(no_figure_html(fig))
        else:
            parts.append(f'<div class="figure">{figure_html(fig, div_id=f"fig-{index}-{j}")}</div>')
    if section.table is not None:
        parts.append(display_table(section.table))
        if section.table_note:
            parts.append(f"<p><small>{html.escape(section.table_note)}</small></p>")
    if section.html:
        parts.append(section.html)
    parts.append("</details>\n</section>" if section.collapsed else "</section>")
    return "\n".join(parts)


PLOTLY_JS = "plotly.min.js"  # the shared copy a folder of pages loads (write_plotlyjs)


def write_plotlyjs(folder: str | Path) -> Path:
    """plotly.js once in ``folder`` (:data:`PLOTLY_JS`), for pages written with ``plotlyjs=PLOTLY_JS``; an
    up-to-date copy is left as it is."""
    path = Path(folder) / PLOTLY_JS
    data = get_plotlyjs().encode("utf-8")
    if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
        atomic_write(path, data, fix="pass a writable --out path with free space; nothing was half-written")
    return path


def render_page(title: str, sections: Sequence[Section], plotlyjs: str | None = None) -> str:
    """The full HTML document as a string.

    Args:
        title: the page's title and first heading (escaped).
        sections: the page's sections, in order.
        plotlyjs: a relative path such as :data:`PLOTLY_JS`: plotly.js is loaded from that shared file beside the
            page; None: plotly.js inline, once.

    Returns:
        The HTML document.
    """
    body = "\n".join(_section_html(s, i) for i, s in enumerate(sections))
    script = (f"<script type=\"text/javascript\">{get_plotlyjs()}</script>" if plotlyjs is None
              else f"<script type=\"text/javascript\" src=\"{html.escape(plotlyjs)}\"></script>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n"
        f"{script}\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n<script>{_RESIZE_JS}</script>\n</body>\n</html>\n"
    )


def write_page(path: str | Path, title: str, sections: Sequence[Section], plotlyjs: str | None = None) -> Path:
    """Write one HTML page to ``path`` (parents created), atomically: self-contained, or loading plotly.js from
    the shared copy beside it (see :func:`write_plotlyjs`).

    Args:
        path: the page's file.
        title: the page's title and heading.
        sections: the page's sections, in order.
        plotlyjs: the shared plotly.js's path relative to the page (such as :data:`PLOTLY_JS`); None: inline.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        UserError: the folder cannot be made or the page cannot be written.
    """
    path = Path(path)
    page = render_page(title, sections, plotlyjs)
    data = page.encode("utf-8", "surrogateescape")
    fix = "pass a writable --out path with free space; nothing was half-written"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write the report to {show(path)} ({reason(err)}); {fix}") from None
    try:
        atomic_write(path, data, fix=fix)
    except UserError as err:  # storage's words, "cannot write PATH (why); fix", said of the report
        said, prefix = str(err), f"cannot write {show(path)} "
        rest = said[len(prefix):] if said.startswith(prefix) else f"({said})"
        raise UserError(f"cannot write the report to {show(path)} {rest}") from None
    return path


def write_figures(path: str | Path, figures: Mapping[str, go.Figure], title: str) -> Path:
    """One page with one section per figure, headed by its key."""
    return write_page(path, title, [Section(heading=name, figures=[fig]) for name, fig in figures.items()])
