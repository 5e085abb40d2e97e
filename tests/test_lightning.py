"""Newt under a real PyTorch Lightning ``Trainer`` on the CPU: closure steps, logging, schedulers.

Lightning's automatic optimization calls ``optimizer.step(closure)`` with a closure that runs
``training_step``, ``zero_grad`` and ``backward``, and wraps it so that ``on_before_optimizer_step``
and gradient clipping run after each call. Newt calls that closure twice per step (at ``theta_t``
and at the lookahead point), so everything inside it runs twice. These tests pin what that means
in practice, and docs/integrations/lightning.md claims nothing beyond them:

* the Trainer really drives Newt's closure step (``training_step`` runs twice per step, Newt's step
  counter equals ``max_steps``) and the adapted rate trains an MLP on ``load_digits`` from a
  deliberately small start (Adam at 1e-4);
* ``LearningRateMonitor`` logs the rate each step used, which is Newt's adapted rate;
* ``self.log`` inside ``training_step`` and the ``outputs`` of ``on_train_batch_end`` see the
  lookahead call's loss (the epoch mean mixes both calls);
* a chainable warm-up scheduler multiplies the adapted rate;
* a Lightning checkpoint restores Newt's counters and rates, and the resumed step is bit-identical;
* manual optimization works, including gradient accumulation inside the closure;
* ``bf16-mixed`` keeps the closure step; fp16 with a ``GradScaler`` calls ``step()`` without one;
* ``accumulate_grad_batches`` feeds Newt mismatched measurements, and
  ``Trainer(gradient_clip_val=...)`` clips both calls' gradients, which stalls the loss-based rules.
"""

from __future__ import annotations

import csv
import math
import statistics
import types

import pytest
import torch

L = pytest.importorskip("lightning")

from lightning.pytorch.callbacks import Callback, LearningRateMonitor  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from newt import Decision, Newt  # noqa: E402
from tests.devices import DEVICES  # noqa: E402
from tests.models import digits, full_batch_loss, make_mlp  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    # The tiny in-memory data set needs no worker processes.
    pytest.mark.filterwarnings("ignore:.*does not have many workers:UserWarning"),
    # Lightning 2.6's own use of a torch.utils._pytree API that newer torch deprecates.
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
]

START_LR = 1e-4
"""Adam's starting rate: small enough that Adam alone barely moves the loss in the steps below."""
BATCH_SIZE = 128
BATCHES_PER_EPOCH = 1797 // BATCH_SIZE  # 14, with drop_last=True
ADAPTED = {Decision.NEWTON, Decision.CLAMPED, Decision.NONCONVEX, Decision.LINEAR, Decision.ASCENT}
"""Decisions of a step that adapted the rate from a finite measurement (not plain, not a fault)."""


# ---------------------------------------------------------------------- model, data, trainer


