"""newt: learning-rate adaptation for any PyTorch optimizer.

``Newt(inner, strategy=...)`` wraps an inner ``torch.optim.Optimizer`` and adapts its learning
rate with a Newton-like rule from :mod:`newt.rules`, measured along the inner optimizer's own
steps.
"""

from newt._checkpoint import CheckpointError
from newt._numerics import Decision, Proposal
from newt.optimizer import GroupStepInfo, Newt, ScheduleWarning, StepInfo
from newt.options import DEFAULT_OPTIONS, DEFAULT_POLICIES, Policies, RuleOptions
from newt.rules import RULES, STRATEGIES, gen, gen_exact, gen_slopes, gen_three_point, retsinas, taylor
from newt.schedulers import FactorLR

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_POLICIES",
    "RULES",
    "STRATEGIES",
    "CheckpointError",
    "Decision",
    "FactorLR",
    "GroupStepInfo",
    "Newt",
    "Policies",
    "Proposal",
    "RuleOptions",
    "ScheduleWarning",
    "StepInfo",
    "gen",
    "gen_exact",
    "gen_slopes",
    "gen_three_point",
    "retsinas",
    "taylor",
]

__version__ = "0.2.0.dev0"  # the one place the version is written (pyproject.toml reads it)
