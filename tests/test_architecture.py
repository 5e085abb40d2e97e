"""The code stays within the size and complexity targets of docs/architecture.md (tools/code_metrics.py)."""

from __future__ import annotations

import pytest

from tools.code_metrics import TARGETS, measure

_worst = measure()


@pytest.mark.parametrize("metric", sorted(TARGETS))
def test_the_library_stays_within_its_size_and_complexity_target(metric):
    value, where = _worst[metric]
    assert value <= TARGETS[metric], f"{metric}: {value} at {where}, target {TARGETS[metric]}"


def test_every_module_has_maintainability_grade_a():
    grade, below = _worst["maintainability"]
    assert grade == "A", f"below grade A: {below}"
