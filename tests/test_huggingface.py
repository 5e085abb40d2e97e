"""Newt under a real Hugging Face ``transformers.Trainer``: closure-free mode and the scheduler.

The Trainer runs its own ``backward()`` and then calls ``optimizer.step()`` without a closure
(through Accelerate's ``AcceleratedOptimizer``), so Newt works in its closure-free mode: step t
measures ``d0 = <g_t, d_t>`` and the next step's gradient gives ``d1 = <g_{t+1}, d_t>``.

The model is a tiny randomly initialised GPT-2 built from a config (nothing is downloaded),
trained on byte-level windows (``vocab_size=256``) of a Python standard-library source file,
on the CPU. Newt starts from a deliberately small rate, 1e-5, at which AdamW barely moves the
loss in a few dozen steps: the loss falls only if Newt really raises the rate.

The scheduler matters. The Trainer, given ``optimizers=(newt, None)``, builds its own scheduler
from ``lr_scheduler_type``, and every built-in type ("linear", "constant", "cosine", ...) is a
``LambdaLR``, which writes the absolute rate ``initial_lr * lambda(step)`` after every step and so
overwrites the rate Newt adapted. A chainable torch scheduler passed explicitly (``ConstantLR``
with factor 1 as a no-op, ``LinearLR`` for a decay) only multiplies Newt's rate. Both behaviours
are pinned below, so that a change in either library is noticed.
"""

from __future__ import annotations

import collections
import os
import pathlib

import pytest
import torch
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

from newt import Decision, Newt, ScheduleWarning  # noqa: E402
from newt.integrations.huggingface import NewtTrainer, unwrap_newt  # noqa: E402
from newt.schedulers import FactorLR  # noqa: E402
from tests.devices import needs_cuda  # noqa: E402
from tests.test_distributed import _free_port  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

