"""Newt with ``torch.compile``, mixed precision (bf16, fp16 + GradScaler) and gradient accumulation.

Every test compares with an independent computation, so that a silent difference fails:

- ``torch.compile``: the compiled model must train exactly like the same model run eagerly (same
  initial weights, same batches, same dropout masks). Newt calls the closure twice per step and
  replays the random state for the lookahead; a compiled graph that drew other dropout masks, or
  a recompilation on the lookahead call, would show up here. The backends are ``"eager"`` (Dynamo
  only) and ``"aot_eager"`` (Dynamo plus AOTAutograd: functionalisation and the joint forward and
  backward graph, the same front end as ``"inductor"``), both fast on a CPU. ``"inductor"`` is
  not run here: on this CPU it needs a C++ toolchain and took 15 to 35 s to compile this small
  MLP (cold cache). Run by hand: parameters within 4e-6 of the eager run after 30 steps; its
  dropout draws other masks than eager mode (no bit-for-bit comparison), but the lookahead
  replayed them exactly (f1 == f0 at a rate of 1e-9).
- bf16 autocast and bf16 parameters: against the fp32 run and a float64 recomputation of the
  dot products.
- fp16 with ``grad_scaler=``: the overflow steps of a huge initial scale are skipped without
  touching the parameters, the rate or the inner state, and ``d0``/``d1`` equal an fp32
  recomputation without any scaling (a missing or double division by the scale is off by 2**18+).
- gradient accumulation inside the closure and in closure-free mode: the same numbers, to float64
  rounding, as one big batch.

BatchNorm's running statistics are restored after the lookahead call even when the BatchNorm runs
inside a compiled region, where its own forward hook never fires
(``test_compiled_batchnorm_buffers_are_restored_after_the_lookahead``).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

from newt import Decision, Newt
from tests.devices import DEVICES, needs_cuda
from tests.models import digits, full_batch_loss, make_mlp, minibatch_indices

pytestmark = [
    pytest.mark.slow,
    # torch warns that a global module hook fires an extra time for the OptimizedModule wrapper:
    # that hook is Newt's, installed only during the lookahead call to restore module buffers.
    pytest.mark.filterwarnings("ignore:Using `torch.compile\\(module\\)` when there are global hooks"),
]

BATCH = 64


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return digits()


@pytest.fixture
def fresh_dynamo():
    """Each compile test starts from an empty Dynamo cache, so graph counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _assert_finite(info) -> None:
    assert all(math.isfinite(v) for v in (info.f0, info.f1, info.d0, info.d1, info.alpha, info.alpha_next)), info


def _dot(grads, before, after) -> float:
    """``<grads, before - after>`` in float64, one tensor at a time (independent of newt's kernels)."""
    return sum(float((g.double() * (b.double() - a.double())).sum()) for g, b, a in zip(grads, before, after))


def _dot_magnitude(grads, before, after) -> float:
    """``sum |g_i (b_i - a_i)|``: the scale of a dot product's rounding error, however much it cancels."""
    return sum(float((g.double() * (b.double() - a.double())).abs().sum()) for g, b, a in zip(grads, before, after))


def _train(model, forward, batches, x, y, *, inner=None, autocast_dtype=None, **newt_options):
    """Train ``model`` with Newt over ``batches``; ``forward`` is ``model`` or its compiled wrapper.

    Returns the ``StepInfo`` of every step.
    """
    opt = Newt(inner or torch.optim.Adam(model.parameters(), lr=1e-3), **newt_options)
    infos = []
    for idx in batches:
        xb, yb = x[idx], y[idx]

        def closure():
            opt.zero_grad()
            if autocast_dtype is None:
                autocast = contextlib.nullcontext()
            else:
                autocast = torch.autocast(xb.device.type, dtype=autocast_dtype)
            with autocast:
                loss = nn.functional.cross_entropy(forward(xb), yb)
            loss.backward()
            return loss

        opt.step(closure)
        infos.append(opt.step_info)
    return infos


