"""Golden traces: `Newt`'s behaviour frozen, step by step, in every mode, as exact floats.

Each configuration trains a small digits MLP for :data:`STEPS` mini-batch steps, through the
public API only, and records per step what ``step_info`` says (every float as ``float.hex``),
the rates in the param groups, a hash of the parameters, and any exception the step raised;
at the end, hashes of the parameters and of ``state_dict()``. ``tests/test_golden.py`` re-runs
every configuration and requires bit identity with the recorded file, and resumes each mode
from a checkpoint written by the recording code.

Record the traces (only when behaviour is meant to change, and say why in the commit)::

    python -m tests.golden_runs --write

The traces are bit-exact for one platform: the file records the torch version and the CPU
capability it was made with, and the test skips, saying so, where either differs.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from newt import Newt
from tests.faults import FAULT_KINDS, Fault, InjectedFault, fault_schedule, faulty_closure
from tests.models import digits, make_mlp, minibatch_indices

__all__ = ["CHECKPOINT_STEP", "CONFIGS", "GOLDEN", "STEPS", "Config", "platform", "run"]

GOLDEN = Path(__file__).parent / "golden"
STEPS = 30
CHECKPOINT_STEP = 15
BATCH_SIZE = 64
HIDDEN = 12
FAULT_RATE = 0.2
"""Six faults in 30 steps, each kind at least once."""
RULE_FAULT_STEPS = (0, 17)
"""Where a faulty configuration's custom rule raises: the very first step (the start-up test has
not passed yet) and one later step."""


class RuleFault(Exception):
    """Raised by the custom rule on the scheduled steps of a faulty configuration."""


class InnerStepFault(Exception):
    """Raised by the inner optimizer's step on the scheduled steps of a closure-free run."""


@dataclass(frozen=True)
class Config:
    """One golden run.

    Attributes:
        mode: ``lookahead``, ``lazy``, ``free``, ``free-loss``, ``free-block``,
            ``free-loss-block``, ``per-group``, ``per-group-free``, or ``mixed`` (closure steps
            and closure-free ones given the loss, five at a time, on the same optimizer).
        strategy: A strategy name, or ``"custom"`` for :func:`halfway`.
        faults: Whether the seeded fault schedule of :mod:`tests.faults` is injected (with
            ``reject_nonfinite=True`` unless ``options`` says otherwise, so that the run goes on
            after a NaN fault instead of holding NaN parameters from there on).
        options: More ``Newt`` options.
        scaler: Whether the loop uses a ``torch.amp.GradScaler`` (on the CPU, fp32: it skips
            the steps whose gradients overflow, here the NaN faults).
        lr: The initial rate, instead of the inner optimizer's usual one.
    """

    mode: str
    strategy: str
    faults: bool
    options: tuple[tuple[str, Any], ...] = ()
    scaler: bool = False
    lr: float | None = None

    @property
    def name(self) -> str:
        extra = "".join(f"-{k}={v}" for k, v in self.options) + ("-scaler" if self.scaler else "")
        extra += "" if self.lr is None else f"-lr={self.lr:g}"
        return f"{self.mode}-{self.strategy}-{'faults' if self.faults else 'clean'}{extra}"

    def closure(self, step: int) -> bool:
        """Whether ``step`` is a closure step (``mixed`` switches modes every five steps)."""
        if self.mode == "mixed":
            return step // 5 % 2 == 0
        return self.mode in ("lookahead", "lazy", "per-group")

    @property
    def give_loss(self) -> bool:
        return self.mode in ("free-loss", "free-loss-block", "mixed")


MODE_OPTIONS: dict[str, dict[str, Any]] = {
    "lookahead": {},
    "lazy": {"update_every": 3},
    "free": {},
    "free-loss": {},
    "free-block": {"update_every": 3},
    "free-loss-block": {"update_every": 3},
    "per-group": {"per_group": True},
    "per-group-free": {"per_group": True},
    "mixed": {},
}
CLOSURE_STRATEGIES = ("auto", "taylor", "custom")
FREE_STRATEGIES = ("auto", "gen", "retsinas")


def _configs() -> list[Config]:
    configs = []
    for mode in MODE_OPTIONS:
        if mode == "mixed":
            continue
        strategies = CLOSURE_STRATEGIES if mode in ("lookahead", "lazy") else FREE_STRATEGIES
        for strategy in strategies:
            for faults in (False, True):
                configs.append(Config(mode, strategy, faults))
    configs += [
        Config("lookahead", "auto", True, (("reject_nonfinite", False),)),
        Config("free-loss", "auto", True, (("reject_nonfinite", False),)),
        Config("lookahead", "auto", True, scaler=True),
        Config("free-loss", "auto", True, scaler=True),
        Config("lookahead", "auto", False, lr=1e-6),
        Config("lazy", "auto", False, lr=1e-6),
        Config("free-loss", "auto", False, lr=1e-6),
        Config("mixed", "auto", False),
        Config("mixed", "gen", True),
    ]
    # gen with the lookahead's gradient measured: the same traces as the configurations without
    # the option recorded before gen's lookahead went forward only (see the CHANGELOG)
    gradient = (("forward_only", False),)
    configs += [
        *(Config(mode, "auto", faults, gradient) for mode in ("lookahead", "lazy") for faults in (False, True)),
        Config("lookahead", "auto", True, (("reject_nonfinite", False), *gradient)),
        Config("lookahead", "auto", True, gradient, scaler=True),
        Config("lookahead", "auto", False, gradient, lr=1e-6),
        Config("lazy", "auto", False, gradient, lr=1e-6),
        Config("mixed", "auto", False, gradient),
        Config("mixed", "gen", True, gradient),
    ]
    return configs


