"""The modes: how a step is fed, and which policies act in each.

:data:`MODES` is the table of "which option acts in which mode": each mode class declares the
options of :class:`newt.Policies` it runs and when (``Mode.policies``). ``docs/modes.md`` shows
:func:`policy_table`, and a test checks that the two agree and that an option a mode does not
declare changes nothing in that mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields

from newt.modes.base import Mode, Settings
from newt.modes.closure_free import ClosureFree
from newt.modes.lazy import Lazy
from newt.modes.lookahead import Lookahead
from newt.options import Policies

__all__ = ["MODES", "ClosureFree", "Lazy", "Lookahead", "Mode", "Settings", "policy_table"]

MODES: Mapping[str, type[Mode]] = {mode.name: mode for mode in (Lookahead, Lazy, ClosureFree)}
"""The modes by name: ``opt.step(closure)`` is lookahead (``update_every=1``) or lazy
(``update_every > 1``); ``opt.step()`` after your own ``backward()`` is closure-free."""


def policy_table() -> str:
    """The Markdown table of which policy option acts in which mode, read off :data:`MODES`."""
    names = [f.name for f in fields(Policies)]
    lines = ["| option | " + " | ".join(MODES) + " |", "|---|" + "---|" * len(MODES)]
    for name in names:
        cells = [mode.policies.get(name, "—") for mode in MODES.values()]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)