START_LR = 1e-5
SEQ_LEN = 64
BATCH_SIZE = 8
ADAPTED = {Decision.NEWTON, Decision.CLAMPED, Decision.NONCONVEX, Decision.LINEAR, Decision.ASCENT}
"""Decisions of a step that adapted the rate from a finite measurement (not plain, not a fault)."""


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Nothing here downloads; this makes sure an accidental hub call fails instead of hanging.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _dataset(n: int = 256, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Byte-level windows of ``collections/__init__.py``: real text, no download, fixed by ``seed``."""
    data = torch.tensor(list(pathlib.Path(collections.__file__).read_bytes()), dtype=torch.long)
    starts = torch.randint(0, len(data) - SEQ_LEN, (n,), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": data[s : s + SEQ_LEN], "labels": data[s : s + SEQ_LEN]} for s in starts.tolist()]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=256, n_positions=SEQ_LEN, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _newt(model, strategy: str = "retsinas", **options) -> Newt:
    return Newt(torch.optim.AdamW(model.parameters(), lr=START_LR), strategy=strategy, **options)


def _noop_scheduler(opt: Newt) -> torch.optim.lr_scheduler.LRScheduler:
    # ConstantLR(factor=1, total_iters=0) never changes the rate: it only stops the Trainer from
    # building its own LambdaLR (see the tests of optimizers=(newt, None) below).
    return torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)


class _Recorder(transformers.TrainerCallback):
    """What each optimizer step did: the rate the inner optimizer stepped with, and Newt's decision.

    The rate is read inside the inner optimizer's ``step()`` (a wrapper around it), because in
    closure-free mode Newt adapts the rate at the start of ``step()``, from the new gradient,
    before its inner step: ``group["lr"]`` before ``optimizer.step()`` is not what the step used.
    """

    def __init__(self, opt: Newt) -> None:
        self.opt = opt
        self.inner_rates: list[float] = []
        self.decisions: list[Decision] = []
        self.compared: list[tuple[float, float]] = []  # step_info's (f0, f1): NaN unless losses were compared
        self.multipliers: list[float] = []
        inner_step = opt.inner.step

        def recording_step(*args, **kwargs):
            self.inner_rates.append(float(opt.inner.param_groups[0]["lr"]))
            return inner_step(*args, **kwargs)

        opt.inner.step = recording_step

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Called right after optimizer.step(), before the Trainer steps its scheduler.
        self.decisions.append(self.opt.step_info.decision)
        self.compared.append((self.opt.step_info.f0, self.opt.step_info.f1))
        self.multipliers.append(self.opt.state_dict()["newt"]["rates"][0][1])


def _train(
    tmp_path,
    opt,
    model,
    scheduler,
    max_steps: int,
    resume=None,
    use_cpu=True,
    trainer_class=None,
    callbacks=(),
    **training_args,
):
    """Train with ``optimizers=(opt, scheduler)``; returns the trainer and the recorder."""
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=use_cpu,
        max_steps=max_steps,
        per_device_train_batch_size=BATCH_SIZE,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        seed=0,
        **{"save_strategy": "no", **training_args},
    )
    recorder = _Recorder(opt)
    trainer = (trainer_class or transformers.Trainer)(
        model=model, args=args, train_dataset=_dataset(), optimizers=(opt, scheduler), callbacks=[recorder, *callbacks]
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def _logged(trainer, key: str) -> list[float]:
    """One value per logged step (the final summary entry has "train_loss", not "loss")."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def _loss_drop(trainer) -> tuple[float, float]:
    """The first logged training loss and the mean of the last five."""
    losses = _logged(trainer, "loss")
    return losses[0], sum(losses[-5:]) / 5


@pytest.mark.parametrize("strategy", ["auto", "retsinas", "gen"])
def test_trainer_with_chainable_noop_scheduler_adapts_the_rate_and_trains(tmp_path, strategy):
    steps = 30
    model = _model()
    opt = _newt(model, strategy)
    trainer, rec = _train(tmp_path, opt, model, _noop_scheduler(opt), steps)

    # One closure-free Newt step per optimizer step; the first one has no d1 yet, every later one adapts.
    assert opt.state_dict()["newt"]["steps"] == steps
    assert rec.decisions[0] is Decision.PLAIN
    assert all(decision in ADAPTED for decision in rec.decisions[1:]), rec.decisions
    assert opt.step_info.decision in ADAPTED and not opt.step_info.rejected
    assert opt.param_groups[0]["lr"] == opt.step_info.alpha_next == rec.inner_rates[-1]

    rates = rec.inner_rates
    assert len(rates) == steps and rates[0] == START_LR
    assert len(set(rates)) > steps // 2, f"the rate should change at most steps: {rates}"
    assert max(rates) > 100 * START_LR, f"Newt should have raised the rate far above 1e-5: {rates}"
    # The Trainer logs the scheduler's last rate (set by the previous scheduler.step()): with the no-op
    # scheduler that is the rate the previous step used, so the logged curve is one step behind.
    logged_lr = _logged(trainer, "learning_rate")
    assert logged_lr[0] == START_LR and logged_lr[1:] == rates[:-1]

    # At 1e-5 the loss stays near ln(256) ~ 5.5 for the whole run (see the linear-schedule test
    # below); only the adapted rate brings it down.
    first, last = _loss_drop(trainer)
    assert last < first - 1.0, f"loss {first:.3f} -> {last:.3f} (mean of the last 5 steps)"
    # The Trainer clipped the gradients (max_grad_norm=1 by default; it logs the norm before
    # clipping) before optimizer.step(): Newt measured the clipped gradients, and still adapted.
    assert max(_logged(trainer, "grad_norm")) > trainer.args.max_grad_norm == 1.0


def test_trainer_with_linear_lr_multiplies_newts_adapted_rate_by_the_decay(tmp_path):
    steps, end_factor = 20, 0.1
    model = _model()
    opt = _newt(model)
    # A chainable LinearLR multiplies group["lr"] by a ratio on each scheduler.step(); Newt reads the
    # change as a multiplier on its adapted rate, so the decay applies on top of the adaptation.
    scheduler = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=end_factor, total_iters=steps)
    trainer, rec = _train(tmp_path, opt, model, scheduler, steps)

    # At step t (from 0) Newt has taken in the t ratios written after steps 0..t-1: its multiplier is
    # LinearLR's factor at epoch t. The last ratio, written after the final step, is only in group["lr"].
    factors = [1.0 + (end_factor - 1.0) * t / steps for t in range(steps)]
    assert rec.multipliers == pytest.approx(factors, rel=1e-9)
    adapted, multiplier, written = opt.state_dict()["newt"]["rates"][0]
    assert written == rec.inner_rates[-1] == pytest.approx(adapted * multiplier, rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(end_factor * adapted, rel=1e-9)
    assert adapted > 100 * START_LR and max(rec.inner_rates) > 100 * START_LR
    assert all(decision in ADAPTED for decision in rec.decisions[1:])
    assert opt.state_dict()["newt"]["steps"] == steps


@pytest.mark.parametrize("lr_scheduler_type", ["linear", "cosine"])
def test_trainer_default_decaying_schedule_erases_newts_adaptation(tmp_path, lr_scheduler_type):
    """Documents a pitfall: ``optimizers=(newt, None)`` with a decaying ``lr_scheduler_type``.

    The Trainer builds ``get_scheduler(lr_scheduler_type)``, a ``LambdaLR`` whose ``step()`` writes
    the absolute rate ``initial_lr * lambda(step)``. Newt still adapts at the start of each step,
    but from that value: each step runs at Hugging Face's schedule from 1e-5 times a single update
    of Newt's (at most ``max_factor`` = 2 either way), and nothing accumulates. If this test fails,
    the interaction changed: update docs/integrations/huggingface.md.
    """
    steps = 12
    model = _model()
    opt = _newt(model)
    trainer, rec = _train(tmp_path, opt, model, None, steps, lr_scheduler_type=lr_scheduler_type)

    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    schedule = [START_LR * trainer.lr_scheduler.lr_lambdas[0](k) for k in range(steps)]
    assert _logged(trainer, "learning_rate") == pytest.approx(schedule, rel=1e-12)
    assert all(decision in ADAPTED for decision in rec.decisions[1:]), "Newt runs and adapts..."
    for k, (used, scheduled) in enumerate(zip(rec.inner_rates, schedule)):
        assert scheduled / 2 <= used * (1 + 1e-12) and used <= 2 * scheduled * (1 + 1e-12), (k, rec.inner_rates)
    assert max(rec.inner_rates) <= 2 * START_LR, "...but its rate never grows past one update"


def test_trainer_default_constant_schedule_keeps_newts_rate_but_logs_the_initial_rate(tmp_path):
    """Documents ``optimizers=(newt, None)`` with ``lr_scheduler_type="constant"``.

    That ``LambdaLR`` writes back exactly the initial rate every step, which Newt reads as the
    schedule's factor returning to 1 (newt/_rates.py): the adaptation survives and training works.
    But the Trainer logs ``get_last_lr()``, i.e. 1e-5 throughout, not the rate in use: Newt
    says so, once, with a ``ScheduleWarning`` that names the way out (``NewtTrainer``).
    """
    steps = 30
    model = _model()
    opt = _newt(model)
    with pytest.warns(ScheduleWarning, match="NewtTrainer") as warned:
        trainer, rec = _train(tmp_path, opt, model, None, steps, lr_scheduler_type="constant")
    assert len([w for w in warned if issubclass(w.category, ScheduleWarning)]) == 1

    assert isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.LambdaLR)
    assert _logged(trainer, "learning_rate") == [START_LR] * steps
    assert max(rec.inner_rates) > 100 * START_LR
    assert all(decision in ADAPTED for decision in rec.decisions[1:])
    first, last = _loss_drop(trainer)
    assert last < first - 1.0, f"loss {first:.3f} -> {last:.3f} (mean of the last 5 steps)"