CONFIGS: list[Config] = _configs()

_rule_should_raise = False


def halfway(alpha: float, f0: float, f1: float, d0: float, d1: float, options: Any) -> Any:
    """A custom rule: half a Newton step with the slopes' curvature, "nonconvex" when there is none."""
    if _rule_should_raise:
        raise RuleFault("injected fault in the custom rule")
    curvature = d0 - d1
    if not curvature > 1e-12 * (abs(d0) + abs(d1)):
        return alpha, "nonconvex"
    return alpha * (1.0 + 0.5 * d1 / curvature)


def _inner(strategy: str, groups: list[dict[str, Any]], lr: float | None) -> torch.optim.Optimizer:
    if strategy == "auto":
        return torch.optim.Adam(groups, lr=0.3 if lr is None else lr)
    if strategy in ("taylor", "gen"):
        return torch.optim.SGD(groups, lr=0.05 if lr is None else lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=1e-3 if lr is None else lr, weight_decay=0.01)


def _groups(model: nn.Module, config: Config) -> list[dict[str, Any]]:
    """Two param groups (weights, biases at half the rate) for ``auto`` and the per-group modes."""
    if config.strategy == "auto" or config.mode.startswith("per-group"):
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
        lr = _inner(config.strategy, [{"params": [torch.zeros(1)]}], config.lr).defaults["lr"]
        return [{"params": weights}, {"params": biases, "lr": lr * 0.5}]
    return [{"params": list(model.parameters())}]


