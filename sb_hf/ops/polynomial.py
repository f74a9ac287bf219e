"""The polynomial part of support-basis attention: one Chebyshev fit of ``exp`` and one feature map.

``exp(x - shift)`` on ``[-radius, radius]`` is interpolated at the Chebyshev nodes of degree ``g``
and written in the monomial basis of ``t = x / radius``:  ``p(x) = sum_m b_m t^m``.
Because ``radius`` and ``shift`` are per query, the coefficients are per query too; they only
scale the query-side features, so the factorization ``p(s q.k) = <phi_q(q), phi_k(k)>`` survives.

The feature map uses the symmetric (deduplicated) monomials of each degree ``m``:
``<phi_m(q), phi_m(k)> = (q . k)^m`` with ``C(d+m-1, m)`` features instead of ``d^m``.
:class:`FeatureMap` with a ``sketch_dim`` replaces each degree ``m >= 2`` block by a seeded random
sketch of ``r`` features whose inner product is an unbiased estimate of ``(q . k)^m``.

Two kernels (``KERNELS``): ``"chebyshev"`` is the fit above, signed like any polynomial (a row's
mass can go negative; such rows fall back to exact attention). ``"squared"`` fits ``exp(x / 2)`` at
half the degree and squares it, ``p(x) = (sum_m a_m t^m)^2``: non-negative for every pair by
construction. Its features are the symmetric squares of the half-degree features (the query-side
coefficients applied before squaring), so a sketched squared kernel stays non-negative too
(PolySketchFormer's construction): ``<sym2(a * psi(q)), sym2(psi(k))> = <a * psi(q), psi(k)>^2``.
``"taylor"`` is squared too, but centred where the scores are: ``exp(c) (1 + (x - c) / p)^p`` with
``p = degree`` and ``c`` the query's mean score over the keys it approximates (``center``), written
as the square of ``exp(c / 2) (1 + (x - c) / p)^(p / 2)``. Exact at ``x = c`` and close around it,
where most of a row's small scores lie; the symmetric fit spends its accuracy on the interval's ends.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

MAX_DEGREE = 12  # beyond this the monomial interpolation is numerically meaningless in fp32
KERNELS = ("chebyshev", "squared", "taylor")
DEFAULT_KERNEL = "taylor"  # the support-basis ops' and backends' default: non-negative, centred per query
AS23_KERNEL = "chebyshev"  # AS23a's default: the fit of exp it was published with
SQUARED_KERNELS = ("squared", "taylor")  # kernels that are the square of a half-degree polynomial


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


def kernel_fit(radius: torch.Tensor, shift: torch.Tensor, degree: int, kernel: str,
               center: torch.Tensor | None = None) -> torch.Tensor:
    """Coefficients in ``t = x / radius`` of the kernel that replaces ``exp(x - shift)``: the degree-``degree``
    fit (``"chebyshev"``); the degree-``degree / 2`` fit of ``exp((x - shift) / 2)`` whose square is the
    kernel (``"squared"``); or ``exp((c - shift) / 2) (1 + (x - c) / p)^(p / 2)``, ``p = degree``, whose
    square is the kernel (``"taylor"``, ``c = center``, the same shape as ``radius``; degree 0: the constant
    ``exp(c - shift)``)."""
    if kernel == "squared":
        return exp_fit_coefficients(radius / 2, shift / 2, degree // 2)
    if kernel == "taylor":
        if degree == 0:  # the limit p -> 0 is not the point; degree 0 is the constant exp(c) (1 feature)
            return torch.exp((center - shift) / 2)[..., None]
        half = degree // 2
        m = torch.arange(half + 1, device=radius.device, dtype=radius.dtype)
        binomial = torch.tensor([math.comb(half, j) for j in range(half + 1)], device=radius.device, dtype=radius.dtype)
        alpha = 1 - center / degree  # (1 + (x - c) / p) = alpha + x / p = alpha + (radius / p) t
        powers = alpha[..., None] ** (half - m) * (radius[..., None] / degree) ** m
        return torch.exp((center - shift) / 2)[..., None] * binomial * powers
    return exp_fit_coefficients(radius, shift, degree)


def kernel_on_scores(coefficients: torch.Tensor, t: torch.Tensor, kernel: str) -> torch.Tensor:
    """The kernel at ``t = x / radius`` from :func:`kernel_fit`'s coefficients (squared: ``>= 0`` exactly)."""
    values = evaluate_polynomial(coefficients, t)
    return values * values if kernel in SQUARED_KERNELS else values


def check_kernel(kernel: str, degrees: list[int]) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    lowest = 0 if kernel == "taylor" else 2  # taylor at degree 0: the constant exp(c), one feature
    if kernel in SQUARED_KERNELS and any(g < lowest or g % 2 for g in degrees):
        raise ValueError(f"the {kernel} kernel needs even degrees >= {lowest} (it squares a polynomial of half the "
                         f"degree), got {degrees!r}; use an even degree, or kernel='chebyshev' for any degree")


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