def test_taylor_under_trainer_raises_value_error_asking_for_a_closure(tmp_path):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = _newt(model, "taylor")
    # taylor needs the loss at the lookahead point, which only a closure can compute.
    with pytest.raises(ValueError, match="without a closure") as excinfo:
        _train(tmp_path, opt, model, _noop_scheduler(opt), 3)
    assert "retsinas" in str(excinfo.value) and "gen" in str(excinfo.value)
    # The error comes before the inner step: no parameter moved.
    assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert opt.state_dict()["newt"]["steps"] == 0


def test_gradient_accumulation_and_update_every_under_trainer(tmp_path):
    steps = 10
    model = _model()
    opt = _newt(model, update_every=3)
    _, rec = _train(tmp_path, opt, model, _noop_scheduler(opt), steps, gradient_accumulation_steps=2)

    # optimizer.step() runs once per accumulated step, so Newt counts optimizer steps, not micro-batches.
    assert opt.state_dict()["newt"]["steps"] == steps
    # Closure-free blocks: step 1 starts the measurement, and the rate is adapted from the sums over
    # each block of 3 measured (d0, d1) pairs, at steps 4, 7 and 10; the steps between are plain.
    adapting = [t + 1 for t, decision in enumerate(rec.decisions) if decision is not Decision.PLAIN]
    assert adapting == [4, 7, 10], rec.decisions
    assert all(rec.decisions[t - 1] in ADAPTED for t in adapting)
    # The rate only changes on an adapting step (which adapts before its own inner step).
    changes = [t + 1 for t in range(1, steps) if rec.inner_rates[t] != rec.inner_rates[t - 1]]
    assert changes and set(changes) <= set(adapting), rec.inner_rates


