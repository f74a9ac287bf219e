"""The fast chunked op against its naive quadratic twin, plain softmax attention, and invariances: the paper's
signed Chebyshev fit (``kernel="chebyshev"``, any degree; the non-negative kernels, the ops' default, have
their own grid in test_squared_kernel.py)."""

from __future__ import annotations

import dataclasses
import functools
import json
import random

import pytest
import torch
import torch.nn.functional as F

from sb_hf.config import SupportBasisConfig
from sb_hf.ops import as23_attention, large_rows, reference, support_basis_attention
from sb_hf.ops import support_basis_attention as ops_support_basis_attention
from sb_hf.ops.checks import all_finite
from sb_hf.ops.masking import visible_key_sums

F64 = torch.float64
INF = float("inf")

TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}


# --------------------------------------------------------------------------- helpers


def make_qkv(
    batch=2, q_heads=4, kv_heads=2, q_len=37, kv_len=None, head_dim=8, value_dim=None, dtype=F64, seed=0, scale=1.0
):
    """Random q, k, v drawn in float64 (so every dtype sees the same numbers), then cast."""
    kv_len = q_len if kv_len is None else kv_len
    value_dim = head_dim if value_dim is None else value_dim
    gen = torch.Generator().manual_seed(seed)
    q = scale * torch.randn(batch, q_heads, q_len, head_dim, dtype=F64, generator=gen)
    k = scale * torch.randn(batch, kv_heads, kv_len, head_dim, dtype=F64, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, value_dim, dtype=F64, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def padding_mask(batch, kv_len, kind, pad=5):
    """None, or a (batch, kv_len) bool mask where the last batch row has ``pad`` padded keys on one side.
    With batch >= 3 the middle rows get a different amount of padding."""
    if kind is None:
        return None
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    for b in range(1, batch):
        n = min(pad * b, kv_len - 1)
        if kind == "left":
            mask[b, :n] = False
        elif kind == "right":
            mask[b, kv_len - n :] = False
        else:
            raise AssertionError(kind)
    return mask


def dense_visibility(q_len, kv_len, *, causal, sliding_window=None, key_padding_mask=None, batch=1):
    """(batch, q_len, kv_len) visibility from explicit position arithmetic (independent of sb_hf.ops.masking.visible):
    query i sits at key position kv_len - q_len + i; causal: j <= p; window: j > p - window; padding: real keys only."""
    p = (torch.arange(q_len) + (kv_len - q_len))[:, None]
    j = torch.arange(kv_len)[None, :]
    out = torch.ones(q_len, kv_len, dtype=torch.bool)
    if causal:
        out = j <= p
        if sliding_window is not None:
            out = out & (j > p - sliding_window)
    out = out[None].expand(batch, q_len, kv_len).clone()
    if key_padding_mask is not None:
        out &= key_padding_mask[:, None, :]
    return out


def sdpa(q, k, v, *, mask=None, is_causal=False, scale=None):
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    if mask is not None:
        mask = mask[:, None]  # (B, 1, Lq, Lk)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def assert_matches(a, b, dtype):
    torch.testing.assert_close(a.to(F64), b.to(F64), **TOLERANCES[dtype])


def gradients(fn, q, k, v, weights, **kwargs):
    """Gradients of ``sum(fn(q, k, v, **kwargs) * weights)`` with respect to q, k and v."""
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    return torch.autograd.grad((fn(*inputs, **kwargs) * weights).sum(), inputs)


def with_evaluations(cases):
    """``(case, evaluation)`` params: both forms, only the feature form for sketched cases (a sketched
    kernel has no score form)."""
    return [pytest.param(c.values[0], e, id=f"{c.id}-{e}") for c in cases for e in ("features", "scores")
            if e == "features" or c.values[0]["sketch_dim"] is None]


# --------------------------------------------------------------------------- fast vs reference grid


def _case(name, marks=(), **kw):
    base = dict(
        batch=2, q_heads=4, kv_heads=2, q_len=37, kv_len=None, head_dim=8, dtype=F64,
        causal=True, threshold=2.0, degree=2, chunk_size=16, padding=None, sliding_window=None, seed=0, radius=None,
        kernel="chebyshev",
    )
    base.update(kw)
    return pytest.param(base, id=name, marks=marks)


CASES = []
# causal / non-causal x threshold regime (none large, some large, all large) x degree
for causal in (True, False):
    for threshold in (INF, 1.5, 2.0, 0.0):
        for degree in (1, 2, 3):
            CASES.append(_case(f"causal{causal}-thr{threshold}-deg{degree}", causal=causal, threshold=threshold, degree=degree))
# lengths that are not multiples of the chunk size, and length 1
for causal in (True, False):
    for chunk in (8, 16, 64):
        for length in (37, 1):
            CASES.append(_case(f"len{length}-chunk{chunk}-causal{causal}", causal=causal, chunk_size=chunk, q_len=length, seed=1))
CASES.append(_case("chunk1", chunk_size=1, q_len=11))
# GQA and MHA
for heads in ((4, 2), (6, 2), (3, 3), (1, 1), (4, 1)):
    for causal in (True, False):
        CASES.append(_case(f"heads{heads[0]}x{heads[1]}-causal{causal}", q_heads=heads[0], kv_heads=heads[1], causal=causal, seed=2))
# padding, left and right, causal and not, with several thresholds
for pad in ("left", "right"):
    for causal in (True, False):
        for threshold in (INF, 2.0, 0.0):
            CASES.append(
                _case(f"pad{pad}-causal{causal}-thr{threshold}", batch=3, padding=pad, causal=causal, threshold=threshold, seed=3)
            )
# sliding windows: 1, smaller than a chunk, one chunk, smaller than / equal to / larger than the sequence
for window in (1, 5, 8, 16, 20, 36, 37, 100):
    for chunk in (8, 16):
        for pad in (None, "left"):
            CASES.append(
                _case(f"window{window}-chunk{chunk}-pad{pad}", sliding_window=window, chunk_size=chunk, padding=pad, batch=3, seed=4)
            )
CASES.append(_case("window5-thrinf-deg3", sliding_window=5, threshold=INF, degree=3, chunk_size=8))
CASES.append(_case("window5-thr0", sliding_window=5, threshold=0.0, chunk_size=8))
# decoding shapes: q_len 1 and 5 against kv_len 37
for q_len in (1, 5):
    for window in (None, 7):
        for pad in (None, "left", "right"):
            for chunk in (8, 64):
                CASES.append(
                    _case(
                        f"decode{q_len}-window{window}-pad{pad}-chunk{chunk}",
                        q_len=q_len, kv_len=37, sliding_window=window, padding=pad, chunk_size=chunk, batch=3, seed=5,
                    )
                )
# every row exact (plain SDPA path) with the queries after the first key and with a window
for window in (None, 7):
    CASES.append(_case(f"decode5-window{window}-thr0", q_len=5, kv_len=37, sliding_window=window, threshold=0.0, batch=3, seed=5))
# non-causal with q_len != kv_len (both ways)
CASES.append(_case("noncausal-q5-kv37", causal=False, q_len=5, kv_len=37, padding="right", seed=6))
# non-causal with more queries than keys (q_len = kv_len + 1 would broadcast by accident: avoid it)
CASES.append(_case("noncausal-q50-kv37", causal=False, q_len=50, kv_len=37, padding="left", seed=6))
CASES.append(_case("noncausal-q39-kv37", causal=False, q_len=39, kv_len=37, seed=6))
CASES.append(_case("noncausal-q38-kv37", causal=False, q_len=38, kv_len=37, seed=6))  # a slice of length 1 broadcasts
CASES.append(_case("noncausal-q37-kv5-fixed-radius", causal=False, q_len=37, kv_len=5, radius=4.0, seed=6))
for causal in (True, False):
    for pad in (None, "left"):
        CASES.append(_case(f"fixed-radius-causal{causal}-pad{pad}", causal=causal, radius=5.0, padding=pad, batch=3, degree=3, seed=6))
# degree 0 and higher degrees
for degree in (0, 4):
    CASES.append(_case(f"deg{degree}", degree=degree, chunk_size=8))
# other head dims
CASES.append(_case("head_dim1", head_dim=1, threshold=1.0, degree=3, chunk_size=8))
CASES.append(_case("head_dim3", head_dim=3, threshold=1.5, degree=3, chunk_size=8))
# float32, bfloat16, float16
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    name = str(dtype).split(".")[-1]
    for causal in (True, False):
        for threshold in (INF, 2.0, 0.0):
            CASES.append(_case(f"{name}-causal{causal}-thr{threshold}", dtype=dtype, causal=causal, threshold=threshold, seed=7))
    CASES.append(_case(f"{name}-gqa6x2-window5-leftpad", dtype=dtype, q_heads=6, kv_heads=2, sliding_window=5, padding="left", batch=3, chunk_size=8, seed=8))
    CASES.append(_case(f"{name}-decode5-window7-rightpad", dtype=dtype, q_len=5, kv_len=37, sliding_window=7, padding="right", batch=3, chunk_size=8, seed=9))
    CASES.append(_case(f"{name}-deg3-chunk64", dtype=dtype, degree=3, chunk_size=64, seed=10))


def _run_case(case, fast_fn, ref_fn, with_threshold=True, evaluation="features"):
    c = dict(case)
    q, k, v = make_qkv(
        batch=c["batch"], q_heads=c["q_heads"], kv_heads=c["kv_heads"], q_len=c["q_len"], kv_len=c["kv_len"],
        head_dim=c["head_dim"], dtype=c["dtype"], seed=c["seed"],
    )
    kwargs = dict(
        degree=c["degree"], causal=c["causal"], sliding_window=c["sliding_window"], radius=c["radius"],
        key_padding_mask=padding_mask(c["batch"], k.shape[2], c["padding"]), kernel=c["kernel"],
    )
    if with_threshold:
        kwargs["threshold"] = c["threshold"]
    out = fast_fn(q, k, v, chunk_size=c["chunk_size"], evaluation=evaluation, **kwargs)
    expected = ref_fn(q, k, v, **kwargs)
    return q, k, v, out, expected


@pytest.mark.parametrize("evaluation", ["features", "scores"])
@pytest.mark.parametrize("case", CASES)
def test_fast_matches_reference(case, evaluation):
    q, k, v, out, expected = _run_case(
        case, support_basis_attention, reference.support_basis_attention, evaluation=evaluation
    )
    assert out.dtype == q.dtype
    assert expected.dtype == q.dtype
    assert out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    assert torch.isfinite(out).all()
    assert_matches(out, expected, q.dtype)


@pytest.mark.parametrize(
    "case",
    [
        _case("causal", threshold=None),
        _case("noncausal", causal=False, threshold=None),
        _case("gqa6x2-leftpad-window5", q_heads=6, kv_heads=2, padding="left", sliding_window=5, batch=3, chunk_size=8),
        _case("decode1", q_len=1, kv_len=37, padding="right", batch=3),
        _case("deg3-len1", degree=3, q_len=1),
        _case("float32", dtype=torch.float32, degree=3, chunk_size=8),
        _case("bfloat16", dtype=torch.bfloat16, chunk_size=8),
    ],
)
@pytest.mark.parametrize("evaluation", ["features", "scores"])
def test_as23_matches_reference(case, evaluation):
    q, k, v, out, expected = _run_case(
        case, as23_attention, reference.as23_attention, with_threshold=False, evaluation=evaluation
    )
    assert out.dtype == q.dtype
    assert_matches(out, expected, q.dtype)
    # AS23 is support-basis attention with no large rows
    kw = dict(degree=case["degree"], causal=case["causal"], sliding_window=case["sliding_window"],
              key_padding_mask=padding_mask(case["batch"], k.shape[2], case["padding"]), chunk_size=case["chunk_size"],
              kernel=case["kernel"])
    assert_matches(out, support_basis_attention(q, k, v, threshold=INF, **kw), q.dtype)


def test_threshold_regimes_are_what_the_grid_claims():
    """For the grid inputs (randn, head_dim 8) threshold 1.5 / 2.0 give a genuine mix of large and small rows."""
    q, k, _ = make_qkv(seed=0)
    for threshold in (1.5, 2.0):
        for x in (q, k):
            fraction = large_rows(x, threshold).double().mean().item()
            assert 0.1 < fraction < 0.9
    assert not large_rows(q, INF).any()
    assert large_rows(q, 0.0).all()
    # large_rows definition, independently: any |entry| > threshold
    assert torch.equal(large_rows(q, 2.0), (q.abs() > 2.0).any(-1))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_all_finite_matches_isfinite(dtype):
    """The one-pass finiteness check (aminmax) against ``isfinite().all()``: NaN, +inf and -inf anywhere, per row too."""
    x = torch.randn(3, 5, 7, dtype=F64).to(dtype)
    assert bool(all_finite(x)) and torch.equal(all_finite(x, dim=-1), torch.isfinite(x).all(dim=-1))
    for value, where in ((float("nan"), (0, 0, 0)), (float("inf"), (1, 4, 6)), (float("-inf"), (2, 3, 2))):
        y = x.clone()
        y[where] = value
        assert not bool(all_finite(y))
        assert torch.equal(all_finite(y, dim=-1), torch.isfinite(y).all(dim=-1))
    assert bool(all_finite(x[:, :0])) and all_finite(x[:, :, :0], dim=-1).all()


@pytest.mark.parametrize("offset", [0, 4, 10])
@pytest.mark.parametrize("window", [None, 1, 3, 20])
def test_visible_key_sums_matches_loop(offset, window):
    """Sums over each causal query's visible keys by prefix sums, against a loop over the keys."""
    x = torch.randn(2, 3, 11, 4, 2, dtype=F64)
    got = visible_key_sums(x, offset, window)
    for p in range(offset, 11):
        lo = 0 if window is None else max(p - window + 1, 0)
        assert torch.allclose(got[:, :, p - offset], x[:, :, lo : p + 1].sum(dim=2))
    flags = x[..., 0, 0] > 0  # (B, H, Lk), the shape of key counts
    counts = visible_key_sums(flags.double(), offset, window)
    assert torch.equal(counts[:, :, -1], flags[:, :, (0 if window is None else max(11 - window, 0)):].sum(dim=-1).double())


def test_polynomial_part_is_an_approximation_not_exact():
    """Guard against a vacuous grid: with threshold inf the result differs from exact softmax attention
    (the polynomial part is really used), and converges to it as the degree grows."""
    q, k, v = make_qkv(seed=11)
    exact = reference.exact_attention(q, k, v)
    errors = {d: (support_basis_attention(q, k, v, threshold=INF, degree=d, kernel="chebyshev") - exact).abs() for d in (1, 8, 12)}
    assert errors[1].mean() > 1e-2
    assert errors[8].mean() < 1e-2
    assert errors[12].mean() < 1e-4
    assert errors[12].max() < 1e-2


def test_value_dim_different_from_head_dim():
    q, k, v = make_qkv(head_dim=8, value_dim=5, seed=12)
    for causal in (True, False):
        out = support_basis_attention(q, k, v, threshold=2.0, degree=2, causal=causal, chunk_size=8)
        assert out.shape == (2, 4, 37, 5)
        assert_matches(out, reference.support_basis_attention(q, k, v, threshold=2.0, degree=2, causal=causal), F64)
    # with an exact band (the fused CPU kernel wants values as wide as the keys: such bands take the plain path)
    kw = dict(threshold=2.0, degree=2, sinks=2, local_window=9)
    assert_matches(support_basis_attention(q, k, v, chunk_size=4, **kw), reference.support_basis_attention(q, k, v, **kw), F64)


def test_explicit_scale_and_fixed_radius():
    q, k, v = make_qkv(seed=13)
    mask = padding_mask(2, 37, "left")
    for kw in (dict(scale=0.7), dict(radius=3.0), dict(radius=0.5, scale=0.2), dict(radius=6.0, sliding_window=6)):
        out = support_basis_attention(q, k, v, threshold=2.0, degree=3, key_padding_mask=mask, chunk_size=8, kernel="chebyshev", **kw)
        expected = reference.support_basis_attention(q, k, v, threshold=2.0, degree=3, key_padding_mask=mask, kernel="chebyshev", **kw)
        assert_matches(out, expected, F64)
    # an explicit scale equal to the default gives the default result; a different one changes it
    default = support_basis_attention(q, k, v, threshold=2.0, degree=2)
    assert_matches(support_basis_attention(q, k, v, threshold=2.0, degree=2, scale=8**-0.5), default, F64)
    assert (support_basis_attention(q, k, v, threshold=2.0, degree=2, scale=0.9) - default).abs().max() > 1e-3


def test_non_contiguous_inputs():
    """Transformers hands over (B, L, H, d).transpose(1, 2): non-contiguous views."""
    q, k, v = make_qkv(seed=14)
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    out = support_basis_attention(qt, kt, vt, threshold=2.0, degree=2, chunk_size=8)
    assert_matches(out, reference.support_basis_attention(q, k, v, threshold=2.0, degree=2), F64)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("evaluation", ["features", "scores"])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("threshold", [2.0, INF])
def test_gradients_match_reference(sliding_window, threshold, evaluation):
    q, k, v = make_qkv(batch=3, q_heads=4, kv_heads=2, q_len=29, seed=20)
    mask = padding_mask(3, 29, "left", pad=4)
    weights = torch.randn(3, 4, 29, 8, dtype=F64, generator=torch.Generator().manual_seed(21))
    kw = dict(threshold=threshold, degree=2, causal=True, key_padding_mask=mask, sliding_window=sliding_window)
    fast = gradients(support_basis_attention, q, k, v, weights, chunk_size=8, evaluation=evaluation, **kw)
    for g_fast, g_ref in zip(fast, gradients(reference.support_basis_attention, q, k, v, weights, **kw)):
        assert torch.isfinite(g_fast).all()
        assert g_fast.abs().max() > 0
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("evaluation", ["features", "scores"])
def test_gradients_non_causal_match_reference(evaluation):
    q, k, v = make_qkv(batch=2, q_heads=6, kv_heads=2, q_len=13, kv_len=21, seed=22)
    mask = padding_mask(2, 21, "right", pad=3)
    weights = torch.randn(2, 6, 13, 8, dtype=F64, generator=torch.Generator().manual_seed(23))
    kw = dict(threshold=1.5, degree=3, causal=False, key_padding_mask=mask, kernel="chebyshev")
    fast = gradients(support_basis_attention, q, k, v, weights, evaluation=evaluation, chunk_size=5, **kw)
    for g_fast, g_ref in zip(fast, gradients(reference.support_basis_attention, q, k, v, weights, **kw)):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-8)


