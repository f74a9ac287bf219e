"""The non-negative kernels (``squared``, and ``taylor`` centred per query): the fast op against its naive
twin, the feature identity, and non-negativity (every output a convex combination of values, no fallback
row needed)."""

import pytest
import torch
from test_ops import F64, INF, TOLERANCES, assert_matches, gradients, make_qkv, padding_mask, with_evaluations

from sb_hf.config import SupportBasisConfig
from sb_hf.ops import as23_attention, multi_threshold_attention, reference, support_basis_attention
from sb_hf.ops import large_rows
from sb_hf.ops.polynomial import FeatureMap, kernel_fit, kernel_on_scores

KERNELS = ["squared", "taylor"]


def _case(name, **kw):
    base = dict(batch=2, q_heads=4, kv_heads=2, q_len=37, kv_len=None, dtype=F64, causal=True, threshold=2.0,
                degree=2, sketch_dim=None, chunk_size=16, padding=None, sliding_window=None, seed=0)
    base.update(kw)
    return pytest.param(base, id=name)


CASES = [
    _case("causal"),
    _case("noncausal-rightpad", causal=False, padding="right", batch=3, chunk_size=7),
    _case("deg4-chunk5", degree=4, chunk_size=5),
    _case("gqa6x2-window5-leftpad", q_heads=6, kv_heads=2, sliding_window=5, padding="left", batch=3, chunk_size=8),
    _case("decode3-leftpad", q_len=3, kv_len=41, padding="left", batch=3, chunk_size=8),
    _case("as23-deg6", threshold=INF, degree=6, chunk_size=16),
    _case("sketch-deg4", degree=4, sketch_dim=9, chunk_size=8),
    _case("sketch-deg6-window7", degree=6, sketch_dim=5, sliding_window=7, chunk_size=8),
    _case("float32", dtype=torch.float32, chunk_size=8),
    _case("bfloat16-deg4", dtype=torch.bfloat16, degree=4, chunk_size=8),
]


def _inputs(c, kernel):
    q, k, v = make_qkv(batch=c["batch"], q_heads=c["q_heads"], kv_heads=c["kv_heads"], q_len=c["q_len"],
                       kv_len=c["kv_len"], dtype=c["dtype"], seed=c["seed"])
    kw = dict(threshold=c["threshold"], degree=c["degree"], sketch_dim=c["sketch_dim"], causal=c["causal"],
              sliding_window=c["sliding_window"], key_padding_mask=padding_mask(c["batch"], k.shape[2], c["padding"]),
              sketch_seed=3, kernel=kernel)
    return q, k, v, kw


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case,evaluation", with_evaluations(CASES))
def test_fast_matches_reference(case, evaluation, kernel):
    q, k, v, kw = _inputs(case, kernel)
    out = support_basis_attention(q, k, v, chunk_size=case["chunk_size"], evaluation=evaluation, **kw)
    expected = reference.support_basis_attention(q, k, v, **kw)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert_matches(out, expected, q.dtype)


def test_the_kernels_are_different_kernels():
    """Same settings, other kernel: a different result (the grid above would pass for a no-op flag otherwise)."""
    q, k, v = make_qkv(seed=0)
    outs = [support_basis_attention(q, k, v, threshold=2.0, degree=2, kernel=kernel) for kernel in ["chebyshev", *KERNELS]]
    for i in range(3):
        for j in range(i):
            assert (outs[i] - outs[j]).abs().max() > 1e-3


def test_the_ops_default_to_the_non_negative_kernel_and_as23_to_chebyshev():
    """The ops (fast and reference) default to the taylor kernel, as the transformers backend does: large entries
    (q, k ~ 3 N(0, 1), d = 40), values in [0, 1], sketched degree-2 buckets keep every output inside [0, 1]; the
    signed Chebyshev fit stays available by name (and leaves the range here) and stays AS23a's default."""
    generator = torch.Generator().manual_seed(0)
    q, k = (3 * torch.randn(1, 2, 300, 40, generator=generator) for _ in range(2))
    v = torch.rand(1, 2, 300, 40, generator=generator)
    settings = dict(thresholds=[6.0, 3.0], degrees=[2, 2], sketch_dim=64, causal=True)
    out = multi_threshold_attention(q, k, v, **settings)
    assert torch.equal(out, multi_threshold_attention(q, k, v, kernel="taylor", **settings))
    assert out.min() >= 0 and out.max() <= 1
    signed = multi_threshold_attention(q, k, v, kernel="chebyshev", **settings)
    assert signed.min() < 0 or signed.max() > 1  # why it is not the default
    for op in (support_basis_attention, reference.support_basis_attention):
        assert torch.equal(op(q, k, v, threshold=6.0, degree=2), op(q, k, v, threshold=6.0, degree=2, kernel="taylor"))
    for op in (as23_attention, reference.as23_attention):
        assert torch.equal(op(q[..., :40, :], k[..., :40, :], v[..., :40, :], degree=3),
                           op(q[..., :40, :], k[..., :40, :], v[..., :40, :], degree=3, kernel="chebyshev"))
    with pytest.raises(ValueError, match="even degrees.*kernel='chebyshev'"):
        support_basis_attention(q, k, v, threshold=6.0, degree=3)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("threshold", [2.0, INF])