class DigitsClassifier(L.LightningModule):
    """A 64 -> 32 -> 10 MLP on ``load_digits``, optimized by ``Newt(Adam(lr=START_LR))``.

    ``training_step_calls`` counts the calls, to see how often Lightning's closure runs.
    ``warmup_iters`` attaches a per-step ``LinearLR`` warm-up from 0.1 to 1.
    """

    def __init__(
        self, seed: int = 0, strategy: str = "taylor", warmup_iters: int | None = None, forward_only: bool | None = None
    ) -> None:
        super().__init__()
        self.net = make_mlp(seed, hidden=32)
        self.strategy = strategy
        self.forward_only = forward_only
        self.warmup_iters = warmup_iters
        self.training_step_calls = 0
        self.hook_grad_norms: list[float] = []

    def training_step(self, batch, batch_idx):
        self.training_step_calls += 1
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        # Logged on both closure calls: the test of logging checks what ends up in the CSV.
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Runs once per batch, after the step: the place to log the loss at theta_t. Lightning's
        # wrapper (self.optimizers()) forwards step_info to the Newt it wraps.
        info = self.optimizers().step_info
        if info is not None:  # None before the first step (with accumulate_grad_batches)
            self.log("newt_f0", info.f0)

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning runs this hook after each closure call, after backward and before clipping.
        self.hook_grad_norms.append(_grad_norm(self))

    def configure_optimizers(self):
        newt = Newt(
            torch.optim.Adam(self.parameters(), lr=START_LR), strategy=self.strategy, forward_only=self.forward_only
        )
        if self.warmup_iters is None:
            return newt
        warmup = torch.optim.lr_scheduler.LinearLR(
            newt, start_factor=0.1, end_factor=1.0, total_iters=self.warmup_iters
        )
        return {"optimizer": newt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


class ManualDigitsClassifier(DigitsClassifier):
    """Manual optimization: ``training_step`` calls ``opt.step(closure)`` itself.

    The closure accumulates the gradient over ``chunks`` micro-batches of the batch, the way to
    accumulate gradients with Newt (both of Newt's calls then see the whole batch).
    """

    def __init__(self, chunks: int = 2) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.chunks = chunks
        self.closure_calls = 0
        self.step_losses: list[float] = []

    def training_step(self, batch, batch_idx):
        self.training_step_calls += 1
        opt = self.optimizers()
        x, y = batch

        def closure():
            self.closure_calls += 1
            opt.zero_grad()
            total = 0.0
            for xs, ys in zip(x.chunk(self.chunks), y.chunk(self.chunks)):
                loss = torch.nn.functional.cross_entropy(self.net(xs), ys) * (len(ys) / len(y))
                self.manual_backward(loss)
                total += loss.detach()
            return total

        loss = opt.step(closure)  # Newt returns the first call's loss, at theta_t
        self.step_losses.append(float(loss))
        self.log("train_loss", loss)


class StepRecorder(Callback):
    """Records, for every batch, the rate it used and what Newt's step measured and decided.

    ``on_train_batch_start`` runs before the step (after the previous batch's scheduler step):
    ``group["lr"]`` is then the rate the step will use. ``on_train_batch_end`` runs after the
    step and after a per-step scheduler's ``step()``.
    """

    def __init__(self) -> None:
        self.lr_used: list[float] = []
        self.batches: list[torch.Tensor] = []
        self.infos = []
        self.output_losses: list[float] = []
        self.multipliers: list[float] = []
        self.adapted: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lr_used.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.batches.append(batch[0].clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        newt = trainer.optimizers[0]  # the Newt itself; pl_module.optimizers() is Lightning's wrapper
        self.infos.append(newt.step_info)
        self.output_losses.append(float(outputs["loss"]) if outputs else math.nan)
        self.multipliers.append(newt.schedule_factors[0])
        self.adapted.append(newt.adapted_rates[0])


class StateAtTrainStart(Callback):
    """Newt's step counter and rate as the Trainer starts training (after a checkpoint restore)."""

    steps: int | None = None
    lr: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        newt = trainer.optimizers[0]
        self.steps = newt.state_dict()["newt"]["steps"]
        self.lr = newt.param_groups[0]["lr"]


def _grad_norm(module: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.parameters()])))


def _loader(shuffle: bool = True) -> DataLoader:
    x, y = digits()
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE, shuffle=shuffle, generator=generator, drop_last=True)


def _trainer(max_steps: int, callbacks=(), logger=False, accelerator: str = "cpu", **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator=accelerator,
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        callbacks=list(callbacks),
        **kwargs,
    )


def _loss(module: DigitsClassifier) -> float:
    device = next(module.parameters()).device
    return full_batch_loss(module.net, *(t.to(device) for t in digits()))