def test_gradients_threshold_zero_match_softmax():
    q, k, v = make_qkv(batch=1, q_heads=4, kv_heads=2, q_len=19, seed=24)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = support_basis_attention(*inputs, threshold=0.0, degree=2)
    g_fast = torch.autograd.grad(out.pow(2).sum(), inputs)
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    out = sdpa(*inputs, is_causal=True)
    g_sdpa = torch.autograd.grad(out.pow(2).sum(), inputs)
    for a, b in zip(g_fast, g_sdpa):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- threshold 0 == softmax attention


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 2)])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_threshold_zero_is_softmax_square(heads, dtype):
    q, k, v = make_qkv(q_heads=heads[0], kv_heads=heads[1], dtype=dtype, seed=30)
    tol = TOLERANCES[dtype]
    for causal in (True, False):
        out = support_basis_attention(q, k, v, threshold=0.0, degree=2, causal=causal, chunk_size=8)
        torch.testing.assert_close(out, sdpa(q, k, v, is_causal=causal), **tol)
        torch.testing.assert_close(out, reference.exact_attention(q, k, v, causal=causal), **tol)


@pytest.mark.parametrize(
    "q_len,kv_len,causal,window,pad",
    [
        (5, 37, True, None, None),  # bottom-right aligned decoding
        (1, 37, True, None, "right"),
        (37, 37, True, 6, None),
        (37, 37, True, 1, "right"),
        (5, 37, True, 7, "right"),
        (37, 37, False, None, "right"),
        (37, 37, False, None, "left"),
        (9, 37, False, None, "left"),
    ],
)
def test_threshold_zero_is_softmax_masked(q_len, kv_len, causal, window, pad):
    q, k, v = make_qkv(batch=3, q_len=q_len, kv_len=kv_len, seed=31)
    key_padding_mask = padding_mask(3, kv_len, pad)
    kw = dict(causal=causal, sliding_window=window, key_padding_mask=key_padding_mask)
    out = support_basis_attention(q, k, v, threshold=0.0, degree=2, chunk_size=8, **kw)
    mask = dense_visibility(q_len, kv_len, causal=causal, sliding_window=window, key_padding_mask=key_padding_mask, batch=3)
    seen = mask.any(-1)[:, None, :].expand(-1, q.shape[1], -1)  # (B, Hq, Lq): the query sees at least one key
    assert seen.any()
    # SDPA gives NaN on rows without any visible key: open those rows to every key, then compare the others
    expected = sdpa(q, k, v, mask=mask | ~mask.any(-1, keepdim=True))
    torch.testing.assert_close(out[seen], expected[seen], rtol=1e-10, atol=1e-10)
    assert torch.equal(out[~seen], torch.zeros_like(out[~seen]))  # the package's convention: no visible key -> 0
    torch.testing.assert_close(out, reference.exact_attention(q, k, v, **kw), rtol=1e-10, atol=1e-10)


