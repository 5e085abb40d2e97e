"""The table of which policy acts in which mode (``newt.modes.MODES``) is true and is the one the docs show.

Each mode declares the options of ``newt.Policies`` it runs. For every mode, a faulty golden run
(:mod:`tests.golden_runs`: spikes, NaN gradients and losses, exceptions) is repeated with each
option set to a value that would act: an option the mode does not declare must leave every step
bit for bit as it was, and the options that do change a run must all be declared.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from newt.modes import MODES, policy_table
from tests.golden_runs import Config, run

ACTING = {
    "spike_threshold": 1e-6,
    "reject_spikes": False,
    "start_armijo": 0.0,
    "blow_up_threshold": 1e-6,
    "rise_threshold": 1e-6,
    "hold_on_ascent": False,
    "noise_correction": 0.0,
    "reject_nonfinite": False,
}
"""Per option, a value far from the default, at which it acts (or stops acting) wherever it runs."""

RUNS = {  # the golden run of each mode, and whether closure-free mode is given the loss
    "lookahead": ("lookahead", None),
    "lazy": ("lazy", None),
    "closure-free, without the loss": ("free", False),
    "closure-free, given the loss": ("free-loss", True),
}


def _declared(mode: str, given_loss: bool | None) -> set[str]:
    declared = MODES[mode].policies
    return {name for name, when in declared.items() if given_loss is not False or not when.startswith("given the loss")}


def _mode(golden_mode: str) -> str:
    return {"lookahead": "lookahead", "lazy": "lazy"}.get(golden_mode, "closure-free")


def test_the_docs_show_the_table_read_off_the_modes():
    assert policy_table() in (Path(__file__).parent.parent / "docs" / "modes.md").read_text()


@pytest.mark.parametrize("name", list(RUNS))
def test_an_option_a_mode_does_not_declare_changes_nothing_in_it(name):
    golden_mode, given_loss = RUNS[name]
    declared = _declared(_mode(golden_mode), given_loss)
    baseline = run(Config(golden_mode, "auto", True))
    changed = set()
    for option, value in ACTING.items():
        trace = run(Config(golden_mode, "auto", True, ((option, value),)))
        if (trace["steps"], trace["params"]) != (baseline["steps"], baseline["params"]):
            changed.add(option)
    assert changed <= declared, f"{name}: {sorted(changed - declared)} act but are not declared"
    assert changed, f"{name}: no option changed the run, so the test proves nothing"