def test_trainer_checkpoint_resume_continues_newts_trajectory(tmp_path):
    steps, save_at = 16, 8

    def run(output_dir, **kwargs):
        model = _model()
        opt = _newt(model)
        trainer, rec = _train(output_dir, opt, model, _noop_scheduler(opt), steps, **kwargs)
        return trainer, opt, rec

    # The Trainer saves opt.state_dict() (Newt's rates and the pending closure-free measurement under
    # "newt") with torch.save and reloads it with torch.load(weights_only=True).
    full, _, full_rec = run(tmp_path / "full", save_strategy="steps", save_steps=save_at)
    resumed, opt, rec = run(tmp_path / "resumed", resume=str(tmp_path / "full" / f"checkpoint-{save_at}"))

    # It really resumed (only the remaining steps ran), Newt's step count came from the checkpoint, and
    # the first resumed step adapted at once: the pending d0 and theta_{t-1} survived the round trip
    # (without them it would be a "plain" step starting a new measurement).
    assert len(rec.decisions) == steps - save_at
    assert opt.state_dict()["newt"]["steps"] == steps
    assert rec.decisions[0] in ADAPTED, rec.decisions
    assert rec.inner_rates == pytest.approx(full_rec.inner_rates[save_at:], rel=1e-6)
    # Steps 1..save_at of the resumed history come from the checkpoint; the rest were recomputed.
    assert _logged(resumed, "loss")[save_at:] == pytest.approx(_logged(full, "loss")[save_at:], rel=1e-6)
    assert max(rec.inner_rates) > 10 * START_LR


# ------------------------------------------------------------ NewtTrainer: the loss reaches Newt


def _spy_on_given_losses(opt: Newt) -> list[float]:
    """The losses given to ``opt`` through ``give_loss``, in order, as floats."""
    given: list[float] = []
    give_loss = opt.give_loss

    def recording_give_loss(loss):
        given.append(float(loss))
        give_loss(loss)

    opt.give_loss = recording_give_loss
    return given


class _Parameters(transformers.TrainerCallback):
    """The model's parameters after each optimizer step."""

    def __init__(self, model) -> None:
        self.model = model
        self.after_step: list[list[torch.Tensor]] = []

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.after_step.append([p.detach().clone() for p in self.model.parameters()])