def test_threshold_zero_left_padding_fully_masked_rows_are_zero():
    q, k, v = make_qkv(batch=2, seed=32)
    mask = padding_mask(2, 37, "left", pad=6)
    out = support_basis_attention(q, k, v, threshold=0.0, degree=2, key_padding_mask=mask)
    torch.testing.assert_close(out, reference.exact_attention(q, k, v, key_padding_mask=mask), rtol=1e-10, atol=1e-10)
    assert torch.equal(out[1, :, :6], torch.zeros_like(out[1, :, :6]))
    vis = dense_visibility(37, 37, causal=True, key_padding_mask=mask, batch=2)
    real = vis.any(-1)  # (B, L)
    expected = sdpa(q, k, v, mask=vis | ~real[:, :, None])  # give the empty rows something to avoid NaN
    torch.testing.assert_close(out[real[:, None].expand_as(out[..., 0])], expected[real[:, None].expand_as(out[..., 0])])


# --------------------------------------------------------------------------- stats


@pytest.mark.parametrize(
    "q_len,kv_len,causal,window,pad",
    [
        (37, 37, True, None, None),
        (37, 37, True, None, "left"),
        (37, 37, True, 5, "left"),
        (37, 37, True, 1, None),
        (5, 37, True, 7, "right"),
        (37, 37, False, None, "right"),
        (9, 37, False, None, None),
    ],
)
def test_stats_counts(q_len, kv_len, causal, window, pad):
    batch, q_heads, kv_heads = 3, 4, 2
    q, k, v = make_qkv(batch=batch, q_heads=q_heads, kv_heads=kv_heads, q_len=q_len, kv_len=kv_len, seed=40)
    key_padding_mask = padding_mask(batch, kv_len, pad)
    kw = dict(causal=causal, sliding_window=window, key_padding_mask=key_padding_mask, degree=2, chunk_size=8)
    vis = dense_visibility(q_len, kv_len, causal=causal, sliding_window=window, key_padding_mask=key_padding_mask, batch=batch)
    pairs = int(vis.sum()) * q_heads
    if causal and q_len == kv_len and window is None and pad is None:
        assert pairs == kv_len * (kv_len + 1) // 2 * q_heads * batch
    rows = batch * q_heads * q_len

    stats = {}
    support_basis_attention(q, k, v, threshold=0.0, stats=stats, **kw)
    assert int(stats["pairs"]) == pairs
    assert int(stats["exact_pairs"]) == pairs
    assert int(stats["rows"]) == rows
    assert int(stats["exact_rows"]) == rows

    stats = {}
    support_basis_attention(q, k, v, threshold=INF, stats=stats, **kw)
    assert int(stats["pairs"]) == pairs and int(stats["rows"]) == rows
    assert 0 <= int(stats["exact_pairs"]) <= pairs
    assert 0 <= int(stats["exact_rows"]) <= rows
    if int(stats["exact_rows"]) == 0:
        assert int(stats["exact_pairs"]) == 0

    # a finite threshold: large query rows are exact on every visible key, small ones only on large real keys.
    # Rows can additionally be recomputed exactly when their approximate mass is not positive (suspect rows,
    # e.g. rows without any visible key), so at degree 2 these counts are lower bounds ...
    groups = q_heads // kv_heads
    q_large = (q.abs() > 2.0).any(-1)  # (B, Hq, Lq)
    k_large = (k.abs() > 2.0).any(-1).repeat_interleave(groups, dim=1)  # (B, Hq, Lk)
    empty = ~vis.any(-1)[:, None, :].expand_as(q_large)  # (B, Hq, Lq) rows that see no key at all
    per_pair = vis[:, None] & (q_large[..., :, None] | k_large[..., None, :])
    stats = {}
    support_basis_attention(q, k, v, threshold=2.0, stats=stats, **kw)
    assert int(stats["pairs"]) == pairs
    assert int(stats["exact_rows"]) >= int((q_large | empty).sum())
    assert int(per_pair.sum()) <= int(stats["exact_pairs"]) < pairs
    # ... while at degree 0 the polynomial is a positive constant, so exactly the large rows (and empty rows) are exact
    for threshold in (2.0, INF):
        stats = {}
        support_basis_attention(q, k, v, threshold=threshold, stats=stats, **{**kw, "degree": 0})
        q_large = (q.abs() > threshold).any(-1)
        k_large = (k.abs() > threshold).any(-1).repeat_interleave(groups, dim=1)
        per_pair = vis[:, None] & (q_large[..., :, None] | k_large[..., None, :])
        assert int(stats["exact_rows"]) == int((q_large | empty).sum())
        assert int(stats["exact_pairs"]) == int(per_pair.sum())
        if threshold == 2.0:
            assert 0 < int(stats["exact_pairs"]) < pairs