def _logged(logger: CSVLogger, column: str) -> dict[int, float]:
    """``{step: value}`` of one column of the CSV the logger wrote (rows where it is set)."""
    with open(f"{logger.log_dir}/metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    values = {int(row["step"]): float(row[column]) for row in rows if row.get(column)}
    assert values, f"no {column!r} in the CSV; columns: {list(rows[0]) if rows else []}"
    return values


# ---------------------------------------------------------------------- automatic optimization

FIT_STEPS = 60


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One 60-step fit with a CSVLogger and a LearningRateMonitor, shared by the tests below."""
    module = DigitsClassifier()
    loss_before = _loss(module)
    recorder = StepRecorder()
    logger = CSVLogger(tmp_path_factory.mktemp("lightning_logs"), name="digits")
    trainer = _trainer(FIT_STEPS, [LearningRateMonitor(logging_interval="step"), recorder], logger=logger)
    trainer.fit(module, _loader())
    return types.SimpleNamespace(
        module=module, trainer=trainer, recorder=recorder, logger=logger, loss_before=loss_before
    )


def test_the_trainer_drives_newts_closure_step_twice_per_step(fitted):
    newt = fitted.trainer.optimizers[0]
    assert type(newt) is Newt
    assert fitted.trainer.global_step == FIT_STEPS  # Lightning counts optimizer steps, not closure calls
    assert newt.state_dict()["newt"]["steps"] == FIT_STEPS
    # Newt calls Lightning's closure at theta_t and at the lookahead point: training_step runs twice.
    assert fitted.module.training_step_calls == 2 * FIT_STEPS
    assert len(fitted.module.hook_grad_norms) == 2 * FIT_STEPS  # so does on_before_optimizer_step
    infos = fitted.recorder.infos
    assert len(infos) == FIT_STEPS
    # Every step measured the lookahead loss (a plain or closure-free step leaves f1 NaN).
    assert all(math.isfinite(info.f0) and math.isfinite(info.f1) for info in infos)
    # Every step adapted the rate from its measurement (a loss spike is measured, then undone).
    assert all(info.decision in ADAPTED or info.decision is Decision.SPIKE for info in infos)
    assert sum(info.rejected for info in infos) <= 3
    assert newt.step_info is infos[-1]


def test_the_adapted_rate_trains_from_a_small_start(fitted):
    newt = fitted.trainer.optimizers[0]
    loss_after = _loss(fitted.module)
    # Adam at 1e-4 alone stays near the initial loss (~2.3) in 60 steps; Newt raised the rate.
    assert loss_after < 0.3 * fitted.loss_before, (fitted.loss_before, loss_after)
    assert newt.param_groups[0]["lr"] > 10 * START_LR
    assert max(fitted.recorder.lr_used) > 100 * START_LR


def test_learning_rate_monitor_logs_the_rate_each_step_used(fitted):
    logged = _logged(fitted.logger, "lr-Newt")
    infos = fitted.recorder.infos
    # The monitor logs at the start of each batch: the rate that step used.
    assert sorted(logged) == list(range(FIT_STEPS))
    assert logged[0] == START_LR
    for step in range(FIT_STEPS):
        assert logged[step] == pytest.approx(infos[step].alpha, rel=1e-12)
        assert logged[step] == pytest.approx(fitted.recorder.lr_used[step], rel=1e-12)
    for step in range(1, FIT_STEPS):  # ... which is the rate Newt adapted at the previous step
        assert logged[step] == pytest.approx(infos[step - 1].alpha_next, rel=1e-12)
    assert len(set(logged.values())) > FIT_STEPS // 2  # it really changes over the run
    # The rate after the last step (used by a next step) is Newt's group lr, not yet logged.
    assert fitted.trainer.optimizers[0].param_groups[0]["lr"] == infos[-1].alpha_next


def test_training_step_logs_and_outputs_come_from_the_lookahead_call(fitted):
    infos = fitted.recorder.infos
    f0 = [info.f0 for info in infos]
    f1 = [info.f1 for info in infos]
    # Lightning keeps the result of the closure's latest call: the lookahead loss f1, not f0.
    assert fitted.recorder.output_losses == pytest.approx(f1, rel=1e-6)
    assert all(abs(a - b) > 1e-6 for a, b in zip(f0, f1))  # so the distinction is real
    step_logged = _logged(fitted.logger, "train_loss_step")
    assert [step_logged[step] for step in range(FIT_STEPS)] == pytest.approx(f1, rel=1e-6)
    # The epoch mean of self.log(on_epoch=True) averages both calls of every step of the epoch.
    epoch_logged = _logged(fitted.logger, "train_loss_epoch")
    first_epoch = range(BATCHES_PER_EPOCH)
    both = statistics.fmean([f0[s] for s in first_epoch] + [f1[s] for s in first_epoch])
    assert epoch_logged[BATCHES_PER_EPOCH - 1] == pytest.approx(both, rel=1e-5)
    assert epoch_logged[BATCHES_PER_EPOCH - 1] != pytest.approx(statistics.fmean(f1[s] for s in first_epoch), rel=1e-4)
    # Logged from on_train_batch_end instead: once per step, the loss at theta_t.
    f0_logged = _logged(fitted.logger, "newt_f0")
    assert [f0_logged[step] for step in range(FIT_STEPS)] == pytest.approx(f0, rel=1e-6)


# ---------------------------------------------------------------------- a warm-up scheduler

WARMUP_ITERS = 20
WARMUP_STEPS = 40


def test_a_warm_up_scheduler_multiplies_the_adapted_rate(tmp_path):
    module = DigitsClassifier(warmup_iters=WARMUP_ITERS)
    loss_before = _loss(module)
    recorder = StepRecorder()
    logger = CSVLogger(tmp_path, name="warmup")
    trainer = _trainer(WARMUP_STEPS, [LearningRateMonitor(logging_interval="step"), recorder], logger=logger)
    trainer.fit(module, _loader())

    newt = trainer.optimizers[0]
    assert newt.state_dict()["newt"]["steps"] == WARMUP_STEPS
    logged = _logged(logger, "lr-Newt")
    assert sorted(logged) == list(range(WARMUP_STEPS))

    def factor(step: int) -> float:  # LinearLR's closed form
        return 0.1 + 0.9 * min(step, WARMUP_ITERS) / WARMUP_ITERS

    # Newt reads the scheduler's change of group["lr"] at the start of step k: its multiplier
    # is then the warm-up factor of step k.
    assert recorder.multipliers == pytest.approx([factor(k) for k in range(WARMUP_STEPS)], rel=1e-9)
    # The logged rate of step k = warm-up factor of step k x the rate Newt adapted at step k-1.
    assert logged[0] == pytest.approx(0.1 * START_LR, rel=1e-12)
    for step in range(1, WARMUP_STEPS):
        assert logged[step] == pytest.approx(factor(step) * recorder.adapted[step - 1], rel=1e-9)
        assert logged[step] == pytest.approx(recorder.infos[step].alpha, rel=1e-12)
    # Newt adapted the unscheduled rate meanwhile, and after the warm-up the factor is 1.
    assert recorder.adapted[-1] > 10 * START_LR
    assert newt.param_groups[0]["lr"] == pytest.approx(recorder.adapted[-1], rel=1e-9)
    assert _loss(module) < 0.5 * loss_before


# ---------------------------------------------------------------------- checkpoints


def test_a_lightning_checkpoint_restores_newt_and_the_resumed_step_is_bit_identical(tmp_path):
    n = BATCHES_PER_EPOCH  # an end-of-epoch checkpoint: the resumed run's next batch is batch 0
    path = tmp_path / "newt.ckpt"

    uninterrupted = DigitsClassifier()
    reference = StepRecorder()
    _trainer(n + 1, [reference]).fit(uninterrupted, _loader(shuffle=False))

    first = DigitsClassifier()
    first_trainer = _trainer(n)
    first_trainer.fit(first, _loader(shuffle=False))
    first_trainer.save_checkpoint(path)
    saved_lr = first_trainer.optimizers[0].param_groups[0]["lr"]
    assert saved_lr != START_LR

    resumed = DigitsClassifier(seed=1)  # other initial weights: everything must come from the file
    at_start, recorder = StateAtTrainStart(), StepRecorder()
    resumed_trainer = _trainer(n + 1, [at_start, recorder])
    resumed_trainer.fit(resumed, _loader(shuffle=False), ckpt_path=path, weights_only=True)

    assert (at_start.steps, at_start.lr) == (n, saved_lr)
    assert len(recorder.infos) == 1  # one more step
    # Same batch, same state: the resumed step is the uninterrupted run's step n+1, bit for bit.
    assert torch.equal(recorder.batches[0], reference.batches[n])
    for p, q in zip(resumed.parameters(), uninterrupted.parameters()):
        assert torch.equal(p, q)
    newt = resumed_trainer.optimizers[0]
    assert newt.state_dict()["newt"]["steps"] == n + 1
    assert newt.param_groups[0]["lr"] == reference.infos[n].alpha_next


# ---------------------------------------------------------------------- manual optimization

MANUAL_STEPS = 30


def test_manual_optimization_with_accumulation_inside_the_closure():
    module = ManualDigitsClassifier(chunks=2)
    loss_before = _loss(module)
    recorder = StepRecorder()
    trainer = _trainer(MANUAL_STEPS, [recorder])
    trainer.fit(module, _loader())

    newt = trainer.optimizers[0]
    assert trainer.global_step == MANUAL_STEPS
    assert newt.state_dict()["newt"]["steps"] == MANUAL_STEPS
    assert module.training_step_calls == MANUAL_STEPS  # once per step: safe to self.log there
    assert module.closure_calls == 2 * MANUAL_STEPS
    # opt.step returned Newt's return value, the loss at theta_t.
    assert module.step_losses == pytest.approx([info.f0 for info in recorder.infos], rel=1e-6)
    # Both calls saw the whole batch: at the tiny first step the two slopes nearly agree.
    first = recorder.infos[0]
    assert first.d1 / first.d0 == pytest.approx(1.0, abs=0.01)
    assert _loss(module) < 0.5 * loss_before
    assert newt.param_groups[0]["lr"] > 10 * START_LR


# ---------------------------------------------------------------------- mixed precision

AMP_STEPS = 30


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_mixed_precision_keeps_the_closure_step(device):
    module = DigitsClassifier()
    loss_before = _loss(module)
    recorder = StepRecorder()
    trainer = _trainer(AMP_STEPS, [recorder], accelerator=device, precision="bf16-mixed")
    trainer.fit(module, _loader())
    assert module.training_step_calls == 2 * AMP_STEPS  # no scaler: Lightning passes its closure on
    assert all(math.isfinite(info.f1) for info in recorder.infos)
    assert _loss(module) < 0.5 * loss_before
    assert trainer.optimizers[0].param_groups[0]["lr"] > 10 * START_LR


def _fp16_with_grad_scaler(device: str) -> dict:
    """``Trainer`` arguments for fp16 with a ``GradScaler``: ``precision="16-mixed"`` on a GPU; on
    a CPU, where Lightning switches "16-mixed" to bf16-mixed, the same plugin class set up by hand."""
    if device == "cuda":
        return {"accelerator": "cuda", "precision": "16-mixed"}
    return {"plugins": [MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))]}


@pytest.mark.parametrize("device", DEVICES)
def test_caveat_fp16_with_a_grad_scaler_steps_newt_without_a_closure(device):
    """Pins a documented caveat: with a ``GradScaler`` Lightning runs the closure itself and
    then calls ``scaler.step(optimizer)``, which calls ``optimizer.step()`` without a closure.
    ``taylor`` needs the closure and says so; ``retsinas`` (what the default, ``"auto"``, uses
    without a closure) runs closure-free.
    """
    module = DigitsClassifier(strategy="taylor")
    with pytest.raises(ValueError, match="without a closure"):
        _trainer(AMP_STEPS, **_fp16_with_grad_scaler(device)).fit(module, _loader())

    module = DigitsClassifier(strategy="retsinas")
    loss_before = _loss(module)
    recorder = StepRecorder()
    trainer = _trainer(AMP_STEPS, [recorder], **_fp16_with_grad_scaler(device))
    trainer.fit(module, _loader())
    assert module.training_step_calls == AMP_STEPS  # once per step: closure-free mode
    assert trainer.optimizers[0].state_dict()["newt"]["steps"] == AMP_STEPS
    assert all(math.isnan(info.f0) for info in recorder.infos)  # no loss is measured closure-free
    assert _loss(module) < 0.5 * loss_before
    assert trainer.optimizers[0].param_groups[0]["lr"] > 10 * START_LR


# ---------------------------------------------------------------------- caveats


def test_caveat_accumulate_grad_batches_gives_newt_mismatched_slopes(fitted):
    """Pins a documented caveat, not a goal: with ``accumulate_grad_batches=2`` the step's
    closure does not clear the gradients, so the first call adds the last micro-batch onto the
    accumulated gradient (``d0`` sees the whole batch), but Newt clears them before the
    lookahead call, so ``d1`` sees only the last micro-batch's half. At a tiny step, where the
    two slopes should agree, ``d1 / d0`` is about 0.5 instead of 1.
    """
    module = DigitsClassifier()
    recorder = StepRecorder()
    trainer = _trainer(3, [recorder], accumulate_grad_batches=2)
    trainer.fit(module, _loader())
    # One closure call for the accumulated micro-batch, two in the step.
    assert module.training_step_calls == 3 * (1 + 2)
    first = recorder.infos[1]  # on_train_batch_end runs for every micro-batch; [0] precedes the step
    assert recorder.infos[0] is None
    assert first.d1 / first.d0 == pytest.approx(0.5, abs=0.05)
    # Without accumulation the same tiny step measures nearly equal slopes.
    unaccumulated = fitted.recorder.infos[0]
    assert unaccumulated.d1 / unaccumulated.d0 == pytest.approx(1.0, abs=0.01)


CLIP = 0.05
"""Below the gradient norm of this model (about 0.43 at the start), so clipping acts every step."""
CLIP_STEPS = 30


@pytest.mark.parametrize("strategy", ["taylor", "gen", "retsinas"])
def test_caveat_gradient_clipping_applies_to_both_calls(strategy, fitted):
    """Pins a documented caveat: ``Trainer(gradient_clip_val=...)`` clips the gradient after
    each closure call, at ``theta_t`` and at the lookahead point. The slopes shrink but the loss
    values do not, so ``taylor``, which mixes them, sees a curvature that is not there and barely
    raises the rate. ``retsinas`` uses slopes only and still adapts; so does ``gen``, whose
    parabola then looks non-convex while the slopes barely change (the "linear" growth).
    """
    module = DigitsClassifier(strategy=strategy, forward_only=False)  # both calls' gradients clipped
    recorder = StepRecorder()
    trainer = _trainer(CLIP_STEPS, [recorder], gradient_clip_val=CLIP)
    trainer.fit(module, _loader())
    assert len(module.hook_grad_norms) == 2 * CLIP_STEPS
    assert min(module.hook_grad_norms) > CLIP  # the hook sees the unclipped gradients: clipping bit
    # After the step .grad holds the lookahead gradient, and it was clipped too.
    assert _grad_norm(module) <= CLIP * (1 + 1e-5)
    rate = trainer.optimizers[0].param_groups[0]["lr"]
    unclipped = fitted.recorder.infos[CLIP_STEPS - 1].alpha_next  # taylor, same data, no clipping
    assert unclipped > 100 * START_LR
    if strategy == "taylor":
        assert rate < 10 * START_LR < unclipped
    else:
        assert rate > 100 * START_LR


def test_a_forward_only_lookahead_leaves_theta_ts_gradients_for_the_hooks_after_its_backward():
    """Lightning runs its hooks and its clipping after each closure call. In the forward-only
    lookahead call (``gen``, the default) the backward pass is skipped and ``theta_t``'s
    gradients stand in, already clipped by the first call's clipping: a hook reading ``.grad``
    finds them. The documented caveat of clipping in the closure holds here as for ``taylor``:
    the clipped slope and the loss values disagree, the parabola is never convex, the rate is kept."""
    module = DigitsClassifier(strategy="gen")
    recorder = StepRecorder()
    trainer = _trainer(CLIP_STEPS, [recorder], gradient_clip_val=CLIP)
    trainer.fit(module, _loader())
    norms = module.hook_grad_norms
    assert len(norms) == 2 * CLIP_STEPS
    assert min(norms[0::2]) > CLIP  # the first call's backward: unclipped when the hook runs
    assert max(norms[1::2]) <= CLIP * (1 + 1e-5)  # the lookahead's: theta_t's, clipped already
    assert trainer.optimizers[0].param_groups[0]["lr"] < 10 * START_LR