def test_newt_trainer_undoes_a_far_too_large_start_that_the_plain_trainer_keeps(tmp_path):
    """From lr=1 around AdamW the first step wrecks the tiny GPT-2 (its next batch's loss 5.4 ->
    17, measured). Given the loss, Newt undoes it; the plain Trainer cannot and never recovers."""
    steps, start = 30, 1.0
    runs = {}
    for name, trainer_class in [("plain", transformers.Trainer), ("newt", NewtTrainer)]:
        model = _model()
        initial = [p.detach().clone() for p in model.parameters()]
        opt = Newt(torch.optim.AdamW(model.parameters(), lr=start))
        given = _spy_on_given_losses(opt)
        params = _Parameters(model)
        trainer, rec = _train(
            tmp_path / name, opt, model, _noop_scheduler(opt), steps, trainer_class=trainer_class, callbacks=[params]
        )
        runs[name] = (trainer, rec, opt, given, initial, params.after_step)

    trainer, rec, opt, given, initial, after_step = runs["newt"]
    # One loss per optimizer step, the one the Trainer logged for that step (its own accumulation).
    assert given == pytest.approx(_logged(trainer, "loss"), rel=1e-6)
    # Step 2 saw the first step's damage on its batch: it put the initial parameters back, bit for
    # bit, took no step from them (its gradients were taken at the point given up), cut the rate.
    assert rec.decisions[1] is Decision.SPIKE and opt.state_dict()["newt"]["rejected"] >= 1
    assert all(torch.equal(p, q) for p, q in zip(after_step[1], initial))
    assert not all(torch.equal(p, q) for p, q in zip(after_step[0], initial))
    # (The recorder sees the rates of the inner steps taken: step 2 took none.)
    assert rec.inner_rates[:2] == [start, pytest.approx(0.1 * start, rel=1e-12)]
    assert len(rec.inner_rates) == steps - opt.state_dict()["newt"]["rejected"]

    plain_trainer, plain_rec, plain_opt, plain_given, _, _ = runs["plain"]
    assert plain_given == [] and plain_opt.state_dict()["newt"]["rejected"] == 0
    assert Decision.SPIKE not in plain_rec.decisions
    assert _loss_drop(trainer)[1] < _loss_drop(plain_trainer)[1] - 1.0


def test_newt_trainer_gives_each_accumulated_steps_loss_and_changes_nothing_else_from_a_small_start(tmp_path):
    steps = 8
    runs = {}
    for trainer_class, strategy in [
        (transformers.Trainer, "retsinas"),
        (NewtTrainer, "retsinas"),
        (NewtTrainer, "auto"),
        (NewtTrainer, "gen"),
    ]:
        model = _model()
        opt = _newt(model, strategy)
        given = _spy_on_given_losses(opt)
        name = (trainer_class.__name__, strategy)
        trainer, rec = _train(
            tmp_path / "-".join(name),
            opt,
            model,
            _noop_scheduler(opt),
            steps,
            trainer_class=trainer_class,
            gradient_accumulation_steps=2,
        )
        runs[name] = (trainer, rec, given)

    trainer, rec, given = runs["NewtTrainer", "retsinas"]
    # One loss per optimizer step: the sum over its two micro-batches of the loss each scaled for
    # its backward(), which is what the Trainer logs for the step (accumulated on its own).
    assert len(given) == steps
    assert given == pytest.approx(_logged(trainer, "loss"), rel=1e-6)
    # From 1e-5 every step passes the start-up test: the run is the plain Trainer's, bit for bit.
    plain_trainer, plain_rec, plain_given = runs["Trainer", "retsinas"]
    assert plain_given == []
    assert rec.inner_rates == plain_rec.inner_rates and rec.decisions == plain_rec.decisions
    assert _logged(trainer, "loss") == _logged(plain_trainer, "loss")
    # Given the loss, the default strategy takes gen's rule (the plain Trainer's run takes retsinas).
    auto_rec, gen_rec = runs["NewtTrainer", "auto"][1], runs["NewtTrainer", "gen"][1]
    assert auto_rec.inner_rates == gen_rec.inner_rates and auto_rec.inner_rates != rec.inner_rates