def test_stats_accumulate():
    q, k, v = make_qkv(seed=41)
    stats = {}
    support_basis_attention(q, k, v, threshold=0.0, degree=2, stats=stats)
    support_basis_attention(q, k, v, threshold=0.0, degree=2, stats=stats)
    assert int(stats["pairs"]) == 2 * 37 * 38 // 2 * 4 * 2
    assert int(stats["rows"]) == 2 * 37 * 4 * 2


# --------------------------------------------------------------------------- decoding consistency, causality, padding


@pytest.mark.parametrize("evaluation", ["auto", "features", "scores"])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("threshold", [2.0, INF])
def test_decoding_matches_full_sequence(window, pad, threshold, evaluation):
    q, k, v = make_qkv(batch=3, q_heads=6, kv_heads=2, q_len=37, seed=50)
    mask = padding_mask(3, 37, pad)
    kw = dict(threshold=threshold, degree=2, causal=True, sliding_window=window, key_padding_mask=mask, chunk_size=8,
              evaluation=evaluation)
    full = support_basis_attention(q, k, v, **kw)
    last = support_basis_attention(q[:, :, -1:], k, v, **kw)
    torch.testing.assert_close(last, full[:, :, -1:], rtol=1e-10, atol=1e-10)
    tail = support_basis_attention(q[:, :, -5:], k, v, **kw)
    torch.testing.assert_close(tail, full[:, :, -5:], rtol=1e-10, atol=1e-10)
    # step-by-step decoding against a growing cache
    for t in (1, 9, 17, 30):
        m = None if mask is None else mask[:, :t]
        step = support_basis_attention(q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t], **{**kw, "key_padding_mask": m})
        prefix = support_basis_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t], **{**kw, "key_padding_mask": m})
        torch.testing.assert_close(step, prefix[:, :, -1:], rtol=1e-10, atol=1e-10)
        # causality: the prefix run equals the first t rows of the full run
        torch.testing.assert_close(prefix, full[:, :, :t], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("threshold", [2.0, INF])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_causality(window, threshold, dtype):
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=37, seed=51, dtype=dtype)
    kw = dict(threshold=threshold, degree=2, causal=True, sliding_window=window, chunk_size=16)
    base = support_basis_attention(q, k, v, **kw)
    for factor in (10.0, 1.3):  # the new last key large (exact part) or small (polynomial part)
        k2, v2 = k.clone(), v.clone()
        k2[:, :, -1] = k2[:, :, -1] * factor + 0.5
        v2[:, :, -1] = -3.0 * v2[:, :, -1] + 1.0
        out = support_basis_attention(q, k2, v2, **kw)
        torch.testing.assert_close(out[:, :, :-1], base[:, :, :-1], rtol=1e-6 if dtype != F64 else 1e-12, atol=1e-6 if dtype != F64 else 1e-12)
        assert (out[:, :, -1] - base[:, :, -1]).abs().max() > 1e-3  # the last query does see it
    # changing the first key changes the later outputs that can see it
    k3 = k.clone()
    k3[:, :, 0] = 0.5 * k3[:, :, 0]
    out = support_basis_attention(q, k3, v, **kw)
    visible_rows = slice(0, window) if window is not None else slice(None)
    assert (out[:, :, visible_rows] - base[:, :, visible_rows]).abs().max() > 1e-4
    if window is not None:  # rows whose window has moved past key 0 do not change
        torch.testing.assert_close(out[:, :, window:], base[:, :, window:], rtol=1e-12 if dtype == F64 else 1e-6, atol=1e-12 if dtype == F64 else 1e-6)


