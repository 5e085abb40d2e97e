"""newt: learning-rate adaptation for any PyTorch optimizer.

``Newt(inner, strategy=...)`` wraps an inner ``torch.optim.Optimizer`` and adapts its learning
rate with a Newton-like rule from :mod:`newt.rules`, measured along the inner optimizer's own
steps.
"""

from newt._numerics import Decision, Proposal
from newt.optimizer import GroupStepInfo, Newt, StepInfo
from newt.rules import DEFAULT_OPTIONS, STRATEGIES, RuleOptions, gen, gen_slopes, retsinas, taylor
from newt.schedulers import FactorLR

__all__ = [
    "DEFAULT_OPTIONS",
    "STRATEGIES",
    "Decision",
    "FactorLR",
    "GroupStepInfo",
    "Newt",
    "Proposal",
    "RuleOptions",
    "StepInfo",
    "gen",
    "gen_slopes",
    "retsinas",
    "taylor",
]

__version__ = "0.1.0"