@pytest.mark.parametrize("lr_scheduler_type", ["linear", "cosine", "constant_with_warmup"])
def test_newt_trainer_applies_the_built_schedule_as_a_factor_on_newts_rate(tmp_path, lr_scheduler_type):
    """With ``optimizers=(newt, None)`` the plain Trainer's ``LambdaLR`` erases the adaptation
    (the tests above); ``NewtTrainer`` turns it into a ``FactorLR`` with the same factors."""
    steps, warmup = 30, 3
    model = _model()
    opt = _newt(model, "auto")
    trainer, rec = _train(
        tmp_path,
        opt,
        model,
        None,
        steps,
        trainer_class=NewtTrainer,
        lr_scheduler_type=lr_scheduler_type,
        warmup_steps=warmup,
    )
    assert type(getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)) is FactorLR
    # Hugging Face's own factors, from its get_scheduler on a throwaway optimizer.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    factor = transformers.get_scheduler(
        lr_scheduler_type, probe, num_warmup_steps=warmup, num_training_steps=steps
    ).lr_lambdas[0]
    assert rec.multipliers == pytest.approx([factor(t) for t in range(steps)], rel=1e-9, abs=1e-15)
    assert rec.multipliers[0] == 0.0  # a warm-up from zero: the first step does not move
    assert max(rec.inner_rates) > 100 * START_LR, rec.inner_rates
    first, last = _loss_drop(trainer)
    assert last < first - 1.0, f"loss {first:.3f} -> {last:.3f} (mean of the last 5 steps)"


def test_newt_trainer_resumes_with_its_factor_schedule_where_it_stopped(tmp_path):
    steps, save_at = 16, 8

    def run(output_dir, **kwargs):
        model = _model()
        opt = _newt(model, "auto")
        _, rec = _train(
            output_dir,
            opt,
            model,
            None,
            steps,
            trainer_class=NewtTrainer,
            lr_scheduler_type="linear",
            warmup_steps=2,
            **kwargs,
        )
        return rec

    full = run(tmp_path / "full", save_strategy="steps", save_steps=save_at)
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / f"checkpoint-{save_at}"))
    # The schedule's position came back with the scheduler's state, Newt's rates with its own:
    # the resumed steps use the same factors and rates as the uninterrupted run.
    assert len(resumed.decisions) == steps - save_at
    assert resumed.multipliers == pytest.approx(full.multipliers[save_at:], rel=1e-9)
    assert resumed.inner_rates == pytest.approx(full.inner_rates[save_at:], rel=1e-6)


def test_newt_trainer_refuses_an_optimizer_without_newt_at_construction(tmp_path):
    model = _model()
    adamw = torch.optim.AdamW(model.parameters(), lr=START_LR)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, max_steps=2, report_to=[])
    with pytest.raises(TypeError, match=r"optimizer is .* with no Newt inside: leave optimizers= out"):
        NewtTrainer(model=model, args=args, train_dataset=_dataset(), optimizers=(adamw, None))
    opt = _newt(model)
    with pytest.raises(TypeError, match="give the options to that Newt"):
        NewtTrainer(
            model=model, args=args, train_dataset=_dataset(), optimizers=(opt, None), newt_options={"strategy": "gen"}
        )


@pytest.mark.parametrize("optim", ["adamw_torch", "sgd"])
def test_newt_trainer_without_optimizers_wraps_the_optimizer_the_trainer_would_build(tmp_path, optim):
    """Like ``Trainer(model, args)``: ``optim``, ``learning_rate`` and ``weight_decay`` make the inner
    optimizer (compared with the plain Trainer's own, built from the same arguments), which
    ``Newt`` wraps and adapts from ``learning_rate``; the built schedule multiplies its rate."""
    steps, lr, weight_decay = 20, 1e-3, 0.01

    def arguments(name):
        return transformers.TrainingArguments(
            output_dir=str(tmp_path / name),
            use_cpu=True,
            max_steps=steps,
            per_device_train_batch_size=BATCH_SIZE,
            logging_steps=1,
            report_to=[],
            disable_tqdm=True,
            seed=0,
            save_strategy="no",
            optim=optim,
            learning_rate=lr,
            weight_decay=weight_decay,
            lr_scheduler_type="cosine",
        )

    plain = transformers.Trainer(model=_model(), args=arguments("plain"), train_dataset=_dataset())
    expected = plain.create_optimizer()
    trainer = NewtTrainer(
        model=_model(), args=arguments("newt"), train_dataset=_dataset(), newt_options={"strategy": "retsinas"}
    )
    trainer.train()
    opt = unwrap_newt(trainer.optimizer)
    assert type(opt.inner) is type(expected) and opt.strategy == "retsinas"
    assert [g["weight_decay"] for g in opt.inner.param_groups] == [g["weight_decay"] for g in expected.param_groups]
    assert [len(g["params"]) for g in opt.inner.param_groups] == [len(g["params"]) for g in expected.param_groups]
    assert opt.inner.param_groups[0]["initial_lr"] == lr
    assert type(getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler)) is FactorLR
    assert opt.adapted_rates[0] != lr  # the rate was adapted, from learning_rate
    first, last = _loss_drop(trainer)
    assert last < first - 0.5, f"loss {first:.3f} -> {last:.3f} (mean of the last 5 steps)"


