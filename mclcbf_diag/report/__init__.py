"""The report: self-contained HTML pages, their sections and the figures on them.

* :mod:`.html`: a page from :class:`~.html.Section` objects (escaped, offline, one plotly.js).
* :mod:`.plots`: the figures (plotly), pure functions of records.
* :mod:`.pages`: the sections of the trace and explain pages.

``mclcbf_diag.report`` was the HTML module; its names stay importable from here for one
release (:mod:`.html` is their home).
"""

from .html import (  # noqa: F401  (the old module's names, for one release)
    FOLD_ROWS,
    PLOTLY_JS,
    NoFigure,
    Section,
    display_table,
    display_value,
    figure_html,
    key_values,
    no_figure_html,
    render_page,
    write_figures,
    write_page,
    write_plotlyjs,
)