# ---------------------------------------------------------------------------------- torch.compile


def _counting_backend(name: str):
    """The Dynamo backend ``name``, counting the graphs it is handed (one per compilation)."""
    graphs = []
    backend = torch._dynamo.lookup_backend(name)

    def counting(gm, example_inputs):
        graphs.append(gm)
        return backend(gm, example_inputs)

    return counting, graphs


def _mlp(seed: int, dropout: float) -> nn.Sequential:
    """``make_mlp(seed)`` with a dropout layer before the output layer."""
    base = make_mlp(seed)
    return nn.Sequential(base[0], base[1], nn.Dropout(dropout), base[2])


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_model_with_dropout_trains_exactly_like_the_eager_model(data, backend):
    x, y = data
    batches = minibatch_indices(len(x), BATCH, 30, seed=1)
    dropout = 0.3  # the masks must repeat in the lookahead and match eager mode's

    eager = _mlp(0, dropout)
    torch.manual_seed(0)  # the dropout masks: both runs draw from the same generator state
    eager_infos = _train(eager, eager, batches, x, y, forward_only=False)

    model = _mlp(0, dropout)
    counting, graphs = _counting_backend(backend)
    compiled = torch.compile(model, backend=counting)
    torch.manual_seed(0)
    infos = _train(model, compiled, batches, x, y, forward_only=False)

    # One graph for all 60 closure calls: no graph break, and no recompilation when Newt's
    # lookahead call runs the compiled module a second time (with its buffer hook installed).
    assert len(graphs) == 1
    for info in infos:
        _assert_finite(info)
    assert full_batch_loss(model, x, y) < 0.5 * full_batch_loss(make_mlp(0), x, y)
    # Same initial weights, same batches, same masks: the compiled run must follow the eager run.
    # (Observed bit-identical; the tolerance leaves room for a backend's reordered float sums.
    # Different dropout masks, or a lookahead that used other masks than the first call, move the
    # parameters by O(1) within a few steps.)
    for p_compiled, p_eager in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-5, atol=1e-6)
    for info, ref in zip(infos, eager_infos):
        assert info.decision == ref.decision
        assert info.alpha_next == pytest.approx(ref.alpha_next, rel=1e-4)
        assert (info.f0, info.f1) == pytest.approx((ref.f0, ref.f1), rel=1e-5)


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(("strategy", "forward_only"), [("gen", None), ("gen-three-point", None)])
def test_a_forward_only_lookahead_of_a_compiled_model_trains_like_the_eager_one(data, strategy, forward_only):
    x, y = data
    batches = minibatch_indices(len(x), BATCH, 20, seed=1)
    eager = _mlp(0, 0.3)
    torch.manual_seed(0)
    eager_infos = _train(eager, eager, batches, x, y, strategy=strategy, forward_only=forward_only)
    model = _mlp(0, 0.3)
    counting, graphs = _counting_backend("aot_eager")
    torch.manual_seed(0)
    infos = _train(
        model, torch.compile(model, backend=counting), batches, x, y, strategy=strategy, forward_only=forward_only
    )
    # two graphs: the training one, and the one without autograd of the forward-only calls
    assert len(graphs) == 2
    for info, ref in zip(infos, eager_infos):
        assert info.decision == ref.decision
        assert (info.f0, info.f1, info.alpha_next) == pytest.approx((ref.f0, ref.f1, ref.alpha_next), rel=1e-4)


@pytest.mark.usefixtures("fresh_dynamo")
def test_gen_exact_on_a_compiled_model_says_what_to_change_and_moves_nothing(data):
    x, y = data
    model = make_mlp(0)
    compiled = torch.compile(model, backend="aot_eager")
    opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3), "gen-exact")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(compiled(x), y)
        loss.backward()
        return loss

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="gen-three-point"):
        opt.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert opt.step_info is None


