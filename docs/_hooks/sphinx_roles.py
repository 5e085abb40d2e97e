"""A griffe extension for the API reference: Sphinx roles in docstrings shown as code.

The docstrings use Sphinx's cross-reference roles (``:class:`newt.Policies```), which ``help()``
shows as they are and mkdocstrings would show with the role's name in front. This turns each
role into the inline code of its target for the site.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Rewrite ``:role:`target``` as ```target``` in every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
