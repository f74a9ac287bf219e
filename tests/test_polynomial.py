"""Tests of sb_hf.ops.polynomial against independent math (binomial identities, Chebyshev theory, numpy)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sb_hf.ops.polynomial import (
    MAX_DEGREE,
    evaluate_polynomial,
    exp_fit_coefficients,
    feature_degrees,
    feature_dim,
    monomial_features,
)

F64 = torch.float64


# --------------------------------------------------------------------------- feature map


def _count_symmetric_monomials(head_dim: int, degree: int) -> int:
    """Count multisets of size ``degree`` from ``head_dim`` items by enumeration (independent of math.comb)."""
    return sum(1 for _ in itertools.combinations_with_replacement(range(head_dim), degree))


@pytest.mark.parametrize("head_dim", [1, 2, 3, 8])
@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_feature_dim_counts(head_dim, degree):
    expected = sum(math.comb(head_dim + m - 1, m) for m in range(degree + 1))
    assert feature_dim(head_dim, degree) == expected
    assert expected == sum(_count_symmetric_monomials(head_dim, m) for m in range(degree + 1))
    x = torch.randn(5, head_dim, dtype=F64)
    assert monomial_features(x, degree).shape == (5, expected)
    degrees = feature_degrees(head_dim, degree)
    assert degrees.shape == (expected,)
    # blocks are contiguous and ordered 0, 1, ..., degree with the right sizes
    for m in range(degree + 1):
        assert int((degrees == m).sum()) == math.comb(head_dim + m - 1, m)
    assert torch.all(degrees[1:] >= degrees[:-1])


def test_feature_dim_known_values():
    assert feature_dim(1, 4) == 5  # 1, x, x^2, x^3, x^4
    assert feature_dim(3, 2) == 1 + 3 + 6
    assert feature_dim(8, 3) == 1 + 8 + 36 + 120
    assert feature_dim(64, 2) == 1 + 64 + 2080


@pytest.mark.parametrize("head_dim", [1, 3, 8])
@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_monomial_features_block_inner_products(head_dim, degree):
    gen = torch.Generator().manual_seed(100 * head_dim + degree)
    q = torch.randn(7, head_dim, dtype=F64, generator=gen)
    k = torch.randn(7, head_dim, dtype=F64, generator=gen)
    phi_q, phi_k = monomial_features(q, degree), monomial_features(k, degree)
    degrees = feature_degrees(head_dim, degree)
    dots = (q * k).sum(-1)
    total = torch.zeros(7, dtype=F64)
    for m in range(degree + 1):
        block = degrees == m
        inner = (phi_q[:, block] * phi_k[:, block]).sum(-1)
        torch.testing.assert_close(inner, dots**m, rtol=1e-12, atol=1e-12)
        total = total + dots**m
    # the whole inner product is the sum over degrees
    torch.testing.assert_close((phi_q * phi_k).sum(-1), total, rtol=1e-12, atol=1e-12)
    # all pairs at once (a matrix of inner products)
    torch.testing.assert_close(
        phi_q @ phi_k.T, sum((q @ k.T) ** m for m in range(degree + 1)), rtol=1e-12, atol=1e-12
    )


def test_monomial_features_batched_shapes_and_float32():
    x = torch.randn(2, 3, 4, 5)
    phi = monomial_features(x, 3)
    assert phi.shape == (2, 3, 4, feature_dim(5, 3))
    assert phi.dtype == torch.float32
    y = torch.randn(2, 3, 4, 5)
    expected = sum(((x * y).sum(-1)) ** m for m in range(4))
    torch.testing.assert_close((phi * monomial_features(y, 3)).sum(-1), expected, rtol=1e-4, atol=1e-4)


def test_monomial_features_explicit_small_case():
    # head_dim 2, degree 2: features 1, x0, x1, x0^2, sqrt(2) x0 x1, x1^2 (in some order within a block)
    x = torch.tensor([2.0, 3.0], dtype=F64)
    phi = monomial_features(x, 2)
    degrees = feature_degrees(2, 2)
    assert phi[degrees == 0].tolist() == [1.0]
    assert sorted(phi[degrees == 1].tolist()) == [2.0, 3.0]
    assert sorted(phi[degrees == 2].tolist()) == pytest.approx(sorted([4.0, 9.0, math.sqrt(2) * 6.0]))


# --------------------------------------------------------------------------- polynomial evaluation


def test_evaluate_polynomial_matches_explicit_sum():
    gen = torch.Generator().manual_seed(3)
    coefficients = torch.randn(4, 6, dtype=F64, generator=gen)
    t = torch.linspace(-1.5, 1.5, 11, dtype=F64)
    got = evaluate_polynomial(coefficients[:, None, :], t)
    expected = sum(coefficients[:, None, m] * t**m for m in range(6))
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    # degree 0: a constant
    assert torch.equal(evaluate_polynomial(torch.tensor([2.5], dtype=F64), t), torch.full_like(t, 2.5))


# --------------------------------------------------------------------------- Chebyshev fit of exp


def _chebyshev_nodes(degree: int) -> torch.Tensor:
    n = torch.arange(degree + 1, dtype=F64)
    return torch.cos((2 * n + 1) * math.pi / (2 * (degree + 1)))


def _error_bounds(radius: float, shift: float, degree: int) -> tuple[float, float]:
    """Chebyshev interpolation of f(t) = exp(r t - s) on [-1, 1]:
    f(t) - p(t) = f^(g+1)(xi) / (g+1)! * w(t) with w(t) = 2^-g T_{g+1}(t), so
    max |f - p| <= r^(g+1) e^(r - s) / (2^g (g+1)!) and at t = 1 (|w| = 2^-g) the error is at least
    r^(g+1) e^(-r - s) / (2^g (g+1)!)."""
    base = radius ** (degree + 1) / (2**degree * math.factorial(degree + 1))
    return base * math.exp(-radius - shift), base * math.exp(radius - shift)


@pytest.mark.parametrize(
    "radius,shift,degree",
    [(1.0, 0.0, 2), (1.0, 0.0, 8), (2.0, 0.0, 4), (2.0, 0.0, 8), (2.0, 1.0, 10), (5.0, 2.5, 6), (0.5, 0.0, 3)],
)
def test_exp_fit_error_within_chebyshev_bounds(radius, shift, degree):
    t = torch.linspace(-1, 1, 4001, dtype=F64)
    coefficients = exp_fit_coefficients(torch.tensor(radius, dtype=F64), torch.tensor(shift, dtype=F64), degree)
    assert coefficients.shape == (degree + 1,)
    error = evaluate_polynomial(coefficients, t) - torch.exp(radius * t - shift)
    lower, upper = _error_bounds(radius, shift, degree)
    assert error.abs().max().item() <= upper * (1 + 1e-9) + 1e-14
    # the error at t = 1 is not smaller than the theory allows (i.e. it really is the degree-g interpolant)
    assert abs(error[-1].item()) >= lower * (1 - 1e-6) - 1e-14


def test_exp_fit_accuracy_examples():
    t = torch.linspace(-1, 1, 2001, dtype=F64)
    zero = torch.tensor(0.0, dtype=F64)
    # degree 8 on radius 1: ~2.7e-8 relative
    c = exp_fit_coefficients(torch.tensor(1.0, dtype=F64), zero, 8)
    f = torch.exp(t)
    assert ((evaluate_polynomial(c, t) - f) / f).abs().max() < 1e-7
    # degree 8 on radius 2: ~3.7e-5 relative (the theoretical bound is 3e-4 relative at t=-1)
    c = exp_fit_coefficients(torch.tensor(2.0, dtype=F64), zero, 8)
    f = torch.exp(2 * t)
    assert ((evaluate_polynomial(c, t) - f) / f).abs().max() < 1e-4
    # the error falls with the degree
    errors = []
    for degree in range(0, 11):
        c = exp_fit_coefficients(torch.tensor(2.0, dtype=F64), zero, degree)
        errors.append((evaluate_polynomial(c, t) - f).abs().max().item())
    assert all(b < a for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 5, 8, MAX_DEGREE])
def test_exp_fit_interpolates_at_chebyshev_nodes(degree):
    radius = torch.tensor([0.5, 1.0, 3.0, 7.0], dtype=F64)
    shift = torch.tensor([0.0, 0.5, 1.5, 3.5], dtype=F64)
    coefficients = exp_fit_coefficients(radius, shift, degree)
    assert coefficients.shape == (4, degree + 1)
    nodes = _chebyshev_nodes(degree)
    got = evaluate_polynomial(coefficients[:, None, :], nodes[None, :])
    expected = torch.exp(radius[:, None] * nodes[None, :] - shift[:, None])
    tol = 1e-12 if degree <= 8 else 1e-9
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("degree", [1, 2, 4, 6, 9])
def test_exp_fit_matches_numpy_chebinterpolate(degree):
    radius, shift = 3.0, 1.2
    cheb = np.polynomial.chebyshev.chebinterpolate(lambda x: np.exp(radius * x - shift), degree)
    expected = np.polynomial.chebyshev.cheb2poly(cheb)
    got = exp_fit_coefficients(torch.tensor(radius, dtype=F64), torch.tensor(shift, dtype=F64), degree)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-10)


def test_exp_fit_float32_close_to_float64():
    radius = torch.tensor([1.0, 4.0, 10.0])
    shift = radius / 2
    c32 = exp_fit_coefficients(radius, shift, 4)
    c64 = exp_fit_coefficients(radius.double(), shift.double(), 4)
    assert c32.dtype == torch.float32
    torch.testing.assert_close(c32.double(), c64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_exp_fit_large_radius_finite(dtype):
    radius = torch.tensor(150.0, dtype=dtype)
    shift = radius / 2
    coefficients = exp_fit_coefficients(radius, shift, 4)
    assert torch.isfinite(coefficients).all()
    # still interpolates at the nodes (relative; the values reach e^(150 cos(pi/10) - 75) ~ e^67.7)
    nodes = _chebyshev_nodes(4).to(dtype)
    values = evaluate_polynomial(coefficients, nodes)
    expected = torch.exp(radius * nodes - shift)
    assert torch.isfinite(values).all()
    rtol = 1e-9 if dtype == F64 else 1e-3
    assert ((values - expected).abs() <= rtol * expected.abs().max()).all()
    # the top node value dominates; it must be reproduced relatively
    assert abs(values[0].item() / expected[0].item() - 1) < rtol


# ----------------------------------------------------------------------------- sketched feature map


def test_exact_feature_map_is_the_monomial_map():
    from sb_hf.ops.polynomial import FeatureMap

    x = torch.randn(3, 5, dtype=torch.float64)
    fm = FeatureMap(5, 3)
    torch.testing.assert_close(fm(x), monomial_features(x, 3))
    assert fm.dim == feature_dim(5, 3) and torch.equal(fm.base_degrees(), feature_degrees(5, 3))


@pytest.mark.parametrize("degree", [2, 3])
def test_sketch_is_unbiased_per_degree(degree):
    """Over independent seeds, each degree block's inner product averages to (q.k)^m: the mean of
    400 sketches lies within 4 standard errors of the exact value; degrees 0 and 1 are exact."""
    from sb_hf.ops.polynomial import FeatureMap

    g = torch.Generator().manual_seed(degree)
    q, k = torch.randn(6, dtype=torch.float64, generator=g), torch.randn(6, dtype=torch.float64, generator=g)
    estimates = {m: [] for m in range(degree + 1)}
    for seed in range(400):
        fm = FeatureMap(6, degree, sketch_dim=8, seed=seed)
        prod, degrees = fm(q) * fm(k), fm.base_degrees()
        for m in range(degree + 1):
            estimates[m].append(prod[degrees == m].sum())
    for m in range(degree + 1):
        values = torch.stack(estimates[m])
        expected = (q @ k) ** m
        if m <= 1:
            torch.testing.assert_close(values, expected.expand_as(values))
            continue
        stderr = values.std() / len(values) ** 0.5
        assert stderr > 0
        assert (values.mean() - expected).abs() < 4 * stderr, (m, values.mean(), expected, stderr)


def test_sketch_variance_falls_with_dimension():
    """The variance of the degree-2 estimate is about 1/sketch_dim of a single projection's."""
    from sb_hf.ops.polynomial import FeatureMap

    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(8, dtype=torch.float64, generator=g), torch.randn(8, dtype=torch.float64, generator=g)

    def variance(r):
        vals = []
        for seed in range(300):
            fm = FeatureMap(8, 2, sketch_dim=r, seed=seed)
            vals.append((fm(q) * fm(k))[fm.base_degrees() == 2].sum())
        return torch.stack(vals).var()

    ratio = variance(4) / variance(64)
    assert 8 < ratio < 32, ratio  # 16 expected


def test_sketch_is_seeded_and_deterministic():
    from sb_hf.ops.polynomial import FeatureMap

    x = torch.randn(4, 7, dtype=torch.float64)
    a, b = FeatureMap(7, 3, sketch_dim=10, seed=5), FeatureMap(7, 3, sketch_dim=10, seed=5)
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), FeatureMap(7, 3, sketch_dim=10, seed=6)(x))
    assert a.dim == 1 + 7 + 10 + 10 and a(x).shape == (4, a.dim)
    torch.testing.assert_close(a(x.float()), a(x).float(), rtol=1e-5, atol=1e-5)  # same sketch in every dtype
    with pytest.raises(ValueError, match="sketch_dim"):
        FeatureMap(7, 2, sketch_dim=0)