def _scheduler(config: Config, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A chainable schedule for ``taylor``, ``gen`` and the custom rule (the multiplier paths)."""
    if config.strategy in ("taylor", "gen"):
        return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.97)
    if config.strategy == "custom":
        return torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=10)
    return None


@dataclass
class Run:
    """The objects of one golden run, built fresh for a run or for a resume."""

    config: Config
    model: nn.Module
    opt: Newt
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    schedule: dict[int, Fault] = field(default_factory=dict)
    fault_rng: random.Random = field(default_factory=lambda: random.Random(5))


def build(config: Config) -> Run:
    model = make_mlp(seed=3, hidden=HIDDEN)
    inner = _inner(config.strategy, _groups(model, config), config.lr)
    options = dict(MODE_OPTIONS[config.mode]) | {"reject_nonfinite": config.faults} | dict(config.options)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if config.scaler else None
    if scaler is not None:
        options["grad_scaler"] = scaler
    strategy: str | Callable[..., Any] = halfway if config.strategy == "custom" else config.strategy
    opt = Newt(inner, strategy, **options)
    schedule = fault_schedule(STEPS, FAULT_RATE, FAULT_KINDS, seed=11) if config.faults else {}
    return Run(config, model, opt, _scheduler(config, opt), scaler, schedule)


def _exact(value: Any) -> str:
    """A float's shortest exact text (``repr`` round-trips every float, NaN and infinities too)."""
    return repr(float(value.detach() if isinstance(value, torch.Tensor) else value))


def tensors_hash(tensors: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str(t.dtype).encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def _canonical(value: Any, digest: Any) -> None:
    if isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            _canonical(value[key], digest)
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _canonical(item, digest)
        digest.update(b"]")
    elif isinstance(value, torch.Tensor):
        digest.update(tensors_hash([value]).encode())
    elif isinstance(value, float):
        digest.update(value.hex().encode())
    else:
        digest.update(repr(value).encode())


def state_hash(state: dict[str, Any]) -> str:
    digest = hashlib.sha256()
    _canonical(state, digest)
    return digest.hexdigest()[:12]


def _info(opt: Newt) -> list[str]:
    info = opt.step_info
    record = [str(info.decision), "rejected" if info.rejected else "kept"]
    record += [f"{k}={_exact(getattr(info, k))}" for k in ("f0", "f1", "d0", "d1", "alpha", "alpha_next", "noise")]
    for g in info.groups or ():
        values = ",".join(_exact(getattr(g, k)) for k in ("alpha", "alpha_next", "d0", "d1", "noise"))
        record.append(f"group{g.index}={g.decision},{values}")
    return record


def _one_step(run: Run, step: int, x: torch.Tensor, y: torch.Tensor) -> str:
    """One training step of ``run``, recorded as one line (an exception is recorded, not raised)."""
    global _rule_should_raise
    config, opt = run.config, run.opt
    fault = run.schedule.get(step)
    _rule_should_raise = config.faults and config.strategy == "custom" and step in RULE_FAULT_STEPS
    scale = None if run.scaler is None else run.scaler.scale
    closure = faulty_closure(run.model, opt, x, y, fault, run.fault_rng, scale=scale)
    record = [f"fault={fault}"]
    try:
        if config.closure(step):
            returned = opt.step(closure)
        else:
            returned = _closure_free_step(run, closure, fault)
        info = _info(opt)
        if returned is not None and _exact(returned) != info[2].removeprefix("f0="):
            record.append(f"loss={_exact(returned)}")  # the closure's loss is f0, unless a fault stopped it
        record += info
    except (InjectedFault, RuleFault, InnerStepFault) as error:
        record.append(f"raised={type(error).__name__}")
    finally:
        _rule_should_raise = False
    if run.scaler is not None:
        try:
            run.scaler.update()
        except AssertionError:  # the step raised before Newt unscaled the gradients
            pass
    if run.scheduler is not None:
        run.scheduler.step()
    record.append("lrs=" + ",".join(_exact(g["lr"]) for g in opt.param_groups))
    record.append(f"params={tensors_hash(list(run.model.parameters()))}")
    return " ".join(record)


def _closure_free_step(run: Run, closure: Any, fault: Fault | None) -> None:
    """``backward(); opt.step()`` (or ``opt.step(loss=loss)``); a ``raise`` fault at call 2 raises
    inside the inner optimizer's step instead of the loop's forward pass."""
    inner_raises = fault is not None and fault.kind == "raise" and fault.call == 2
    if fault is not None and fault.call == 2 and not inner_raises:
        closure.fault = Fault(fault.kind, 1)  # closure-free mode has one pass: the fault hits it
    elif inner_raises:
        closure.fault = None
    loss = closure()
    opt = run.opt
    if inner_raises:

        def raising(*args: Any, **kwargs: Any) -> None:
            raise InnerStepFault("injected fault in the inner step")

        opt.inner.step = raising
    try:
        if run.config.give_loss:
            return opt.step(loss=loss)
        return opt.step()
    finally:
        if inner_raises:
            del opt.inner.step


def _batches() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    x, y = digits()
    return x, y, minibatch_indices(len(x), BATCH_SIZE, STEPS, seed=1)


def run(config: Config, *, resume: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``config`` for ``STEPS`` steps and return its trace.

    With ``resume`` (a checkpoint written at ``CHECKPOINT_STEP``), a fresh run loads it and
    takes the remaining steps only. The trace's ``checkpoint`` is the state at that step.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, resume)
    finally:
        torch.set_num_threads(threads)


def _run(config: Config, resume: dict[str, Any] | None) -> dict[str, Any]:
    x, y, batches = _batches()
    current = build(config)
    first = 0
    if resume is not None:
        current.model.load_state_dict(resume["model"])
        current.opt.load_state_dict(resume["opt"])
        if current.scheduler is not None:
            current.scheduler.load_state_dict(resume["scheduler"])
        first = CHECKPOINT_STEP
    steps, checkpoint = [], None
    for step in range(first, STEPS):
        if step == CHECKPOINT_STEP and resume is None:
            # deep copies: state_dict() holds the live state tensors, which the next steps change
            checkpoint = copy.deepcopy(
                {
                    "model": current.model.state_dict(),
                    "opt": current.opt.state_dict(),
                    "scheduler": None if current.scheduler is None else current.scheduler.state_dict(),
                }
            )
        index = batches[step]
        steps.append(_one_step(current, step, x[index], y[index]))
    return {
        "steps": steps,
        "params": tensors_hash(list(current.model.parameters())),
        "state": state_hash(current.opt.state_dict()),
        "checkpoint": checkpoint,
    }


def platform() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def checkpointed(config: Config) -> bool:
    """The clean ``auto`` run of each mode resumes from a checkpoint saved by the recording code."""
    return config.strategy == "auto" and not (config.faults or config.options or config.scaler or config.lr)


def _write() -> None:
    GOLDEN.mkdir(exist_ok=True)
    traces = {}
    for config in CONFIGS:
        trace = run(config)
        checkpoint = trace.pop("checkpoint")
        if checkpointed(config):
            torch.save(checkpoint, GOLDEN / f"{config.name}.pt")
        traces[config.name] = trace
        raised = sum("raised=" in s for s in trace["steps"])
        decisions = sorted({next((w for w in s.split() if "=" not in w), "-") for s in trace["steps"]})
        print(f"{config.name:44s} raised {raised}  decisions {' '.join(decisions)}")
    payload = {"platform": platform(), "steps": STEPS, "traces": traces}
    (GOLDEN / "traces.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="record the traces and checkpoints into tests/golden/")
    args = parser.parse_args()
    if not args.write:
        parser.error("nothing to do: pass --write to record the golden traces")
    _write()


if __name__ == "__main__":
    main()