@functools.lru_cache(maxsize=None)
def _sketch_projections(head_dim: int, degree: int, sketch_dim: int, seed: int) -> torch.Tensor:
    """``degree`` independent Gaussian ``(head_dim, sketch_dim)`` matrices, float64, from ``seed``
    (a CPU generator, so every device and every run gets the same sketch)."""
    generator = torch.Generator().manual_seed(seed * 1009 + degree)
    return torch.randn(degree, head_dim, sketch_dim, generator=generator, dtype=torch.float64)


@dataclass(frozen=True)
class FeatureMap:
    """The feature map of the polynomial part. Its *base* features have degrees ``0..base_degree``:
    ``<psi(q), psi(k)>`` restricted to the degree-``m`` block is ``(q . k)^m`` exactly (``sketch_dim=None``:
    symmetric monomials), or an unbiased estimate of it (``sketch_dim=r``: for ``m >= 2``, the product
    of ``m`` independent Gaussian projections, ``prod_j (x G_j) / sqrt(r)``, a tensor sketch; degrees 0
    and 1 stay exact). ``kernel="chebyshev"``: the features are the base features (``base_degree =
    degree``); ``"squared"``/``"taylor"``: their symmetric square (``base_degree = degree / 2``), whose inner
    products are squares. Query-side coefficients are per base feature (``weights``).
    Seeded and deterministic: the same ``seed`` gives the same features on every call and device.
    Equal maps give equal features (the seed of an exact map is 0), so callers can compute them once."""

    head_dim: int
    degree: int
    sketch_dim: int | None = None
    seed: int = 0
    kernel: str = "chebyshev"

    def __post_init__(self) -> None:
        if self.sketch_dim is not None and (isinstance(self.sketch_dim, bool) or not isinstance(self.sketch_dim, int)
                                            or self.sketch_dim < 1):
            raise ValueError(f"sketch_dim must be a positive integer or None, got {self.sketch_dim!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"sketch_seed must be an integer >= 0, got {self.seed!r}")
        check_kernel(self.kernel, [self.degree])
        if self.sketch_dim is None:  # exact features have no seed: equal maps compute equal features
            object.__setattr__(self, "seed", 0)

    @property
    def base_degree(self) -> int:
        return self.degree // 2 if self.kernel in SQUARED_KERNELS else self.degree

    def block_dim(self, m: int) -> int:
        if m == 0:
            return 1
        if m == 1 or self.sketch_dim is None:
            return math.comb(self.head_dim + m - 1, m)
        return self.sketch_dim

    @property
    def base_dim(self) -> int:
        return sum(self.block_dim(m) for m in range(self.base_degree + 1))

    @property
    def dim(self) -> int:
        n = self.base_dim
        return n * (n + 1) // 2 if self.kernel in SQUARED_KERNELS else n

    def base_degrees(self, device=None) -> torch.Tensor:
        """The degree of every base feature, shape ``(base_dim,)``."""
        if self.sketch_dim is None:
            return feature_degrees(self.head_dim, self.base_degree).to(device)
        return torch.cat([torch.full((self.block_dim(m),), m, dtype=torch.long, device=device)
                          for m in range(self.base_degree + 1)])

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d) -> (..., base_dim)``."""
        if self.sketch_dim is None or self.base_degree < 2:
            return monomial_features(x, self.base_degree)
        parts = [monomial_features(x, 1)]
        for m in range(2, self.base_degree + 1):
            projections = _sketch_projections(self.head_dim, m, self.sketch_dim, self.seed).to(x.device, x.dtype)
            projected = torch.einsum("...d,jdr->...jr", x, projections)  # (..., m, r)
            parts.append(projected.prod(dim=-2) * self.sketch_dim**-0.5)
        return torch.cat(parts, dim=-1)

    def finish(self, base: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The features from base features (times the per-base-feature ``weights``): ``(..., dim)``."""
        if weights is not None:
            base = base * weights
        if self.kernel in SQUARED_KERNELS:
            if base.shape[-1] == 1:  # (the degree-0 taylor kernel: one feature, its square; a decoding step's fast path)
                return base * base
            index, weight = _monomials(base.shape[-1], 2)
            return base[..., index].prod(dim=-1) * weight.to(device=base.device, dtype=base.dtype)
        return base

    def __call__(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., d) -> (..., dim)``."""
        return self.finish(self.base(x), weights)


def base_features_per_map(feature_maps: list[FeatureMap], x: torch.Tensor) -> list[torch.Tensor]:
    """``[f.base(x) for f in feature_maps]``, each distinct map computed once (the buckets of a
    multi-threshold call usually share one exact map)."""
    computed: dict[FeatureMap, torch.Tensor] = {}
    for f in feature_maps:
        if f not in computed:
            computed[f] = f.base(x)
    return [computed[f] for f in feature_maps]


def polynomial_shift(exact_max: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per-row shift shared by the exact and the polynomial part.

    The exact scores are shifted by their maximum as in softmax; polynomial values reach at most
    about ``e^radius`` but are mostly near ``e^0``, so ``radius / 2`` keeps both ends inside fp32
    for radii up to about 170 (a fit on a wider interval is meaningless anyway).
    """
    return torch.maximum(exact_max, radius / 2)
