"""A griffe extension for the API reference: the package's Sphinx roles as Markdown code spans.

The docstrings name objects the Sphinx way (``:func:`~mclcbf_diag.knobs.knob```); mkdocstrings reads Markdown,
where that would show as ``:func:`` before a code span. This extension rewrites each role as the code span
alone (`` `knob` `` for a ``~`` target, the full path otherwise) when griffe loads the docstrings, so the
pages read as the docstrings mean. mkdocs.yml loads it (``extensions:`` of the python handler).
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|exc|obj|const|ref):`([^`]+)`")


def roles_to_code(text: str) -> str:
    """``:role:`~a.b.C``` → `` `C` ``; ``:role:`a.b.C``` → `` `a.b.C` ``; ``:role:`text <a.b>``` → `` `a.b` ``."""
    def one(m):
        target = re.sub(r"^.*<(.+)>$", r"\1", m.group(1))
        return f"`{target.rsplit('.', 1)[-1] if target.startswith('~') else target}`"

    return ROLE.sub(one, text)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = roles_to_code(obj.docstring.value)
