"""The tensor kernels: multi-tensor and per-tensor paths against a float64 reference loop."""

from __future__ import annotations

import math

import pytest
import torch

from newt import _kernels
from tests.reference import per_tensor_step_dot

SHAPES = [(3, 4), (7,), (2, 3, 5), (1,), (0,), (64, 33)]


def _tensors(dtype, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    make = lambda s: torch.randn(s, generator=gen, dtype=torch.float32).to(dtype)  # noqa: E731
    grads = [make(s) for s in shapes]
    before = [make(s) for s in shapes]
    after = [b - 1e-2 * make(s) for b, s in zip(before, shapes)]
    return grads, before, after


def _tolerance(grads, before, after, unit_roundoff):
    """Float32 dot products err by ~unit roundoff times the sum of |products|, not of the result."""
    magnitude = sum(
        float((g.double() * (b.double() - a.double())).abs().sum())
        for g, b, a in zip(grads, before, after)
        if g is not None
    )
    return 16 * unit_roundoff * magnitude


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_dot_matches_float64_reference(foreach, dtype):
    grads, before, after = _tensors(dtype)
    got = _kernels.step_dot(grads, before, after, foreach=foreach)
    assert got.dtype == torch.float64
    tol = _tolerance(grads, before, after, torch.finfo(dtype).eps)
    assert float(got) == pytest.approx(per_tensor_step_dot(grads, before, after), rel=0, abs=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dot_is_accumulated_in_float32(dtype):
    # Summing thousands of products in bf16 would lose most digits; in float32 it does not.
    grads, before, after = _tensors(dtype, shapes=[(4096,), (300, 7)])
    expected = per_tensor_step_dot(grads, before, after)
    for foreach in (True, False):
        got = float(_kernels.step_dot(grads, before, after, foreach=foreach))
        assert got == pytest.approx(expected, rel=1e-3)


def test_foreach_and_per_tensor_paths_agree_and_skip_missing_gradients():
    grads, before, after = _tensors(torch.float32, seed=3)
    grads[1] = None
    expected = per_tensor_step_dot(grads, before, after)
    fast = float(_kernels.step_dot(grads, before, after, foreach=True))
    slow = float(_kernels.step_dot(grads, before, after, foreach=False))
    tol = _tolerance(grads, before, after, torch.finfo(torch.float32).eps)
    assert fast == pytest.approx(slow, rel=0, abs=tol) and fast == pytest.approx(expected, rel=0, abs=tol)


def test_bucketing_does_not_change_the_result(monkeypatch):
    grads, before, after = _tensors(torch.float64, seed=4)
    whole = float(_kernels.step_dot(grads, before, after))
    monkeypatch.setattr(_kernels, "_BUCKET_NUMEL", 10)  # forces many buckets, some of one tensor
    assert float(_kernels.step_dot(grads, before, after)) == pytest.approx(whole, rel=1e-12)


def test_single_bucket_shortcut_gives_the_bits_of_the_general_path():
    # One dtype on one device skips the grouping; a float64 tensor with a zero gradient sends the
    # same float32 tensors through the general path, adding exactly 0 to their partial sum.
    grads, before, after = _tensors(torch.float32, seed=6)
    shortcut = _kernels.step_dot(grads, before, after)
    zero = [torch.zeros(5, dtype=torch.float64)]
    other = [torch.randn(5, dtype=torch.float64)]
    general = _kernels.step_dot(grads + zero, before + other, after + [other[0] - 1.0])
    assert float(general) == float(shortcut)


def test_complex_tensors_use_the_real_inner_product():
    gen = torch.Generator().manual_seed(5)
    g = [torch.randn(6, dtype=torch.complex64, generator=gen)]
    b = [torch.randn(6, dtype=torch.complex64, generator=gen)]
    a = [torch.randn(6, dtype=torch.complex64, generator=gen)]
    expected = float((g[0].conj() * (b[0] - a[0])).real.double().sum())
    for foreach in (True, False):
        assert float(_kernels.step_dot(g, b, a, foreach=foreach)) == pytest.approx(expected, rel=1e-5)


def test_empty_or_gradient_free_lists_give_zero():
    p = [torch.ones(3)]
    assert float(_kernels.step_dot([None], p, p)) == 0.0


def test_snapshot_copy_is_bit_exact_and_reused_only_when_it_fits():
    params = [torch.randn(3, 2), torch.randn(5, dtype=torch.float64)]
    snap = _kernels.new_snapshot(params)
    for foreach in (True, False):
        _kernels.copy_(snap, params, foreach=foreach)
        assert all(torch.equal(s, p) for s, p in zip(snap, params))
    assert _kernels.snapshot_fits(snap, params)
    assert not _kernels.snapshot_fits(snap, params[:1])
    assert not _kernels.snapshot_fits(snap, [params[0], params[1].float()])
    assert not _kernels.snapshot_fits(None, params)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    ("bad_value", "dtype", "expected"),
    [
        (None, torch.float32, True),
        (math.nan, torch.float32, False),
        (math.inf, torch.float32, False),
        (-math.inf, torch.bfloat16, False),
        (3e38, torch.float32, True),  # large but finite: a sum of squares would overflow here
        (1e300, torch.float64, True),
        (complex(0.0, math.nan), torch.complex64, False),
    ],
)
def test_all_finite_flags_any_nan_or_infinity_in_any_tensor(foreach, bad_value, dtype, expected):
    tensors = [torch.ones(s, dtype=dtype) for s in [(3, 4), (0,), (5,), (2, 2)]]
    if bad_value is not None:
        tensors[2][3] = bad_value
    assert bool(_kernels.all_finite(tensors, foreach=foreach)) is expected
    assert bool(_kernels.all_finite([], foreach=foreach)) is True
    assert bool(_kernels.all_finite([torch.ones(0, dtype=dtype)], foreach=foreach)) is True


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(
    ("value", "expected"), [(None, False), (1e-45, True), (-3.0, True), (math.nan, True), (-0.0, False)]
)
def test_any_nonzero_finds_a_single_nonzero_element(foreach, value, expected):
    tensors = [torch.zeros(s) for s in [(3, 4), (0,), (5,)]]
    if value is not None:
        tensors[2][4] = value
    assert _kernels.any_nonzero(tensors, foreach=foreach) is expected
    assert _kernels.any_nonzero([], foreach=foreach) is False