def _accelerate_loop(mode: str, lr: float = 1.0) -> tuple[float, int]:
    """A hand-written Accelerate loop around ``Newt``; the mean loss of its last 5 steps, steps undone.

    ``mode``: ``"closure"`` (lookahead, through ``AcceleratedOptimizer.step(closure)``), ``"give"``
    (closure-free, the loss given to the unwrapped ``Newt``) or ``"bare"`` (closure-free, no loss).
    """
    accelerator = accelerate.Accelerator(cpu=True)
    model = _model()
    opt = Newt(torch.optim.AdamW(model.parameters(), lr=lr))
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=BATCH_SIZE, shuffle=False)
    model, prepared, loader = accelerator.prepare(model, opt, loader)
    assert unwrap_newt(prepared) is opt
    losses = []
    for batch in loader:
        if mode == "closure":

            def closure():
                prepared.zero_grad()
                loss = model(**batch).loss
                accelerator.backward(loss)
                return loss

            prepared.step(closure)  # AcceleratedOptimizer.step returns None: read the loss from Newt
            losses.append(opt.step_info.f0)
            continue
        prepared.zero_grad()
        loss = model(**batch).loss
        accelerator.backward(loss)
        if mode == "give":
            unwrap_newt(prepared).give_loss(loss)
        prepared.step()
        losses.append(float(loss.detach()))
    return sum(losses[-5:]) / 5, opt.state_dict()["newt"]["rejected"]


def test_a_hand_written_accelerate_loop_passes_a_closure_or_gives_the_loss_through_its_wrapper():
    """``AcceleratedOptimizer.step`` takes a closure but no ``loss=``: ``give_loss`` on the ``Newt``
    inside does it. From ``lr=1`` both undo the far-too-large start; the bare step cannot."""
    bare_loss, bare_undone = _accelerate_loop("bare")
    assert bare_undone == 0
    for mode in ("closure", "give"):
        loss, undone = _accelerate_loop(mode)
        assert undone >= 1, mode
        assert loss < bare_loss - 1.0, (mode, loss, bare_loss)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two CPU ranks running ``NewtTrainer`` under DDP (gloo) from ``lr=1``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_WORLD_SIZE="2",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    torch.set_num_threads(1)
    model = _model()
    opt = Newt(torch.optim.AdamW(model.parameters(), lr=1.0))
    given = _spy_on_given_losses(opt)
    trainer, rec = _train(
        pathlib.Path(out_dir) / f"out{rank}",
        opt,
        model,
        _noop_scheduler(opt),
        12,
        trainer_class=NewtTrainer,
        ddp_backend="gloo",
    )
    torch.save(
        {
            "world": torch.distributed.get_world_size(),
            "wrapped": type(trainer.model_wrapped).__name__,
            "rates": rec.inner_rates,
            "decisions": [str(d) for d in rec.decisions],
            "compared": rec.compared[1],
            "given": given,
            "logged": _logged(trainer, "loss"),
            "params": [p.detach().clone() for p in model.parameters()],
        },
        pathlib.Path(out_dir) / f"rank{rank}.pt",
    )


