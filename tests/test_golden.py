"""Bit identity with the golden traces of :mod:`tests.golden_runs`, and resumes from their checkpoints.

The traces froze, step by step, what ``Newt`` measured and decided in every mode, with and
without faults, as exact floats; the checkpoints were saved mid-run by the same code. A change
that moves any bit of any step fails here, with the configuration, the step and both records.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.golden_runs import CHECKPOINT_STEP, CONFIGS, GOLDEN, STEPS, checkpointed, platform, run

_golden = json.loads((GOLDEN / "traces.json").read_text())
_same_platform = _golden["platform"] == platform()
pytestmark = pytest.mark.skipif(
    not _same_platform,
    reason=f"the golden traces are bit-exact for {_golden['platform']}, this is {platform()}",
)


def _assert_same(name: str, trace: dict, first: int = 0) -> None:
    recorded = _golden["traces"][name]
    for step, (expected, got) in enumerate(zip(recorded["steps"][first:], trace["steps"]), start=first):
        assert got == expected, f"{name}, step {step}:\nrecorded {expected}\ngot      {got}"
    assert len(trace["steps"]) == STEPS - first
    assert trace["params"] == recorded["params"], f"{name}: final parameters differ"
    assert trace["state"] == recorded["state"], f"{name}: final state_dict() differs"


def test_the_golden_file_covers_every_configuration():
    assert sorted(_golden["traces"]) == sorted(c.name for c in CONFIGS)
    assert _golden["steps"] == STEPS


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_every_step_is_bit_identical_to_the_golden_trace(config):
    _assert_same(config.name, run(config))


@pytest.mark.parametrize("config", [c for c in CONFIGS if checkpointed(c)], ids=lambda c: c.name)
def test_a_checkpoint_saved_by_the_recording_code_resumes_bit_for_bit(config):
    checkpoint = torch.load(GOLDEN / f"{config.name}.pt", weights_only=True)
    _assert_same(config.name, run(config, resume=checkpoint), first=CHECKPOINT_STEP)