@pytest.mark.usefixtures("fresh_dynamo")
@pytest.mark.parametrize(
    ("device", "backend"),
    [
        ("cpu", "aot_eager"),
        pytest.param("cuda", "aot_eager", marks=needs_cuda),
        # Triton kernels, whose dropout draws from the CUDA generator's seed and offset
        pytest.param("cuda", "inductor", marks=needs_cuda),
    ],
)
def test_lookahead_replays_the_dropout_masks_of_the_compiled_model(data, device, backend):
    """With a negligible step, the lookahead loss equals the first one only if the masks repeat."""
    x, y = (t.to(device) for t in data)
    idx = minibatch_indices(len(x), BATCH, 1, seed=2)[0]
    xb, yb = x[idx], y[idx]
    model = _mlp(0, dropout=0.5).to(device)
    compiled = torch.compile(model, backend=backend)
    # SGD at 1e-9: theta_{t+1} = theta_t up to ~1e-9, so f1 - f0 is ~1e-9 with the same masks.
    opt = Newt(torch.optim.SGD(model.parameters(), lr=1e-9))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(compiled(xb), yb)
        loss.backward()
        return loss

    # Control: two calls with fresh masks differ by far more than the tolerance below, so the
    # assertion on f1 - f0 can fail.
    with torch.no_grad():
        a = float(nn.functional.cross_entropy(compiled(xb), yb))
        b = float(nn.functional.cross_entropy(compiled(xb), yb))
    assert abs(a - b) > 1e-3

    for _ in range(5):
        opt.step(closure)
        info = opt.step_info
        assert not info.rejected
        assert abs(info.f1 - info.f0) < 1e-6, info


class _BatchNormNet(nn.Module):
    """A user-defined module: ``nn.Sequential(...).compile()`` is not traced at all by Dynamo in
    torch 2.13 (``Module._call_impl`` and ``Sequential.forward`` are both in its skip list), so a
    user class keeps the test about Newt."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        base = make_mlp(seed)
        self.fc1, self.bn, self.fc2 = base[0], nn.BatchNorm1d(32), base[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


@pytest.mark.usefixtures("fresh_dynamo")
def test_compiled_batchnorm_buffers_are_restored_after_the_lookahead(data):
    x, y = data
    batches = minibatch_indices(len(x), BATCH, 5, seed=5)
    eager = _BatchNormNet(0)
    _train(eager, eager, batches, x, y)
    model = _BatchNormNet(0)
    _train(model, torch.compile(model, backend="aot_eager"), batches, x, y)

    # The parameters agree (training-mode BatchNorm normalises with the batch's own statistics)...
    for p_compiled, p_eager in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-5, atol=1e-6)
    # ...and the buffers saw every batch once, although BatchNorm ran inside the compiled graph,
    # where its own forward hook never fires (Newt snapshots the called module's whole subtree).
    assert int(model.bn.num_batches_tracked) == int(eager.bn.num_batches_tracked) == len(batches)
    torch.testing.assert_close(model.bn.running_mean, eager.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, eager.bn.running_var)


# ---------------------------------------------------------------------------------- bf16


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains_and_adapts_a_bad_initial_rate(data, device):
    x, y = (t.to(device) for t in data)
    batches = minibatch_indices(len(x), BATCH, 50, seed=3)
    start = 1e-4  # far too small for Adam on this task: the rate must grow for the loss to fall
    model = make_mlp(0).to(device)
    opt_inner = torch.optim.Adam(model.parameters(), lr=start)
    infos = _train(model, model, batches, x, y, inner=opt_inner, autocast_dtype=torch.bfloat16, forward_only=False)
    reference = make_mlp(0).to(device)
    ref_infos = _train(
        reference,
        reference,
        batches[:1],
        x,
        y,
        inner=torch.optim.Adam(reference.parameters(), lr=start),
        forward_only=False,
    )

    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast keeps fp32 weights
    for info in infos:
        _assert_finite(info)
    # The first step's measurements match fp32's to bf16 accuracy (observed: 4e-4 relative): the
    # gradients through autocast are measured on the right scale, along the same step.
    first, ref = infos[0], ref_infos[0]
    assert first.d0 == pytest.approx(ref.d0, rel=2e-2)
    assert first.d1 == pytest.approx(ref.d1, rel=2e-2)
    assert first.f0 == pytest.approx(ref.f0, rel=1e-2)
    assert opt_inner.param_groups[0]["lr"] > 100 * start
    assert full_batch_loss(model, x, y) < 0.5 * full_batch_loss(make_mlp(0).to(device), x, y)


def _train_bf16_parameters(x, y, batches, strategy: str, fp32_loss: bool, forward_only: bool | None = False):
    """Train a bf16 copy of the MLP from a too-small rate; check each step's measured d1 in float64."""
    model = make_mlp(0).to(torch.bfloat16)
    params = list(model.parameters())
    opt = Newt(torch.optim.Adam(params, lr=1e-4), strategy=strategy, forward_only=forward_only)
    for idx in batches:
        xb, yb = x[idx], y[idx]

        def closure():
            opt.zero_grad()
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits.float() if fp32_loss else logits, yb)
            loss.backward()
            return loss

        theta_t = [p.detach().clone() for p in params]
        opt.step(closure)
        info = opt.step_info
        _assert_finite(info)
        assert all(p.dtype == torch.bfloat16 for p in params)
        if not info.rejected and forward_only is False:
            # d1 from the lookahead gradients Newt leaves in .grad, recomputed exactly in float64.
            # The kernels accumulate bf16 in fp32 (a result rounded to bf16 would carry up to
            # 2**-9 = 2e-3 relative error); theta_t - theta_{t+1} is still rounded to bf16 before
            # the upcast (observed: up to 3e-5 of |d0|), hence a tolerance of 2e-4 of |d0|.
            d1 = _dot([p.grad for p in params], theta_t, [p.detach() for p in params])
            assert info.d1 == pytest.approx(d1, abs=2e-4 * abs(info.d0))
    return model, opt