def test_non_causal_sees_the_future():
    q, k, v = make_qkv(seed=52)
    base = support_basis_attention(q, k, v, threshold=2.0, degree=2, causal=False)
    v2 = v.clone()
    v2[:, :, -1] += 5.0
    out = support_basis_attention(q, k, v2, threshold=2.0, degree=2, causal=False)
    assert ((out[:, :, :-1] - base[:, :, :-1]).abs().amax(-1) > 1e-6).all()


@pytest.mark.parametrize("window", [None, 1, 4, 12])
@pytest.mark.parametrize("threshold", [2.0, INF, 0.0])
def test_left_padding_invariance(window, threshold):
    length, pad = 30, 7
    q, k, v = make_qkv(batch=1, q_heads=4, kv_heads=2, q_len=length, seed=60)
    gen = torch.Generator().manual_seed(61)
    garbage = lambda x: 20 * torch.randn(x.shape[0], x.shape[1], pad, x.shape[3], dtype=F64, generator=gen)  # noqa: E731
    qp, kp, vp = (torch.cat([garbage(x), x], dim=2) for x in (q, k, v))
    mask = torch.ones(1, length + pad, dtype=torch.bool)
    mask[:, :pad] = False
    kw = dict(threshold=threshold, degree=2, causal=True, sliding_window=window, chunk_size=8)
    alone = support_basis_attention(q, k, v, **kw)
    padded = support_basis_attention(qp, kp, vp, key_padding_mask=mask, **kw)
    torch.testing.assert_close(padded[:, :, pad:], alone, rtol=1e-10, atol=1e-10)
    # and in a batch next to an unpadded sequence of full length
    q2, k2, v2 = make_qkv(batch=1, q_heads=4, kv_heads=2, q_len=length + pad, seed=62)
    batch_mask = torch.cat([mask, torch.ones_like(mask)])
    both = support_basis_attention(torch.cat([qp, q2]), torch.cat([kp, k2]), torch.cat([vp, v2]), key_padding_mask=batch_mask, **kw)
    torch.testing.assert_close(both[:1, :, pad:], alone, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(both[1:], support_basis_attention(q2, k2, v2, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [True, False])
def test_right_padding_invariance(causal):
    length, pad = 30, 5
    q, k, v = make_qkv(batch=1, q_len=length, seed=63)
    gen = torch.Generator().manual_seed(64)
    qp, kp, vp = (torch.cat([x, 20 * torch.randn(*x.shape[:2], pad, x.shape[3], dtype=F64, generator=gen)], dim=2) for x in (q, k, v))
    mask = torch.ones(1, length + pad, dtype=torch.bool)
    mask[:, length:] = False
    kw = dict(threshold=2.0, degree=3, causal=causal, chunk_size=8, kernel="chebyshev")
    alone = support_basis_attention(q, k, v, **kw)
    padded = support_basis_attention(qp, kp, vp, key_padding_mask=mask, **kw)
    torch.testing.assert_close(padded[:, :, :length], alone, rtol=1e-10, atol=1e-10)


def test_chunk_size_and_evaluation_do_not_change_the_result():
    q, k, v = make_qkv(batch=2, q_heads=6, kv_heads=2, q_len=45, seed=65)
    mask = padding_mask(2, 45, "left", pad=9)
    for window in (None, 7):
        kw = dict(threshold=1.5, degree=3, sliding_window=window, key_padding_mask=mask, kernel="chebyshev")
        outs = [support_basis_attention(q, k, v, chunk_size=c, evaluation=e, **kw)
                for c in (1, 3, 8, 45, 100) for e in ("features", "scores")]
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- bad input


def _bad_inputs():
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=6, head_dim=4, dtype=torch.float32, seed=70)
    ok = dict(threshold=2.0, degree=2)
    nan_q = q.clone()
    nan_q[0, 0, 0, 0] = float("nan")
    inf_k = k.clone()
    inf_k[1, 1, 2, 3] = float("inf")
    inf_v = v.clone()
    inf_v[0, 1, 5, 0] = -float("inf")
    cases = [
        ("q-3d", (q[0], k, v), ok, r"q must be a 4-D tensor"),
        ("k-3d", (q, k[0], v), ok, r"k must be a 4-D tensor"),
        ("v-3d", (q, k, v[:, 0]), ok, r"v must be a 4-D tensor"),
        ("batch", (q, k[:1], v[:1]), ok, r"batch sizes differ"),
        ("v-batch", (q, k, v[:1]), ok, r"batch sizes differ"),
        ("head_dim", (q, k[..., :3], v), ok, r"head_dim differ"),
        ("kv-len", (q, k, v[:, :, :5]), ok, r"same heads and length"),
        ("heads-not-multiple", (q[:, :3], k, v), ok, r"multiple of k/v heads"),
        ("heads-6-vs-4", (torch.cat([q, q[:, :2]], 1), torch.cat([k, k], 1), torch.cat([v, v], 1)), ok, r"multiple of k/v heads"),
        ("dtype", (q, k.double(), v), ok, r"share a dtype"),
        ("integer", (q.long(), k.long(), v.long()), ok, r"floating-point"),
        ("empty-q", (q[:, :, :0], k, v), dict(ok, causal=False), r"empty input"),
        ("empty-kv", (q, k[:, :, :0], v[:, :, :0]), dict(ok, causal=False), r"empty input"),
        ("causal-q-longer", (q, k[:, :, :4], v[:, :, :4]), ok, r"q_len <= kv_len"),
        ("mask-shape", (q, k, v), dict(ok, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), r"key_padding_mask"),
        ("mask-batch", (q, k, v), dict(ok, key_padding_mask=torch.ones(1, 6, dtype=torch.bool)), r"key_padding_mask"),
        ("mask-dtype", (q, k, v), dict(ok, key_padding_mask=torch.ones(2, 6)), r"key_padding_mask must be a bool"),
        ("mask-3d", (q, k, v), dict(ok, key_padding_mask=torch.ones(2, 1, 6, dtype=torch.bool)), r"key_padding_mask"),
        ("window-0", (q, k, v), dict(ok, sliding_window=0), r"sliding_window must be a positive integer"),
        ("window-negative", (q, k, v), dict(ok, sliding_window=-3), r"sliding_window must be a positive integer"),
        ("window-fraction", (q, k, v), dict(ok, sliding_window=2.5), r"sliding_window must be a positive integer"),
        ("window-noncausal", (q, k, v), dict(ok, sliding_window=4, causal=False), r"only supported with causal=True"),
        ("degree-negative", (q, k, v), dict(ok, degree=-1), r"degree must be an integer in \[0, 12\]"),
        ("degree-13", (q, k, v), dict(ok, degree=13), r"degree must be an integer in \[0, 12\]"),
        ("degree-float", (q, k, v), dict(ok, degree=2.5), r"degree must be an integer"),
        ("degree-float-integral", (q, k, v), dict(ok, degree=2.0), r"degree must be an integer"),
        ("degree-bool", (q, k, v), dict(ok, degree=True), r"degree must be an integer"),
        ("threshold-negative", (q, k, v), dict(ok, threshold=-1.0), r"threshold must be >= 0"),
        ("threshold-nan", (q, k, v), dict(ok, threshold=float("nan")), r"threshold must be >= 0"),
        ("scale-0", (q, k, v), dict(ok, scale=0.0), r"scale must be a positive finite"),
        ("scale-negative", (q, k, v), dict(ok, scale=-1.0), r"scale must be a positive finite"),
        ("scale-inf", (q, k, v), dict(ok, scale=INF), r"scale must be a positive finite"),
        ("scale-nan", (q, k, v), dict(ok, scale=float("nan")), r"scale must be a positive finite"),
        ("nan-q", (nan_q, k, v), ok, r"q contains NaN or inf"),
        ("inf-k", (q, inf_k, v), ok, r"k contains NaN or inf"),
        ("inf-v", (q, k, inf_v), ok, r"v contains NaN or inf"),
        ("radius-negative", (q, k, v), dict(ok, radius=-1.0), r"radius must be a number in \(0, 150"),
        ("radius-0", (q, k, v), dict(ok, radius=0.0), r"radius must be a number in \(0, 150"),
        ("radius-inf", (q, k, v), dict(ok, radius=INF), r"radius must be a number in \(0, 150"),
        ("radius-beyond-limit", (q, k, v), dict(ok, radius=151.0), r"radius must be a number in \(0, 150"),
    ]
    fast_only = [
        ("chunk-0", (q, k, v), dict(ok, chunk_size=0), r"chunk_size must be a positive integer"),
        ("chunk-float", (q, k, v), dict(ok, chunk_size=8.0), r"chunk_size must be a positive integer"),
        ("evaluation", (q, k, v), dict(ok, evaluation="dense"), r"evaluation must be one of"),
    ]
    return cases, fast_only


_COMMON_BAD, _FAST_BAD = _bad_inputs()


@pytest.mark.parametrize("args,kwargs,match", [pytest.param(a, kw, m, id=n) for n, a, kw, m in _COMMON_BAD + _FAST_BAD])
def test_bad_input_raises_fast(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        support_basis_attention(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,match", [pytest.param(a, kw, m, id=n) for n, a, kw, m in _COMMON_BAD])
def test_bad_input_raises_reference(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        reference.support_basis_attention(*args, **kwargs)


def test_bad_input_as23():
    q, k, v = make_qkv(q_len=4, head_dim=4)
    with pytest.raises(ValueError, match="degree"):
        as23_attention(q, k, v, degree=13)
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        as23_attention(q, k[:, :, :2], v[:, :, :2], degree=2)


def test_feature_map_too_big_raises_with_estimate():
    q, k, v = make_qkv(batch=1, q_heads=1, kv_heads=1, q_len=4, head_dim=64, dtype=torch.float32, seed=71)
    support_basis_attention = functools.partial(ops_support_basis_attention, kernel="chebyshev")  # (odd degrees)
    with pytest.raises(ValueError, match=r"degree 6 with head_dim 64 .*GiB"):
        support_basis_attention(q, k, v, threshold=2.0, degree=6, max_feature_bytes=2**20, evaluation="features")
    with pytest.raises(ValueError, match="GiB"):
        support_basis_attention(q, k, v, threshold=2.0, degree=3, max_feature_bytes=1000, evaluation="features")
    # the score form needs no features: 4 queries are cheaper on their scores
    out = support_basis_attention(q, k, v, threshold=2.0, degree=6, max_feature_bytes=2**20)
    assert torch.isfinite(out).all()
    # the same shapes at degree 1 fit
    out = support_basis_attention(q, k, v, threshold=2.0, degree=1, max_feature_bytes=2**20)
    assert out.shape == (1, 1, 4, 64)


@pytest.mark.parametrize("window", [5.0, True], ids=["float", "bool"])
@pytest.mark.parametrize("op", [support_basis_attention, reference.support_basis_attention], ids=["fast", "reference"])
def test_sliding_window_must_be_an_int(op, window):
    q, k, v = make_qkv(q_len=20, seed=73)
    with pytest.raises(ValueError, match="sliding_window must be a positive integer"):
        op(q, k, v, threshold=2.0, degree=2, sliding_window=window)


@pytest.mark.parametrize("dtype,c", [(torch.float32, 20.0), (F64, 60.0)])
@pytest.mark.parametrize("op", [support_basis_attention, reference.support_basis_attention], ids=["fast", "reference"])
def test_rows_with_too_wide_intervals_are_exact_with_finite_gradients(op, dtype, c):
    """One query, two keys, threshold inf: the interval c^2 is far beyond RADIUS_LIMIT, where exp at
    the Chebyshev nodes would overflow. The row is exact, in the forward and in the gradients."""
    q = torch.tensor([[[[c]]]], dtype=dtype, requires_grad=True)
    k = torch.tensor([[[[c], [-c / 2]]]], dtype=dtype, requires_grad=True)
    v = torch.tensor([[[[1.0], [0.0]]]], dtype=dtype, requires_grad=True)
    out = op(q, k, v, threshold=INF, degree=2)
    exact = reference.exact_attention(q, k, v)
    torch.testing.assert_close(out, exact)
    got = torch.autograd.grad(out.sum(), (q, k, v))
    expected = torch.autograd.grad(exact.sum(), (q, k, v))
    for a, b in zip(got, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_valid_edge_arguments_accepted():
    q, k, v = make_qkv(q_len=9, seed=72)
    # integer threshold and integer scale; sliding_window given as a numpy-free int; degree 0 and 12
    for kw in (dict(threshold=2, degree=0), dict(threshold=0, degree=12), dict(threshold=2.0, degree=2, scale=1)):
        out = support_basis_attention(q, k, v, **kw)
        assert_matches(out, reference.support_basis_attention(q, k, v, **kw), F64)


# --------------------------------------------------------------------------- randomized robustness


def test_randomized_robustness():
    rng = random.Random(1234)
    dtypes = [torch.float32, torch.float32, torch.float64, torch.bfloat16, torch.float16]
    checked = {}
    for it in range(60):
        batch = rng.randint(1, 3)
        kv_heads = rng.choice([1, 2])
        q_heads = kv_heads * rng.choice([1, 2, 3])
        head_dim = rng.choice([1, 2, 4, 8, 16])
        causal = rng.random() < 0.7
        kv_len = rng.randint(1, 70)
        radius = rng.choice([None, None, None, 0.5, 4.0, 30.0])
        q_len = rng.choice([kv_len, kv_len, 1, rng.randint(1, kv_len)])
        if not causal:  # any query length, also longer than the keys
            q_len = rng.randint(1, 70)
        dtype = rng.choice(dtypes)
        threshold = rng.choice([0.0, INF, 0.5, 1.0, 2.0, 3.0, 10.0])
        degree = rng.randint(0, 4)
        input_scale = rng.choice([0.1, 0.5, 1.0, 3.0, 10.0])
        heavy = rng.random() < 0.3
        window = rng.choice([None, None, 1, rng.randint(1, 80)]) if causal else None
        padding = rng.choice([None, "left", "right"])
        chunk = rng.choice([1, 4, 16, 64])
        gen = torch.Generator().manual_seed(it)

        def draw(*shape):
            x = torch.randn(*shape, generator=gen, dtype=torch.float64)
            return (x**3 if heavy else x) * input_scale

        q = draw(batch, q_heads, q_len, head_dim).to(dtype)
        k = draw(batch, kv_heads, kv_len, head_dim).to(dtype)
        v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen, dtype=torch.float64).to(dtype)
        mask = None
        if padding is not None and kv_len > 1:
            n = rng.randint(1, kv_len - 1)
            mask = torch.ones(batch, kv_len, dtype=torch.bool)
            if padding == "left":
                mask[-1, :n] = False
            else:
                mask[-1, kv_len - n :] = False
        settings = dict(
            it=it, dtype=dtype, threshold=threshold, degree=degree, causal=causal, window=window, padding=padding,
            radius=radius, chunk=chunk, shapes=(tuple(q.shape), tuple(k.shape)), heavy=heavy, scale=input_scale,
        )
        stats = {}
        out = support_basis_attention(
            q, k, v, threshold=threshold, degree=degree, causal=causal, key_padding_mask=mask,
            sliding_window=window, radius=radius, chunk_size=chunk, stats=stats, kernel="chebyshev",
        )
        assert out.dtype == dtype, settings
        assert out.shape == (batch, q_heads, q_len, head_dim), settings
        assert torch.isfinite(out).all(), settings
        assert 0 <= int(stats["exact_pairs"]) <= int(stats["pairs"]), settings
        # rows without any visible key are zero
        vis = dense_visibility(q_len, kv_len, causal=causal, sliding_window=window, key_padding_mask=mask, batch=batch)
        empty = ~vis.any(-1)  # (B, Lq)
        if empty.any():
            assert (out.float().abs().amax(-1)[empty[:, None].expand(-1, q_heads, -1)] == 0).all(), settings
        if threshold == 0.0:
            expected = reference.exact_attention(q, k, v, causal=causal, key_padding_mask=mask, sliding_window=window)
            assert_matches(out, expected, dtype)
        if dtype == torch.float64:
            expected = reference.support_basis_attention(
                q, k, v, threshold=threshold, degree=degree, causal=causal, key_padding_mask=mask,
                sliding_window=window, radius=radius, kernel="chebyshev",
            )
            torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-7, msg=lambda m: f"{m}\n{settings}")
        checked[dtype] = checked.get(dtype, 0) + 1
    assert len(checked) == 4 and min(checked.values()) >= 5  # every dtype drawn several times


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(threshold=-1.0), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(threshold="big"), "threshold"),
        (dict(threshold=True), "threshold"),
        (dict(threshold=None), "threshold"),
        (dict(degree=-1), "degree"),
        (dict(degree=13), "degree"),
        (dict(degree=2.5), "degree"),
        (dict(degree=2.0), "degree"),
        (dict(degree=True), "degree"),
        (dict(interval="global"), "interval"),
        (dict(interval="fixed"), "radius"),
        (dict(interval="fixed", radius=0.0), "radius"),
        (dict(interval="fixed", radius=-2.0), "radius"),
        (dict(interval="fixed", radius=INF), "radius"),
        (dict(interval="fixed", radius="3"), "radius"),
        (dict(radius=3.0), "radius"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(chunk_size=8.0), "chunk_size"),
        (dict(chunk_size=True), "chunk_size"),
        (dict(max_feature_bytes=0), "max_feature_bytes"),
        (dict(max_feature_bytes=1.5), "max_feature_bytes"),
        (dict(layers={-1: {"degree": 3}}), "layers"),
        (dict(layers={"x": {"degree": 3}}), "layers"),
        (dict(layers={1.5: {"degree": 3}}), "layers"),
        (dict(layers={0: {"degree": 20}}), "degree"),
        (dict(layers={0: {"interval": "fixed"}}), "radius"),
        (dict(layers={0: {"threshold": -2}}), "threshold"),
    ],
)
def test_config_invalid_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SupportBasisConfig(**kwargs)


