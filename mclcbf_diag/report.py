"""Self-contained HTML reports: one file that opens offline, with plotly.js embedded once.

:func:`write_page` lays out a title and a list of :class:`Section` objects (heading, text,
figures, a table, and optionally a trusted HTML fragment). Every piece of user-provided text
(title, headings, paragraphs, table cells) is HTML-escaped; only ``Section.html`` is inserted
verbatim, and it is meant for fragments the toolkit itself produced (e.g. :func:`figure_html`),
never for strings that came from a user, a dataset, or a model's output.

Pages are written atomically (:func:`mclcbf_diag.storage.atomic_write`: a temporary file in
the same folder, fsync, rename, fsync of the folder), so a full disk or a kill leaves the
previous page or none, never a truncated one.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

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
"""


@dataclass
class Section:
    """One block of a report page. ``html`` is a TRUSTED fragment inserted verbatim: pass only
    markup the toolkit generated (never user-, data- or model-provided strings)."""

    heading: str
    text: str = ""
    figures: Sequence[go.Figure] = ()
    table: pd.DataFrame | None = None
    html: str | None = None


def figure_html(fig: go.Figure, div_id: str | None = None) -> str:
    """A ``<div>`` fragment drawing ``fig``; it relies on plotly.js being loaded by the page."""
    return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def _section_html(section: Section, index: int) -> str:
    parts = [f"<section>\n<h2>{html.escape(section.heading)}</h2>"]
    for para in (p.strip() for p in section.text.split("\n\n")):
        if para:
            parts.append(f"<p>{html.escape(para)}</p>")
    for j, fig in enumerate(section.figures):
        parts.append(f'<div class="figure">{figure_html(fig, div_id=f"fig-{index}-{j}")}</div>')
    if section.table is not None:
        parts.append(section.table.to_html(escape=True, border=0, na_rep="–"))
    if section.html:
        parts.append(section.html)
    parts.append("</section>")
    return "\n".join(parts)


def render_page(title: str, sections: Sequence[Section]) -> str:
    """The full HTML document as a string (plotly.js inline, once)."""
    body = "\n".join(_section_html(s, i) for i, s in enumerate(sections))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def write_page(path: str | Path, title: str, sections: Sequence[Section]) -> Path:
    """Write one self-contained HTML page to ``path`` (parents created) and return the path."""
    path = Path(path)
    page = render_page(title, sections)
    data = page.encode("utf-8", "surrogateescape")
    fix = "pass a writable --out path with free space; nothing was half-written"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write the report to {show(path)} ({reason(err)}); {fix}") from None
    try:
        atomic_write(path, data, fix=fix)
    except UserError as err:
        raise UserError(f"cannot write the report to {show(path)} ({str(err).split('(', 1)[-1]}") from None
    return path


def write_figures(path: str | Path, figures: Mapping[str, go.Figure], title: str) -> Path:
    """One page with one section per figure, headed by its key."""
    return write_page(path, title, [Section(heading=name, figures=[fig]) for name, fig in figures.items()])
