"""The settings of support-basis attention, as the typed objects the op, its twin and the decoding step share.

- :class:`Polynomial`: what replaces ``exp`` on the far pairs (thresholds and buckets, degrees, sketches, the
  kernel, the interval); one decoding state holds sums for one polynomial.
- :class:`Structure`: the exact support beside the large rows (sinks, the local band, key columns) and the
  radius guard; :class:`Units` holds one structure per unit (KV head or query head) of a decoding step.
Windows are named as in :mod:`sb_hf.ops.masking`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import Shapes
from ..polynomial import DEFAULT_KERNEL, MAX_DEGREE, FeatureMap, check_kernel

RADIUS_FLOOR = 1.0  # below this the fit is done on [-1, 1]: still covers every score, and stays well conditioned
# Query rows whose interval is wider than this are computed exactly: a polynomial of any usable
# degree is meaningless there, and exp(radius / 2) would overflow fp32 past about 176.
RADIUS_LIMIT = 150.0
DEFAULT_MAX_FEATURE_BYTES = 8 * 2**30
EVALUATIONS = ("auto", "features", "scores")
EVERY_KEY = 2**62  # a local window that covers every key: a unit computed exactly


def check_buckets(thresholds, degrees, sketch_dims) -> tuple[list[float], list[int], list[int | None]]:
    """Validate multi-threshold settings; ``degrees``/``sketch_dims`` may be one value for every bucket."""
    given = thresholds if isinstance(thresholds, (list, tuple)) else [thresholds]
    try:
        thresholds = [float(t) for t in given]
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be a non-empty list of numbers >= 0, got {given!r}") from None
    if not thresholds or any(not t >= 0 for t in thresholds):
        raise ValueError(f"thresholds must be a non-empty list of numbers >= 0, got {thresholds!r}")
    if any(a <= b for a, b in zip(thresholds, thresholds[1:])):
        raise ValueError(f"thresholds must be strictly decreasing (T1 > T2 > ...), got {thresholds!r}")
    m = len(thresholds)
    degrees = list(degrees) if isinstance(degrees, (list, tuple)) else [degrees] * m
    sketch_dims = list(sketch_dims) if isinstance(sketch_dims, (list, tuple)) else [sketch_dims] * m
    if len(degrees) != m or len(sketch_dims) != m:
        raise ValueError(f"give one degree and one sketch_dim per threshold ({m}), or one for all; "
                         f"got degrees={degrees!r}, sketch_dims={sketch_dims!r}")
    for degree in degrees:
        if not isinstance(degree, int) or isinstance(degree, bool) or not 0 <= degree <= MAX_DEGREE:
            raise ValueError(f"degree must be an integer in [0, {MAX_DEGREE}], got {degree!r}")
    return thresholds, degrees, sketch_dims


@dataclass(frozen=True)
class Polynomial:
    """The polynomial part: thresholds ``T1 > T2 > ...`` (a row with an entry above ``T1`` is large, computed
    exactly; the other keys fall in buckets between the thresholds), per bucket a degree and a sketch dimension
    (None: exact monomial features; bucket ``b`` sketched with seed ``sketch_seed + b``), the kernel
    (:mod:`sb_hf.ops.polynomial`), and the interval of the fit (``radius`` None: per query row). Validated."""

    thresholds: tuple[float, ...]
    degrees: tuple[int, ...]
    sketch_dims: tuple[int | None, ...]
    sketch_seed: int = 0
    kernel: str = DEFAULT_KERNEL
    radius: float | None = None

    def __post_init__(self):
        check_buckets(list(self.thresholds), list(self.degrees), list(self.sketch_dims))
        check_kernel(self.kernel, list(self.degrees))
        radius = self.radius
        if radius is not None and (isinstance(radius, bool) or not 0 < radius < RADIUS_LIMIT):
            raise ValueError(f"radius must be a number in (0, {RADIUS_LIMIT}) or None, got {radius!r}")

    @classmethod
    def single(cls, threshold: float, degree: int, sketch_dim: int | None = None, **rest) -> "Polynomial":
        """One threshold (:func:`sb_hf.ops.support_basis_attention`'s settings)."""
        if not threshold >= 0:  # also rejects NaN (the degree is checked with the buckets, by __post_init__)
            raise ValueError(f"threshold must be >= 0 (0: every row exact, inf: no row exact), got {threshold}")
        return cls((float(threshold),), (degree,), (sketch_dim,), **rest)

    @classmethod
    def buckets(cls, thresholds, degrees, sketch_dims, **rest) -> "Polynomial":
        """Several thresholds; ``degrees`` and ``sketch_dims`` one per bucket or one for all."""
        thresholds, degrees, sketch_dims = check_buckets(thresholds, degrees, sketch_dims)
        return cls(tuple(thresholds), tuple(degrees), tuple(sketch_dims), **rest)

    @property
    def threshold(self) -> float:
        """The largest threshold: rows above it are exact."""
        return self.thresholds[0]

    def feature_maps(self, head_dim: int) -> list[FeatureMap]:
        """One feature map per bucket."""
        return [FeatureMap(head_dim, g, r, self.sketch_seed + b, self.kernel)
                for b, (g, r) in enumerate(zip(self.degrees, self.sketch_dims))]


@dataclass(frozen=True, eq=False)
class Structure:
    """The exact support of a call beside its large rows: the first ``sinks`` real keys, the local band of width
    ``local_window``, the key columns (keys whose score with a head's mean query ``column_queries (q_heads, d)``
    exceeds ``column_threshold``, a number or one per query head); and the radius guard: rows whose interval is
    wider than ``radius_limit`` are exact."""

    sinks: int = 0
    local_window: int = 0
    column_queries: torch.Tensor | None = None
    column_threshold: float | torch.Tensor | None = None
    radius_limit: float = RADIUS_LIMIT

    def check(self, shapes: Shapes, causal: bool) -> None:
        """Raise ``ValueError`` naming the field that does not fit these inputs."""
        radius_limit = self.radius_limit
        if isinstance(radius_limit, bool) or not isinstance(radius_limit, (int, float)) or not 0 < radius_limit <= RADIUS_LIMIT:
            raise ValueError(f"radius_limit must be a number in (0, {RADIUS_LIMIT}], got {radius_limit!r}")
        for name, value in (("sinks", self.sinks), ("local_window", self.local_window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0: none), got {value!r}")
        if self.local_window and not causal:
            raise ValueError("local_window (exact keys p - local_window < j <= p) needs causal=True; use local_window=0")
        if self.column_queries is None:
            if self.column_threshold is not None:
                raise ValueError("column_threshold needs column_queries (the per-head mean queries); give both or neither")
            return
        column_queries, column_threshold = self.column_queries, self.column_threshold
        if not isinstance(column_queries, torch.Tensor) or not column_queries.is_floating_point() or (
            tuple(column_queries.shape) != (shapes.q_heads, shapes.head_dim)
        ):
            raise ValueError(
                f"column_queries must be a float tensor (q_heads, head_dim) = {(shapes.q_heads, shapes.head_dim)}, got "
                f"{getattr(column_queries, 'dtype', type(column_queries))} {tuple(getattr(column_queries, 'shape', ()))}"
            )
        threshold = column_threshold if isinstance(column_threshold, torch.Tensor) else torch.tensor(
            column_threshold if isinstance(column_threshold, (int, float)) and not isinstance(column_threshold, bool) else float("nan"))
        if threshold.shape not in ((), (shapes.q_heads,)) or not bool(torch.isfinite(threshold).all()):
            raise ValueError(f"column_threshold must be a finite number or a tensor of one per query head ({shapes.q_heads},), "
                             f"got {column_threshold!r}")
        if not bool(torch.isfinite(column_queries).all()):
            raise ValueError("column_queries contains NaN or inf")


@dataclass
class Units:
    """The structure of each unit of a decoding step (one entry per unit, units in head order).

    ``per_kv_head`` units per KV head: 1 (a KV head with its query heads, which share its exact keys) or the
    query heads per KV head (one unit per query head). ``column_queries (q_heads, d)`` and ``column_threshold
    (q_heads,)``: each query head's mean query and threshold (``inf`` for a head without key columns)."""

    per_kv_head: int
    local_windows: list[int]
    sinks: list[int]
    radius_limits: list[float]
    column_queries: torch.Tensor | None = None
    column_threshold: torch.Tensor | None = None

    @classmethod
    def shared(cls, kv_heads: int, q_heads: int, structure: Structure) -> "Units":
        """One structure for every KV head (the op's arguments)."""
        s, column_threshold = structure, structure.column_threshold
        if s.column_queries is not None:
            column_threshold = torch.as_tensor(column_threshold, dtype=s.column_queries.dtype,
                                               device=s.column_queries.device).expand(q_heads)
        return cls(1, [s.local_window] * kv_heads, [s.sinks] * kv_heads, [s.radius_limit] * kv_heads, s.column_queries,
                   column_threshold)

    def key(self) -> tuple:
        return (self.per_kv_head, tuple(self.local_windows), tuple(self.sinks), tuple(self.radius_limits),
                self.column_queries, self.column_threshold)


def estimate_feature_bytes(
    shapes: Shapes, feature_maps: list[FeatureMap], chunk_size: int, windowed: bool, requires_grad: bool, dtype: torch.dtype
) -> int:
    """Rough peak bytes of the polynomial part: running states, chunk features, and for backward the
    states each chunk starts from (all else is recomputed chunk by chunk)."""
    s = shapes
    r = sum(f.dim for f in feature_maps)
    item = 8 if dtype == torch.float64 else 4
    states = (4 if windowed else 2) * s.batch * s.kv_heads * r * (s.value_dim + 1)
    chunk = 2 * (s.batch * s.q_heads + 3 * s.batch * s.kv_heads) * min(chunk_size, s.kv_len) * r
    total = states + chunk
    if requires_grad:
        chunks = math.ceil(s.kv_len / chunk_size)
        total += chunks * (2 if windowed else 1) * s.batch * s.kv_heads * r * (s.value_dim + 1)
    return total * item


def check_memory(shapes, feature_maps, chunk_size, sliding_window, requires_grad, max_feature_bytes, dtype) -> None:
    """Raise ``ValueError`` (with the estimate and what to change) when the feature form would need more than
    ``max_feature_bytes``."""
    need = estimate_feature_bytes(shapes, feature_maps, chunk_size, sliding_window is not None, requires_grad, dtype)
    if need > max_feature_bytes:
        r, degree = sum(f.dim for f in feature_maps), max(f.degree for f in feature_maps)
        raise ValueError(
            f"degree {degree} with head_dim {shapes.head_dim} has {r} features per row; the polynomial part would "
            f"need about {need / 2**30:.2f} GiB (max_feature_bytes={max_feature_bytes / 2**30:.2f} GiB). "
            "Lower the degree, the chunk_size or the batch, sketch the features (sketch_dim), or raise max_feature_bytes."
        )