def test_config_unknown_layer_field_raises():
    with pytest.raises(ValueError, match=r"layers\[2\] has unknown fields \['bogus'\]"):
        SupportBasisConfig(layers={2: {"bogus": 1}})
    with pytest.raises(ValueError, match="max_feature_bytes"):  # not a per-layer field
        SupportBasisConfig(layers={2: {"max_feature_bytes": 10}})


def test_config_from_dict_unknown_setting_raises():
    with pytest.raises(ValueError, match="unknown support_basis settings"):
        SupportBasisConfig.from_dict({"threshold": 1.0, "thresold": 2.0})


def test_config_defaults_and_conversions():
    c = SupportBasisConfig()
    assert (c.threshold, c.degree, c.interval, c.radius, c.kernel, c.layers) == (4.0, 2, "query", None, None, {})
    # None means the method's default: the non-negative Taylor kernel for support basis, AS23a's Chebyshev fit
    assert c.op_kwargs("support_basis")["kernel"] == "taylor" and c.op_kwargs("as23")["kernel"] == "chebyshev"
    with pytest.raises(ValueError, match="even degrees.*default kernel of support_basis"):
        SupportBasisConfig(degree=3).check_method("support_basis")
    SupportBasisConfig(degree=3).check_method("as23")  # chebyshev: any degree
    SupportBasisConfig(degree=3, kernel="chebyshev").check_method("support_basis")
    assert SupportBasisConfig.from_dict(None) == c
    assert SupportBasisConfig.from_dict({}) == c
    c = SupportBasisConfig(threshold="inf")
    assert c.threshold == INF
    c = SupportBasisConfig(threshold=3)
    assert c.threshold == 3.0 and isinstance(c.threshold, float)


