"""The polynomial part of support-basis attention: one Chebyshev fit of ``exp`` and one feature map.

``exp(x - shift)`` on ``[-radius, radius]`` is interpolated at the Chebyshev nodes of degree ``g``
and written in the monomial basis of ``t = x / radius``:  ``p(x) = sum_m b_m t^m``.
Because ``radius`` and ``shift`` are per query, the coefficients are per query too; they only
scale the query-side features, so the factorization ``p(s q.k) = <phi_q(q), phi_k(k)>`` survives.

The feature map uses the symmetric (deduplicated) monomials of each degree ``m``:
``<phi_m(q), phi_m(k)> = (q . k)^m`` with ``C(d+m-1, m)`` features instead of ``d^m``.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

MAX_DEGREE = 12  # beyond this the monomial interpolation is numerically meaningless in fp32


@functools.lru_cache(maxsize=None)
def _inverse_vandermonde(degree: int) -> torch.Tensor:
    """``V^-1`` for ``V[n, m] = t_n^m`` at the ``degree + 1`` Chebyshev nodes, in float64."""
    n = torch.arange(degree + 1, dtype=torch.float64)
    nodes = torch.cos((2 * n + 1) * math.pi / (2 * (degree + 1)))
    vandermonde = nodes[:, None] ** torch.arange(degree + 1, dtype=torch.float64)[None, :]
    return torch.linalg.inv(vandermonde), nodes


def exp_fit_coefficients(radius: torch.Tensor, shift: torch.Tensor, degree: int) -> torch.Tensor:
    """Coefficients ``b`` (shape ``radius.shape + (degree + 1,)``) with
    ``exp(x - shift) ~ sum_m b_m (x / radius)^m`` for ``x`` in ``[-radius, radius]``.

    The shift is applied inside the exponential, so the coefficients stay finite however large
    ``radius`` is, as long as ``radius - shift`` does not overflow.
    """
    inverse, nodes = _inverse_vandermonde(degree)
    inverse = inverse.to(device=radius.device, dtype=radius.dtype)
    nodes = nodes.to(device=radius.device, dtype=radius.dtype)
    values = torch.exp(radius[..., None] * nodes - shift[..., None])
    return values @ inverse.T


def evaluate_polynomial(coefficients: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``sum_m coefficients[..., m] * t^m`` by Horner's rule (``coefficients`` broadcast against ``t``)."""
    result = torch.zeros_like(t) + coefficients[..., -1]
    for m in range(coefficients.shape[-1] - 2, -1, -1):
        result = result * t + coefficients[..., m]
    return result


def feature_dim(head_dim: int, degree: int) -> int:
    """Number of features of the degree-``<= degree`` symmetric monomial map: ``sum_m C(d+m-1, m)``."""
    return sum(math.comb(head_dim + m - 1, m) for m in range(degree + 1))


@functools.lru_cache(maxsize=None)
def _monomials(head_dim: int, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tuples ``i1 <= ... <= im`` of degree ``degree`` and ``sqrt(multinomial coefficient)``."""
    combos = list(itertools.combinations_with_replacement(range(head_dim), degree))
    weights = []
    for combo in combos:
        counts = [combo.count(i) for i in set(combo)]
        multinomial = math.factorial(degree) // math.prod(math.factorial(c) for c in counts)
        weights.append(math.sqrt(multinomial))
    return torch.tensor(combos, dtype=torch.long), torch.tensor(weights, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def feature_degrees(head_dim: int, degree: int) -> torch.Tensor:
    """The degree of every feature of :func:`monomial_features`, shape ``(feature_dim,)``."""
    return torch.cat(
        [torch.full((math.comb(head_dim + m - 1, m),), m, dtype=torch.long) for m in range(degree + 1)]
    )


def monomial_features(x: torch.Tensor, degree: int) -> torch.Tensor:
    """Features of all degrees ``0..degree``: ``(..., d) -> (..., feature_dim(d, degree))``.

    ``<monomial_features(q), monomial_features(k)>`` restricted to the degree-``m`` block is ``(q . k)^m``.
    """
    parts = [x.new_ones(*x.shape[:-1], 1)]
    for m in range(1, degree + 1):
        index, weight = _monomials(x.shape[-1], m)
        index = index.to(x.device)
        weight = weight.to(device=x.device, dtype=x.dtype)
        parts.append(x[..., index].prod(dim=-1) * weight)
    return torch.cat(parts, dim=-1)