@pytest.mark.parametrize(("strategy", "fp32_loss"), [("taylor", True), ("retsinas", False)])
def test_bf16_parameters_train_and_adapt_the_rate(data, strategy, fp32_loss):
    x, y = data
    x = x.to(torch.bfloat16)
    batches = minibatch_indices(len(x), BATCH, 40, seed=6)
    model, opt = _train_bf16_parameters(x, y, batches, strategy, fp32_loss)
    assert opt.param_groups[0]["lr"] > 100 * 1e-4
    assert full_batch_loss(model, x, y) < 0.3 * full_batch_loss(make_mlp(0).to(torch.bfloat16), x, y)


@pytest.mark.parametrize("strategy", ["taylor", "gen"])
def test_bf16_loss_is_too_coarse_for_the_rules_which_then_read_the_slopes(data, strategy):
    """A bf16 loss (cross-entropy of bf16 logits) has a resolution of 2**-6 near 2.3, far coarser
    than the loss change of a step at rate 1e-4 (~1e-3), so f1 - f0 is rounding. Newt gives such
    steps to the rule's slope form (float32 dot products), and the rate grows. Without that, gen
    read f1 == f0 as a parabola with its minimum at alpha / 2 and took the rate to 7.6e-6."""
    x, y = data
    x = x.to(torch.bfloat16)
    batches = minibatch_indices(len(x), BATCH, 40, seed=6)
    model, opt = _train_bf16_parameters(x, y, batches, strategy, fp32_loss=False)
    assert opt.param_groups[0]["lr"] > 100 * 1e-4  # observed: taylor 0.117, gen 0.081
    assert full_batch_loss(model, x, y) < 0.3 * full_batch_loss(make_mlp(0).to(torch.bfloat16), x, y)