def test_config_round_trip():
    c = SupportBasisConfig(
        threshold=INF, degree=3, interval="fixed", radius=7.5, chunk_size=32, max_feature_bytes=2**20,
        layers={0: {"degree": 1}, 11: {"threshold": 0.5, "interval": "query", "radius": None}},
    )
    d = c.to_dict()
    assert d["threshold"] == "inf"
    assert set(d["layers"]) == {"0", "11"}
    assert all(isinstance(key, str) for key in d["layers"])
    restored = SupportBasisConfig.from_dict(json.loads(json.dumps(d)))
    assert restored == c
    assert set(restored.layers) == {0, 11}
    assert restored.threshold == INF
    # a finite threshold stays a number
    c2 = SupportBasisConfig(threshold=1.25, layers={"3": {"chunk_size": 8}})
    assert c2.layers == {3: {"chunk_size": 8}}
    assert c2.to_dict()["threshold"] == 1.25
    assert SupportBasisConfig.from_dict(c2.to_dict()) == c2


def test_config_for_layer_and_op_kwargs():
    c = SupportBasisConfig(threshold=2.0, degree=2, layers={1: {"degree": 4, "threshold": 0}, 2: {"interval": "fixed", "radius": 5.0}})
    default = c.for_layer(0)
    assert (default.threshold, default.degree, default.interval, default.radius) == (2.0, 2, "query", None)
    assert default.layers == {}
    one = c.for_layer(1)
    assert (one.threshold, one.degree) == (0.0, 4)
    assert one.chunk_size == c.chunk_size
    two = c.for_layer(2)
    assert two.op_kwargs()["radius"] == 5.0 and two.degree == 2
    assert c.for_layer(None) == dataclasses.replace(c, layers={})
    assert c.op_kwargs() == dict(threshold=2.0, degree=2, radius=None, chunk_size=c.chunk_size,
                                 max_feature_bytes=c.max_feature_bytes, sketch_dim=None, sketch_seed=0, kernel="taylor",
                                 radius_limit=150.0, sinks=0, local_window=0, column_queries=None, column_threshold=None)
    # op_kwargs drive the op
    q, k, v = make_qkv(q_len=9, seed=80)
    out = support_basis_attention(q, k, v, **one.op_kwargs())
    torch.testing.assert_close(out, reference.exact_attention(q, k, v), rtol=1e-10, atol=1e-10)
    out = support_basis_attention(q, k, v, **two.op_kwargs())
    torch.testing.assert_close(out, reference.support_basis_attention(q, k, v, threshold=2.0, degree=2, radius=5.0,
                                                                      kernel="taylor"), rtol=1e-10, atol=1e-10)



