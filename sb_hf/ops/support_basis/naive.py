"""The naive, quadratic twins of support-basis attention: they define what :mod:`.chunk` computes fast.

Everything is explicit: the full score matrix, the full visibility mask, the exact/polynomial split per pair,
and the polynomial evaluated directly on the scores (no feature map, no chunks, no gathering, no prefix scans).
"""

from __future__ import annotations

import torch

from ..checks import check_dropped, check_inputs, compute_dtype
from ..masking import add_stats
from ..naive import dense_inputs
from ..partial import masked_softmax
from ..polynomial import AS23_KERNEL, DEFAULT_KERNEL, SQUARED_KERNELS, FeatureMap, kernel_fit, kernel_on_scores, polynomial_shift
from .keys import key_buckets, large_rows, structural_keys, suspect_rows
from .settings import RADIUS_FLOOR, RADIUS_LIMIT, Polynomial, Structure


def support_basis_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    threshold: float,
    degree: int,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    radius: float | None = None,
    chunk_size: int | None = None,
    max_feature_bytes: int | None = None,
    evaluation: str | None = None,
    sketch_dim: int | None = None,
    sketch_seed: int = 0,
    kernel: str = DEFAULT_KERNEL,
    radius_limit: float = RADIUS_LIMIT,
    sinks: int = 0,
    local_window: int = 0,
    column_queries: torch.Tensor | None = None,
    column_threshold: float | torch.Tensor | None = None,
    dropped_real_keys: torch.Tensor | None = None,
    stats: dict | None = None,
    return_weights: bool = False,
) -> torch.Tensor:
    """Support-basis attention computed densely. See :func:`sb_hf.ops.support_basis_attention`.

    With ``sketch_dim`` the polynomial kernel is the sketched one: the dense ``(Lq, Lk)`` matrix of
    ``sum_m b_m (s / R_i)^m <sketch_m(q_i), sketch_m(k_j)>`` with the same seeded sketch (squared
    elementwise for the squared kernels, whose ``b`` are half-degree polynomials).
    ``chunk_size``, ``max_feature_bytes`` and ``evaluation`` only concern the fast path and are ignored here;
    ``stats`` receives the same counts as the fast op, from the dense masks. With
    ``return_weights`` the normalized attention weights ``(B, Hq, Lq, Lk)`` are returned instead."""
    polynomial = Polynomial.single(threshold, degree, sketch_dim, sketch_seed=sketch_seed, kernel=kernel, radius=radius)
    structure = Structure(sinks, local_window, column_queries, column_threshold, radius_limit)
    return attention(q, k, v, polynomial, structure, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                     sliding_window=sliding_window, dropped_real_keys=dropped_real_keys, stats=stats,
                     return_weights=return_weights)


def multi_threshold_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    thresholds: list[float],
    degrees: int | list[int] = 2,
    sketch_dim: int | None | list[int | None] = None,
    sketch_seed: int = 0,
    kernel: str = DEFAULT_KERNEL,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    radius: float | None = None,
    radius_limit: float = RADIUS_LIMIT,
    chunk_size: int | None = None,
    max_feature_bytes: int | None = None,
    evaluation: str | None = None,
    sinks: int = 0,
    local_window: int = 0,
    column_queries: torch.Tensor | None = None,
    column_threshold: float | torch.Tensor | None = None,
    dropped_real_keys: torch.Tensor | None = None,
    stats: dict | None = None,
    return_weights: bool = False,
) -> torch.Tensor:
    """Multi-threshold support-basis attention computed densely. See :func:`sb_hf.ops.multi_threshold_attention`."""
    polynomial = Polynomial.buckets(thresholds, degrees, sketch_dim, sketch_seed=sketch_seed, kernel=kernel, radius=radius)
    structure = Structure(sinks, local_window, column_queries, column_threshold, radius_limit)
    return attention(q, k, v, polynomial, structure, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                     sliding_window=sliding_window, dropped_real_keys=dropped_real_keys, stats=stats,
                     return_weights=return_weights)


