"""Griffe extension: render the Sphinx roles used in interp's docstrings as inline code.

interp's docstrings cite objects Sphinx-style (``:class:`~interp.directions.Direction```,
``:func:`capture```); mkdocstrings would print the role markup literally. This turns a role
into inline code of the name (the last dotted part when the target starts with ``~``),
and an reST literal-block marker ``text::`` into ``text:``.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|ref):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(?<=\S)::[ \t]*$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    if "<" in target and target.endswith(">"):  # :ref:`text <target>`
        target = target[: target.index("<")].strip()
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


def clean(text: str) -> str:
    return _LITERAL.sub(":", _ROLE.sub(_role, text))


class SphinxRoles(Extension):
    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        doc = getattr(obj, "docstring", None)
        if doc is not None and doc.value:
            doc.value = clean(doc.value)