def test_multi_threshold_matches_reference(threshold, kernel):
    q, k, v = make_qkv(batch=3, q_heads=6, kv_heads=2, q_len=33, seed=5)
    thresholds = [threshold, 1.8, 1.2] if threshold != INF else [INF, 1.8]
    kw = dict(thresholds=thresholds, degrees=[2, 4, 2][: len(thresholds)], sketch_dim=[None, 7, None][: len(thresholds)],
              key_padding_mask=padding_mask(3, 33, "left"), sliding_window=9, kernel=kernel, sketch_seed=1)
    out = multi_threshold_attention(q, k, v, chunk_size=8, **kw)
    torch.testing.assert_close(out, reference.multi_threshold_attention(q, k, v, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("sketch_dim", [None, 6])
def test_gradients_match_reference(sketch_dim, kernel):
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=21, seed=7)
    kw = dict(threshold=2.0, degree=4, key_padding_mask=padding_mask(2, 21, "left", pad=3), sliding_window=6,
              sketch_dim=sketch_dim, kernel=kernel)
    weights = torch.randn(2, 4, 21, 8, dtype=F64, generator=torch.Generator().manual_seed(8))
    fast = gradients(support_basis_attention, q, k, v, weights, chunk_size=8, **kw)
    for g_fast, g_ref in zip(fast, gradients(reference.support_basis_attention, q, k, v, weights, **kw)):
        assert torch.isfinite(g_fast).all()
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("sketch_dim", [None, 6])
def test_decoding_matches_full_sequence(sketch_dim, window, kernel):
    q, k, v = make_qkv(batch=2, q_heads=6, kv_heads=2, q_len=30, seed=9)
    kw = dict(threshold=2.0, degree=4, sketch_dim=sketch_dim, kernel=kernel, chunk_size=8, sliding_window=window)
    full = support_basis_attention(q, k, v, **kw)
    for t in (1, 9, 30):
        step = support_basis_attention(q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t], **kw)
        torch.testing.assert_close(step, full[:, :, t - 1 : t], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- the kernel itself


@pytest.mark.parametrize("degree", [2, 4, 8])
def test_squared_fit_approximates_exp_and_is_non_negative(degree):
    """``kernel_on_scores`` of the squared fit is >= 0 everywhere (also outside the interval) and
    approaches ``exp(x - shift)`` on it as the degree grows; the Chebyshev fit of the same degree goes negative."""
    radius, shift = torch.tensor(4.0, dtype=F64), torch.tensor(2.0, dtype=F64)
    t = torch.linspace(-1.5, 1.5, 3001, dtype=F64)
    squared = kernel_on_scores(kernel_fit(radius, shift, degree, "squared"), t, "squared")
    assert (squared >= 0).all()
    inside = t.abs() <= 1
    target = torch.exp(radius * t - shift)
    error = ((squared - target)[inside].abs().max() / target[inside].max()).item()
    assert error < {2: 0.6, 4: 0.2, 8: 0.01}[degree], error  # measured 0.56, 0.17, 0.007
    chebyshev = kernel_on_scores(kernel_fit(radius, shift, degree, "chebyshev"), t, "chebyshev")
    if degree <= 4:
        assert (chebyshev[inside] < 0).any()  # what the squared kernel is for


@pytest.mark.parametrize("degree", [2, 4, 8])
def test_taylor_fit_is_the_centred_power(degree):
    """``kernel_fit(..., "taylor", center=c)`` squared is ``exp(c - shift) (1 + (x - c) / p)^p`` for every x
    (also outside the interval): exact at x = c, >= 0, and within a few percent of ``exp`` near c."""
    radius, shift = torch.tensor([10.0, 30.0], dtype=F64), torch.tensor([5.0, 15.0], dtype=F64)
    center = torch.tensor([-1.5, 4.0], dtype=F64)
    t = torch.linspace(-1.3, 1.3, 2001, dtype=F64)
    got = kernel_on_scores(kernel_fit(radius, shift, degree, "taylor", center)[:, None, :], t, "taylor")
    x = radius[:, None] * t
    expected = torch.exp(center - shift)[:, None] * (1 + (x - center[:, None]) / degree) ** degree
    torch.testing.assert_close(got, expected)
    assert (got >= 0).all()
    near = (x - center[:, None]).abs() <= 0.5
    relative = (got / torch.exp(x - shift[:, None]) - 1).abs()[near]
    assert relative.max() < 0.02 * 8 / degree


@pytest.mark.parametrize("evaluation", ["features", "scores"])
@pytest.mark.parametrize("window", [None, 6])
def test_taylor_degree_zero_is_the_mean_value_of_the_small_keys(window, evaluation):
    """Degree 0: every small-small pair weighs ``exp(c_i)``, one feature. With no large row, each output
    row is therefore the plain mean of the visible values (``c_i`` cancels), whatever q and k are."""
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=29, seed=14)
    kw = dict(threshold=INF, degree=0, kernel="taylor", sliding_window=window)
    out = support_basis_attention(q, k, v, chunk_size=8, evaluation=evaluation, **kw)
    torch.testing.assert_close(out, reference.support_basis_attention(q, k, v, **kw), rtol=1e-10, atol=1e-10)
    pos = torch.arange(29)
    seen = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] < window) if window else True)
    mean = (seen.double() @ v.repeat_interleave(2, dim=1)) / seen.sum(-1, keepdim=True)
    torch.testing.assert_close(out, mean, rtol=1e-10, atol=1e-10)
    assert FeatureMap(8, 0, kernel="taylor").dim == 1
    # with large rows, the exact part and the constant far field mix: fast == twin
    kw["threshold"] = 1.5
    out = support_basis_attention(q, k, v, chunk_size=8, evaluation=evaluation, **kw)
    torch.testing.assert_close(out, reference.support_basis_attention(q, k, v, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sketch_dim", [None, 5])
def test_squared_features_give_squared_inner_products(sketch_dim):
    """``<F(q; w), F(k)> = <w * psi(q), psi(k)>^2`` for the symmetric square of the base features."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 6, dtype=F64, generator=g), torch.randn(4, 6, dtype=F64, generator=g)
    f = FeatureMap(6, 4, sketch_dim=sketch_dim, seed=2, kernel="squared")
    weights = torch.randn(3, f.base_dim, dtype=F64, generator=g)
    base = (f.base(q) * weights) @ f.base(k).T
    torch.testing.assert_close(f(q, weights) @ f(k).T, base**2)
    assert f.base_degree == 2 and f(k).shape == (4, f.dim) and f.dim == f.base_dim * (f.base_dim + 1) // 2
    assert f.base_dim == (1 + 6 + 21 if sketch_dim is None else 1 + 6 + sketch_dim)


def _heavy_inputs(dtype, seed):
    """Heavy-tailed q/k (cubes of normals) on which the signed fit goes negative; a fixed interval keeps
    every row's fit usable, so every fallback row is one the kernel caused."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 6, 64, 16, dtype=F64, generator=g) ** 3 * 0.7
    k = torch.randn(2, 2, 64, 16, dtype=F64, generator=g) ** 3 * 0.7
    v = torch.randn(2, 2, 64, 16, dtype=F64, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("evaluation", ["features", "scores"])
def test_outputs_are_convex_combinations_without_fallback(dtype, evaluation, kernel):
    q, k, v = _heavy_inputs(dtype, seed=int(str(dtype)[-2:].replace("t", "0")))
    kw = dict(threshold=6.0, degree=2, radius=20.0, chunk_size=16, evaluation=evaluation)
    stats = {}
    out = support_basis_attention(q, k, v, kernel=kernel, stats=stats, **kw)
    large = int(large_rows(q, 6.0).sum())
    assert int(stats["exact_rows"]) == large  # no row needed the fallback
    assert torch.isfinite(out).all()
    # a convex combination of the visible values: inside their per-channel range (causal prefix)
    values = v.to(F64).repeat_interleave(3, dim=1)
    prefix_max = values.cummax(dim=2).values
    prefix_min = values.cummin(dim=2).values
    slack = 2 * TOLERANCES[dtype]["atol"]
    assert (out.to(F64) <= prefix_max + slack).all() and (out.to(F64) >= prefix_min - slack).all()
    signed = {}
    support_basis_attention(q, k, v, kernel="chebyshev", stats=signed, **kw)
    assert int(signed["exact_rows"]) > large  # the signed fit needs the fallback on the same input


def test_naive_weights_are_non_negative_on_heavy_inputs():
    q, k, v = _heavy_inputs(F64, seed=3)
    for kw in (dict(degree=2), dict(degree=4), dict(degree=4, sketch_dim=6), dict(degree=6, sketch_dim=4),
               dict(degree=2, kernel="taylor"), dict(degree=8, kernel="taylor")):
        kw = {"kernel": "squared", **kw}
        weights = reference.support_basis_attention(q, k, v, threshold=6.0, return_weights=True, **kw)
        assert (weights >= 0).all(), kw
        torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))
    signed = reference.support_basis_attention(q, k, v, threshold=6.0, degree=2, radius=20.0, kernel="chebyshev",
                                            return_weights=True)
    assert (signed < 0).any()


def test_randomized_finiteness():
    """Finite inputs of any scale give finite, in-range outputs with the squared kernel (fast op, fp32)."""
    g = torch.Generator().manual_seed(5)
    for it in range(20):
        scale = [0.1, 1.0, 3.0, 10.0][it % 4]
        q = torch.randn(1, 4, 45, 8, generator=g) ** 3 * scale
        k = torch.randn(1, 2, 45, 8, generator=g) ** 3 * scale
        v = torch.randn(1, 2, 45, 8, generator=g)
        for kw in (dict(threshold=INF, degree=2), dict(threshold=3.0, degree=4), dict(threshold=3.0, degree=4, sketch_dim=8),
                   dict(threshold=INF, degree=2, kernel="taylor"), dict(threshold=3.0, degree=8, kernel="taylor")):
            kw = {"kernel": "squared", **kw}
            out = support_basis_attention(q, k, v, chunk_size=16, **kw)
            assert torch.isfinite(out).all(), (it, kw)
            assert out.abs().max() <= v.abs().max() * (1 + 1e-3), (it, kw)


@pytest.mark.parametrize("kernel", KERNELS)
def test_as23_takes_the_kernel(kernel):
    q, k, v = make_qkv(seed=4)
    out = as23_attention(q, k, v, degree=4, kernel=kernel, chunk_size=8)
    assert_matches(out, reference.as23_attention(q, k, v, degree=4, kernel=kernel), F64)


def test_bad_input():
    q, k, v = make_qkv(q_len=5, seed=6)
    with pytest.raises(ValueError, match="even degrees >= 2"):
        support_basis_attention(q, k, v, threshold=2.0, degree=3, kernel="squared")
    with pytest.raises(ValueError, match="even degrees >= 2"):
        multi_threshold_attention(q, k, v, thresholds=[2.0, 1.0], degrees=[2, 1], kernel="squared")
    with pytest.raises(ValueError, match="kernel must be one of"):
        support_basis_attention(q, k, v, threshold=2.0, degree=2, kernel="gaussian")
    with pytest.raises(ValueError, match="kernel must be one of"):
        reference.support_basis_attention(q, k, v, threshold=2.0, degree=2, kernel="gaussian")
    with pytest.raises(ValueError, match="kernel must be one of"):
        SupportBasisConfig(kernel="gaussian")
    with pytest.raises(ValueError, match="even degrees >= 2"):
        SupportBasisConfig(kernel="squared", degree=3)
    with pytest.raises(ValueError, match="even degrees >= 2"):
        SupportBasisConfig(layers={2: {"kernel": "squared", "degree": 1}})
    with pytest.raises(ValueError, match="even degrees >= 0"):
        support_basis_attention(q, k, v, threshold=2.0, degree=3, kernel="taylor")
    with pytest.raises(ValueError, match="even degrees >= 0"):
        SupportBasisConfig(kernel="taylor", degree=1)
    with pytest.raises(ValueError, match="even degrees >= 2"):
        support_basis_attention(q, k, v, threshold=2.0, degree=0, kernel="squared")
    config = SupportBasisConfig(kernel="squared", degree=4)
    assert SupportBasisConfig.from_dict(config.to_dict()).op_kwargs()["kernel"] == "squared"


def test_large_sketch_approaches_the_exact_squared_kernel():
    """Degree 4 squared, every pair polynomial: a wider sketch of the half-degree features converges
    to the exact-feature result."""
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=2, q_len=40, seed=12)
    q, k = q * 0.5, k * 0.5
    exact = as23_attention(q, k, v, degree=4, kernel="squared", evaluation="scores")
    errors = {}
    for r in (4, 32, 256):
        outs = [as23_attention(q, k, v, degree=4, kernel="squared", sketch_dim=r, sketch_seed=s) for s in range(4)]
        errors[r] = sum(((o - exact).norm() / exact.norm()).item() for o in outs) / len(outs)
    assert errors[256] < errors[32] < errors[4], errors  # measured 6.0%, 2.4%, 0.8%
    assert errors[256] < 0.015, errors