def attention(q, k, v, polynomial: Polynomial, structure: Structure, *, causal, scale, key_padding_mask, sliding_window,
              dropped_real_keys, stats, return_weights):
    """The twin with its settings as the typed objects."""
    shapes = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window,
                          scale=scale)
    check_dropped(dropped_real_keys, shapes.batch)
    structure.check(shapes, causal)
    thresholds, degrees, sketch_dims = polynomial.thresholds, polynomial.degrees, polynomial.sketch_dims
    threshold, kernel, radius, sketch_seed = polynomial.threshold, polynomial.kernel, polynomial.radius, polynomial.sketch_seed
    sinks, local_window, radius_limit = structure.sinks, structure.local_window, structure.radius_limit
    column_queries, column_threshold = structure.column_queries, structure.column_threshold
    out_dtype = q.dtype
    structural = structural_keys(  # on the KV heads, before _dense repeats them
        k.to(compute_dtype(k.dtype)),
        torch.ones(shapes.batch, shapes.kv_len, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask,
        sinks=sinks, column_queries=column_queries, column_threshold=column_threshold,
        scale=shapes.head_dim**-0.5 if scale is None else float(scale), dropped_real_keys=dropped_real_keys,
    ).repeat_interleave(shapes.groups, dim=1)
    q, k, v, scale, mask, key_valid = dense_inputs(q, k, v, shapes, scale, key_padding_mask, causal, sliding_window)

    q_large = large_rows(q, threshold)  # (B, H, Lq)
    exact_key = large_rows(k, threshold) | structural  # (B, H, Lk): exact for every query that sees them
    k_bucket = torch.where(key_valid[:, None, :] & ~exact_key, key_buckets(k, thresholds), -1)  # -1: exact or padding
    q_pos = torch.arange(shapes.q_len, device=q.device) + (shapes.kv_len - shapes.q_len)
    behind = q_pos[:, None] - torch.arange(shapes.kv_len, device=q.device)[None, :]
    local = (behind >= 0) & (behind < local_window)  # (Lq, Lk): p - local_window < j <= p
    far = mask & ~local  # the pairs the polynomial may cover
    scores = scale * q @ k.transpose(-1, -2)

    # Interval of query i for bucket b: scale * |q_i| * max |k_j| over the keys of bucket b visible to
    # it, so every score of the block lies inside, and a KV cache that only keeps the window agrees.
    k_norm = k.norm(dim=-1)[..., None, :].expand_as(scores)
    radii = []
    for b in range(len(thresholds)):
        in_bucket = far & (k_bucket == b)[..., None, :]
        k_max = torch.where(in_bucket, k_norm, torch.zeros_like(k_norm)).amax(dim=-1)
        radii.append(scale * q.norm(dim=-1) * k_max if radius is None else torch.full_like(k_max, float(radius)))
    row_radius = torch.stack(radii, dim=-1)
    if radius is None:
        row_radius = row_radius.clamp_min(RADIUS_FLOOR)
    q_large = q_large | (row_radius.amax(dim=-1) > radius_limit)  # too wide for the (calibrated) fit: exact
    row_radius = torch.where(q_large[..., None], torch.full_like(row_radius, RADIUS_FLOOR), row_radius)  # unused there
    exact_pair = q_large[..., :, None] | exact_key[..., None, :] | local

    exact_scores = torch.where(mask & exact_pair, scores, torch.full_like(scores, float("-inf")))
    shift = polynomial_shift(exact_scores.amax(dim=-1), row_radius.amax(dim=-1))
    # Each branch only sees the scores it is meant for, so no inf appears even where it is discarded
    # (an inf in a discarded branch of torch.where still turns gradients into NaN).
    exact_in = torch.where(mask & exact_pair, scores, shift[..., None].expand_as(scores))
    weights = torch.where(mask & exact_pair, torch.exp(exact_in - shift[..., None]), torch.zeros_like(scores))
    for b, (degree, sketch_dim) in enumerate(zip(degrees, sketch_dims)):
        block = mask & ~exact_pair & (k_bucket == b)[..., None, :]
        radius_b = row_radius[..., b]
        center_b = None
        if kernel == "taylor":  # the query's mean score over the visible keys of the bucket
            in_bucket = (far & (k_bucket == b)[..., None, :]).to(q.dtype)
            mean_key = (in_bucket @ k) / in_bucket.sum(dim=-1, keepdim=True).clamp_min(1)
            center_b = torch.where(q_large, torch.zeros_like(radius_b), scale * (q * mean_key).sum(dim=-1))
        coefficients = kernel_fit(radius_b, shift, degree, kernel, center_b)
        if sketch_dim is None:
            poly_in = torch.where(block, scores / radius_b[..., None], torch.zeros_like(scores))
            poly = kernel_on_scores(coefficients[..., None, :], poly_in, kernel)
        else:  # the kernel the sketch defines, as a dense matrix of per-degree inner products
            feature_map = FeatureMap(q.shape[-1], degree, sketch_dim, sketch_seed + b, kernel)
            degrees_b = feature_map.base_degrees(q.device)
            per_feature = coefficients[..., degrees_b] * (scale / radius_b[..., None]) ** degrees_b
            poly = (feature_map.base(q) * per_feature) @ feature_map.base(k).transpose(-1, -2)
            if kernel in SQUARED_KERNELS:
                poly = poly * poly
        weights = weights + torch.where(block, poly, torch.zeros_like(poly))
    den = weights.sum(dim=-1)
    out = (weights @ v) / torch.where(den > 0, den, torch.ones_like(den))[..., None]

    # Large query rows, and rows where the approximation broke down, are plain exact attention.
    exact_rows = q_large | suspect_rows(den, out, out_dtype)
    exact_weights = masked_softmax(scores, mask)
    if stats is not None:
        exact_pairs = mask & (exact_pair | exact_rows[..., None])
        add_stats(stats, exact_pairs=exact_pairs.sum(), pairs=mask.expand_as(exact_pairs).sum(),
                  exact_rows=exact_rows.sum(), rows=torch.tensor(exact_rows.numel(), device=q.device))
    if return_weights:
        approx = weights / torch.where(den > 0, den, torch.ones_like(den))[..., None]
        return torch.where(exact_rows[..., None], exact_weights, approx)
    out = torch.where(exact_rows[..., None], exact_weights @ v, out)
    return out.to(out_dtype)


def as23_attention(q, k, v, *, degree: int, causal: bool = True, scale: float | None = None, kernel: str = AS23_KERNEL,
                   **kwargs) -> torch.Tensor:
    """AS23a (bounded entries): the polynomial everywhere, no exact part."""
    return support_basis_attention(q, k, v, threshold=float("inf"), degree=degree, causal=causal, scale=scale, kernel=kernel,
                                   **kwargs)