def test_bf16_loss_too_coarse_for_a_forward_only_lookahead_grows_the_rate(data):
    """The default forward-only lookahead measures no slope there: a step whose loss change is
    below the losses' rounding measured nothing, and the rate grows (decision "linear") until the
    losses see the steps."""
    x, y = data
    x = x.to(torch.bfloat16)
    batches = minibatch_indices(len(x), BATCH, 40, seed=6)
    model, opt = _train_bf16_parameters(x, y, batches, "gen", fp32_loss=False, forward_only=None)
    assert opt.param_groups[0]["lr"] > 100 * 1e-4
    assert full_batch_loss(model, x, y) < 0.3 * full_batch_loss(make_mlp(0).to(torch.bfloat16), x, y)


# ---------------------------------------------------------------------------------- fp16 + GradScaler


def _inner_state(opt: torch.optim.Optimizer) -> dict:
    return {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()} for k, s in opt.state.items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys()
        and all(torch.equal(torch.as_tensor(a[k][n]), torch.as_tensor(b[k][n])) for n in a[k])
        for k in a
    )


def _fp32_grads(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> list[torch.Tensor]:
    """The plain fp32 gradient (no autocast, no scaling), without touching ``model``'s ``.grad``."""
    with torch.enable_grad():
        loss = nn.functional.cross_entropy(model(xb), yb)
        return list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_grad_scaler_skips_overflows_and_unscales_the_measurements(data, device):
    x, y = (t.to(device) for t in data)
    batches = minibatch_indices(len(x), BATCH, 50, seed=4)
    model = make_mlp(0).to(device)
    params = list(model.parameters())
    # 2**24 times a logit gradient of ~1/64 is far beyond fp16's 65504: the first steps overflow.
    scaler = torch.amp.GradScaler(device, init_scale=2.0**24)
    inner = torch.optim.Adam(params, lr=1e-3)
    opt = Newt(inner, grad_scaler=scaler, forward_only=False)  # the lookahead's scaled gradient too
    overflows = accepted = inner_steps = 0
    for idx in batches:
        xb, yb = x[idx], y[idx]

        def closure():
            opt.zero_grad()
            with torch.autocast(device, dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(xb), yb)
            scaler.scale(loss).backward()
            return loss  # unscaled

        theta_t = [p.detach().clone() for p in params]
        state_before, lr_before, scale_before = _inner_state(inner), inner.param_groups[0]["lr"], scaler.get_scale()
        # The fp32 gradient at theta_t, for d0 (taken before the step moves the parameters).
        g0 = _fp32_grads(model, xb, yb)
        opt.step(closure)
        info = opt.step_info
        if info.decision == Decision.NONFINITE and info.rejected:
            # An fp16 overflow at theta_t: the inner step did not run and nothing moved.
            overflows += 1
            assert all(torch.equal(p, t) for p, t in zip(params, theta_t))
            assert _same_state(_inner_state(inner), state_before)
            assert inner.param_groups[0]["lr"] == lr_before == info.alpha == info.alpha_next
            assert math.isfinite(info.f0) and math.isnan(info.d0) and math.isnan(info.d1)
        else:
            # Accepted, or undone by the spike policy after the inner step ran: either way the
            # inner optimizer took exactly one step.
            inner_steps += 1
            assert inner.state[params[0]]["step"] == inner_steps
        scaler.update()
        if info.decision == Decision.NONFINITE and info.rejected:
            assert scaler.get_scale() == scale_before / 2  # the scaler, not Newt, reacts
        if not info.rejected:
            accepted += 1
            _assert_finite(info)
            # d0 and d1 against fp32 gradients without autocast or scaling. Forgetting to unscale
            # (or unscaling twice) is off by the scale, >= 2**18 here; fp16 rounding is ~1e-3.
            # The tolerance is relative to the sum of the terms' magnitudes, not to the dot
            # product itself: d1 crosses zero once the rate is adapted, and cancels.
            g1 = _fp32_grads(model, xb, yb)
            after = [p.detach() for p in params]
            assert info.d0 == pytest.approx(_dot(g0, theta_t, after), abs=2e-2 * _dot_magnitude(g0, theta_t, after))
            assert info.d1 == pytest.approx(_dot(g1, theta_t, after), abs=2e-2 * _dot_magnitude(g1, theta_t, after))
            # The .grad left after the step are the lookahead's, still multiplied by the scale. Newt
            # sums in float32, this reference in float64: the bound is float32 rounding of the terms'
            # magnitudes (a missed unscale would be off by the scale, >= 2**18).
            lookahead_grads = [p.grad for p in params]
            scaled = _dot(lookahead_grads, theta_t, after) / scale_before
            magnitude = _dot_magnitude(lookahead_grads, theta_t, after) / scale_before
            assert info.d1 == pytest.approx(scaled, rel=1e-5, abs=1e-6 * magnitude)

    assert overflows >= 3  # 2**24 -> at most 2**21 takes at least three halvings
    assert scaler.get_scale() < 2.0**24
    assert accepted >= 35
    assert inner.param_groups[0]["lr"] != 1e-3  # the accepted steps adapted the rate
    assert full_batch_loss(model, x, y) < 0.5 * full_batch_loss(make_mlp(0).to(device), x, y)


def test_grad_scaler_must_be_a_grad_scaler():
    inner = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(TypeError, match="GradScaler"):
        Newt(inner, grad_scaler=object())


# ---------------------------------------------------------------------------------- accumulation

MICRO = 4


def _float64_model() -> nn.Sequential:
    return make_mlp(0).double()


def test_accumulating_micro_batches_in_the_closure_equals_one_big_batch(data):
    x, y = data
    x = x.double()
    batches = minibatch_indices(len(x), BATCH, 12, seed=7)

    def run(micro: int):
        model = _float64_model()
        opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3))
        infos = []
        for idx in batches:

            def closure():
                opt.zero_grad()  # once: the micro-batches' gradients add up
                total = 0.0
                for chunk in idx.chunk(micro):
                    loss = nn.functional.cross_entropy(model(x[chunk]), y[chunk])
                    (loss / micro).backward()  # equal chunks: the mean of means is the mean
                    total += float(loss.detach()) / micro
                return total

            opt.step(closure)
            infos.append(opt.step_info)
        return model, infos

    big, big_infos = run(1)
    accumulated, infos = run(MICRO)
    for info, ref in zip(infos, big_infos):
        _assert_finite(info)
        assert info.decision == ref.decision
        for name in ("f0", "f1", "d0", "d1", "alpha", "alpha_next"):
            assert getattr(info, name) == pytest.approx(getattr(ref, name), rel=1e-9, abs=1e-12), name
    for p, q in zip(accumulated.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert big_infos[-1].alpha_next != big_infos[0].alpha  # the rate did adapt along the way


def test_accumulating_micro_batches_before_a_closure_free_step_equals_one_big_batch(data):
    x, y = data
    x = x.double()
    batches = minibatch_indices(len(x), BATCH, 12, seed=8)

    def run(micro: int):
        model = _float64_model()
        opt = Newt(torch.optim.Adam(model.parameters(), lr=1e-3), strategy="retsinas")
        infos = []
        for idx in batches:
            opt.zero_grad()
            for chunk in idx.chunk(micro):
                (nn.functional.cross_entropy(model(x[chunk]), y[chunk]) / micro).backward()
            opt.step()  # closure-free: d1 comes from the next step's accumulated gradient
            infos.append(opt.step_info)
        return model, infos

    big, big_infos = run(1)
    accumulated, infos = run(MICRO)
    adapted = 0
    for info, ref in zip(infos, big_infos):
        assert info.decision == ref.decision
        if ref.decision != Decision.PLAIN:
            adapted += 1
            for name in ("d0", "d1", "alpha", "alpha_next"):
                assert getattr(info, name) == pytest.approx(getattr(ref, name), rel=1e-9, abs=1e-12), name
    assert adapted == len(batches) - 1  # every step but the first closes a measurement
    for p, q in zip(accumulated.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