def test_newt_trainer_under_ddp_undoes_the_same_step_on_both_ranks(tmp_path):
    """Two CPU processes (gloo) launched as ``torchrun`` would: each rank gives ``Newt`` its own
    batch's loss, ``Newt`` averages them, and both ranks take the same decisions and rates."""
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for result in ranks:
        assert result["world"] == 2 and result["wrapped"] == "DistributedDataParallel"
        assert result["decisions"][:2] == ["plain", "spike"]  # the start at 1 undone at step 2
    first, second = ranks
    assert first["rates"] == second["rates"] and first["decisions"] == second["decisions"]
    assert all(torch.equal(p, q) for p, q in zip(first["params"], second["params"], strict=True))
    # Each rank gave its own batch's loss; the Trainer logs their mean, which is what Newt used.
    assert first["given"] != second["given"]
    means = [(a + b) / 2 for a, b in zip(first["given"], second["given"], strict=True)]
    assert first["logged"] == second["logged"] == pytest.approx(means, rel=1e-6)
    assert first["compared"] == second["compared"] == pytest.approx(tuple(means[:2]), rel=1e-6)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trainer_on_a_gpu_adapts_the_rate_in_each_precision(tmp_path, precision):
    """The Trainer's own device placement and mixed precision: with ``fp16`` Accelerate's
    GradScaler unscales the gradients before ``optimizer.step()`` and skips the steps that
    overflow, so they never reach Newt; every step that does is measured in closure-free mode."""
    steps = 30
    model = _model()
    opt = _newt(model, "auto")
    flags = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}[precision]
    trainer, rec = _train(tmp_path, opt, model, _noop_scheduler(opt), steps, use_cpu=False, **flags)

    assert next(model.parameters()).is_cuda
    assert all(p.dtype == torch.float32 for p in model.parameters())  # mixed precision keeps fp32 weights
    newt_steps = opt.state_dict()["newt"]["steps"]
    assert newt_steps == len(rec.inner_rates) >= steps - 5  # fp16: a few overflows are skipped
    assert all(decision in ADAPTED for decision in rec.decisions[-10:]), rec.decisions
    assert max(rec.inner_rates) > 100 * START_LR, rec.inner_rates
    first, last = _loss_drop(trainer)
    assert last < first - 1.0, f"loss {first:.3f} -> {last:.3f} (mean of the last 5 steps)"


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_newt_trainer_on_a_gpu_undoes_a_far_too_large_start_in_each_precision(tmp_path, precision):
    """``NewtTrainer`` with the Trainer's device placement and mixed precision, from lr=1 around
    AdamW (on the CPU the first step takes the next batch's loss 5.4 -> 17): each step's loss is
    given from the device, the start-up test undoes the step that wrecked the model, and the
    loss falls. With ``fp16`` a step that the GradScaler skips never reaches ``Newt``; its loss
    stays given until the next step's replaces it."""
    steps, start = 30, 1.0
    model = _model()
    opt = Newt(torch.optim.AdamW(model.parameters(), lr=start))
    given = _spy_on_given_losses(opt)
    flags = {"fp32": {}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}[precision]
    trainer, rec = _train(
        tmp_path, opt, model, _noop_scheduler(opt), steps, use_cpu=False, trainer_class=NewtTrainer, **flags
    )

    assert next(model.parameters()).is_cuda
    assert len(given) == steps  # one loss per optimizer step, skipped or not
    state = opt.state_dict()["newt"]
    assert steps - 5 <= state["steps"] <= steps  # fp16: a few overflows are skipped
    assert state["rejected"] >= 1 and Decision.SPIKE in rec.decisions
    assert len(rec.inner_rates) == state["steps"] - state["rejected"]  # an undone step takes no inner step
    assert rec.inner_rates[0] == start and min(rec.inner_rates) <= 0.1 * start
    first, last = _loss_drop(trainer)
    assert last < first - 1.0, f"loss {first:.3f} -> {last:.3f} (mean of the last 5 steps)"