def test_config_infinite_threshold_in_layers_is_json_and_string_layer_keys_work():
    c = SupportBasisConfig(threshold=2.0, layers={3: {"threshold": INF}})
    text = json.dumps(c.to_dict(), allow_nan=False)  # raises on a bare Infinity
    again = SupportBasisConfig.from_dict(json.loads(text))
    assert again.for_layer(3).threshold == INF
    assert again.for_layer("3").threshold == INF and c.for_layer("3").threshold == INF
    assert again.for_layer(2).threshold == 2.0


# --------------------------------------------------------------------------- sketched features


SKETCH_CASES = [
    _case("sketch-causal", degree=2, chunk_size=8),
    _case("sketch-deg3-noncausal-rightpad", degree=3, causal=False, padding="right", batch=3, chunk_size=5),
    _case("sketch-gqa6x2-window5-leftpad", q_heads=6, kv_heads=2, sliding_window=5, padding="left", batch=3, chunk_size=8),
    _case("sketch-decode3", q_len=3, kv_len=37, padding="left", batch=3, chunk_size=8),
    _case("sketch-as23-deg4", threshold=INF, degree=4, chunk_size=16),
    _case("sketch-float32", dtype=torch.float32, degree=2, chunk_size=8),
]


@pytest.mark.parametrize("case", SKETCH_CASES)
def test_sketched_fast_matches_reference(case):
    """With the sketch seed fixed, the fast op and the dense twin compute the same sketched kernel."""
    c = dict(case)
    q, k, v = make_qkv(batch=c["batch"], q_heads=c["q_heads"], kv_heads=c["kv_heads"], q_len=c["q_len"],
                       kv_len=c["kv_len"], head_dim=c["head_dim"], dtype=c["dtype"], seed=c["seed"])
    kw = dict(threshold=c["threshold"], degree=c["degree"], causal=c["causal"], sliding_window=c["sliding_window"],
              key_padding_mask=padding_mask(c["batch"], k.shape[2], c["padding"]), sketch_dim=24, sketch_seed=7,
              kernel=c["kernel"])
    out = support_basis_attention(q, k, v, chunk_size=c["chunk_size"], **kw)
    expected = reference.support_basis_attention(q, k, v, **kw)
    assert torch.isfinite(out).all()
    assert_matches(out, expected, q.dtype)
    # a sketch, not the exact kernel: another seed gives another result
    other = support_basis_attention(q, k, v, chunk_size=c["chunk_size"], **{**kw, "sketch_seed": 8})
    if c["dtype"] == F64:
        assert (other - out).abs().max() > 1e-6


def test_sketched_gradients_match_reference():
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=21, seed=90)
    mask = padding_mask(2, 21, "left", pad=3)
    weights = torch.randn(2, 4, 21, 8, dtype=F64, generator=torch.Generator().manual_seed(91))
    kw = dict(threshold=2.0, degree=2, key_padding_mask=mask, sliding_window=6, sketch_dim=16, sketch_seed=3)
    fast = gradients(support_basis_attention, q, k, v, weights, chunk_size=8, **kw)
    for g_fast, g_ref in zip(fast, gradients(reference.support_basis_attention, q, k, v, weights, **kw)):
        assert torch.isfinite(g_fast).all()
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-8)


def test_sketched_decoding_matches_full_sequence():
    q, k, v = make_qkv(batch=2, q_heads=6, kv_heads=2, q_len=30, seed=92)
    kw = dict(threshold=2.0, degree=2, sketch_dim=20, sketch_seed=1, chunk_size=8)
    full = support_basis_attention(q, k, v, **kw)
    for t in (1, 9, 30):
        step = support_basis_attention(q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t], **kw)
        torch.testing.assert_close(step, full[:, :, t - 1 : t], rtol=1e-10, atol=1e-10)


def test_large_sketch_approaches_exact_features():
    """AS23a (every pair polynomial) with a wide sketch converges to the exact-feature result: the
    error falls roughly as 1/sqrt(sketch_dim)."""
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=2, q_len=40, seed=93)
    q, k = q * 0.3, k * 0.3  # bounded entries: the polynomial mass stays positive, no fallback rows
    exact = as23_attention(q, k, v, degree=2, evaluation="features")
    errors = {}
    for r in (16, 256, 4096):
        outs = [as23_attention(q, k, v, degree=2, sketch_dim=r, sketch_seed=s) for s in range(4)]
        errors[r] = sum(((o - exact).norm() / exact.norm()).item() for o in outs) / len(outs)
    assert errors[4096] < errors[256] < errors[16]
    assert errors[4096] < 0.02, errors
    assert errors[16] / errors[4096] > 8  # 16x the sqrt(r) ratio, allow noise


def test_sketch_settings_bad_input():
    q, k, v = make_qkv(q_len=5, seed=94)
    with pytest.raises(ValueError, match="sketch_dim must be a positive integer"):
        support_basis_attention(q, k, v, threshold=2.0, degree=2, sketch_dim=0)
    with pytest.raises(ValueError, match="sketch_seed must be an integer"):
        support_basis_attention(q, k, v, threshold=2.0, degree=2, sketch_dim=4, sketch_seed=-1)
    with pytest.raises(ValueError, match="not a function of the scores"):
        support_basis_attention(q, k, v, threshold=2.0, degree=2, sketch_dim=4, evaluation="scores")
    with pytest.raises(ValueError, match="sketch_dim must be an integer >= 1 or None"):
        SupportBasisConfig(sketch_dim=2.5)
