"""Support-basis attention (arXiv 2510.01643, single threshold), the fast path.

Split the rows: a query/key row is *large* when one of its entries exceeds the threshold.
- Exact part: large query rows attend to every visible key exactly; small queries attend
  exactly to the (few) large keys, gathered into a dense block.
- Polynomial part: the remaining small-small pairs get ``exp`` replaced by a Chebyshev fit on
  the interval their scores can occupy, factorized through monomial features, so the causal sum
  is a running state (linear attention), computed chunk by chunk. Never an ``n x n`` matrix.
  When there are fewer query rows than features (decoding, short prompts), the same polynomial
  is cheaper evaluated on the scores of each query chunk (``Lq x Lk x d`` instead of
  ``Lk x features x d``); ``evaluation`` picks the form, the result is the same.
Both parts share a per-row shift; the output is their summed numerators over their summed masses.
- Structure (optional): sinks and key columns join the large keys in the gathered exact block; a local
  window is an exact band computed apart, the two parts above then lag it (they run in a frame shifted
  by the window) and the band is merged with them by log-sum-exp.
``sb_hf.ops.reference.support_basis_attention`` is the quadratic twin that defines the result.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import torch
import torch.utils.checkpoint

from .common import (
    RADIUS_FLOOR,
    check_buckets,
    key_buckets,
    RADIUS_LIMIT,
    Shapes,
    add_stats,
    check_finite_inputs,
    check_inputs,
    check_structure,
    compute_dtype,
    group_matmul,
    key_spans,
    large_rows,
    masked_exp,
    masked_softmax,
    polynomial_shift,
    span_counts,
    structural_keys,
    suspect_rows,
    visible,
    visible_key_max,
    visible_key_sums,
)
from .polynomial import (AS23_KERNEL, DEFAULT_KERNEL, FeatureMap, base_features_per_map, check_kernel, kernel_fit,
                         kernel_on_scores)

if TYPE_CHECKING:
    from .decoding import DecodingState

DEFAULT_CHUNK_SIZE = 64  # the feature scan (many features per row); chosen by measurement (benchmarks/op_scaling.py)
BAND_BLOCK_SIZE = 256  # query rows per block of the exact local band (a (c, c + window) block); by measurement
FUSED_BAND_BLOCK_SIZE = 64  # the same in the fused kernel, where many blocks share a call; by measurement
PREFIX_BLOCK_SIZE = 2048  # query rows per block of the prefix scan (few features: the exact keys dominate); by measurement
DEFAULT_MAX_FEATURE_BYTES = 8 * 2**30
FUSED_BIAS_BYTES = 64 * 2**20  # bound on the separately masked blocks of one fused band call
BALANCED_CAUSAL_MIN_ROWS = 512  # from this length on, a causal call over too few heads for the threads runs halved
EXACT_ROW_BLOCK = 128  # gathered exact query rows handled per block: bounds the (rows x keys) score block
EVALUATIONS = ("auto", "features", "scores")
PREFIX_FEATURES = 4  # up to this many features per row (degree 0: one per bucket) the causal sums are prefix sums


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
    max_feature_bytes: int = DEFAULT_MAX_FEATURE_BYTES,
    evaluation: str = "auto",
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
    decoding_state: "DecodingState | None" = None,
) -> torch.Tensor:
    """Support-basis attention of ``q (B, Hq, Lq, d)`` over ``k, v (B, Hk, Lk, d)``, returns ``(B, Hq, Lq, dv)``.

    Args:
        threshold: a row is large (exact) when any ``|entry| > threshold``; 0: all exact, inf: none (AS23a).
        degree: degree of the polynomial that replaces ``exp`` on small-small pairs.
        causal: causal mask, queries aligned to the last ``Lq`` key positions (KV-cache style).
        scale: score scale, default ``1/sqrt(d)``.
        key_padding_mask: ``(B, Lk)`` bool, True for real keys; padded keys never influence anything.
        sliding_window: with ``causal``, query ``p`` sees keys ``p - sliding_window < j <= p``.
        radius: fixed interval ``[-radius, radius]`` for the fit; default (None): per query,
            ``scale * |q_i| * max |k_j|`` over the small real keys visible to it, floored at 1.
        chunk_size: block length of every chunked loop (the causal scan, the local band, exact rows); None:
            each loop's own default, chosen by measurement (64 for the feature scan, 256 for the band, 512
            for the prefix scan of degree 0). The result does not depend on it beyond rounding.
        max_feature_bytes: refuse (ValueError with the estimate) when the feature form would need more.
        evaluation: ``"features"``: the factorized form (time and memory linear in ``Lk``);
            ``"scores"``: the polynomial on the scores, query chunk by query chunk (``Lq x Lk``);
            ``"auto"``: scores when ``Lq`` is below the feature dimension (decoding), else features.
        sketch_dim: None: exact monomial features; ``r``: each degree >= 2 block sketched to ``r``
            features (:class:`sb_hf.ops.polynomial.FeatureMap`), an unbiased estimate of the
            polynomial kernel; then always the feature form. ``sketch_seed`` fixes the sketch.
        kernel: ``"taylor"`` (the default, as the transformers backend's): ``exp(c) (1 + (x - c) / degree)^degree``
            with ``c`` the query's mean score over the small keys it sees, the square of a half-degree
            polynomial, so non-negative for every pair (``degree`` even, 0 included); ``"squared"``: the square
            of the degree-``degree / 2`` fit of ``exp(x / 2)``, non-negative too, sketched or not (``degree``
            even; see :mod:`sb_hf.ops.polynomial`); ``"chebyshev"``: the degree-``degree`` fit of ``exp``, any
            degree, signed (a row's outputs can leave the range of the values; AS23a's default).
        radius_limit: query rows whose interval (any bucket) is wider than this are computed exactly:
            the guard against inputs outside the calibrated range (``sb-hf calibrate`` sets it per
            layer); at most and by default 150, beyond which no fit is meaningful.
        sinks: the first ``sinks`` real keys (rank among keys with ``key_padding_mask`` True, after
            ``dropped_real_keys``, the real keys a sliding-window cache no longer holds) are exact for every query.
        local_window: with ``causal``, query ``p`` attends exactly to the keys ``p - local_window < j <= p``;
            the polynomial part then covers only the keys ``j <= p - local_window`` (it lags the window).
        column_queries: ``(q_heads, head_dim)``, a mean query per head (``sb-hf calibrate`` measures it):
            keys with ``scale * column_queries[h] . k_j > column_threshold`` for some query head ``h`` of
            their KV group are exact for every query (the keys that collect attention everywhere).
        column_threshold: a number, or a tensor with one per query head.
        stats: optional dict; receives tensors ``exact_pairs``, ``pairs``, ``exact_rows``, ``rows``.
        decoding_state: a :class:`sb_hf.ops.decoding.DecodingState` passed to every call of one sequence of
            decoding steps: single-query causal inference steps then take the far part from its running sums
            (cost independent of the context length), the result the same up to rounding; other calls leave it alone.

    Rows whose approximate mass is not positive, or whose output is not finite, are recomputed
    exactly (see :func:`sb_hf.ops.common.suspect_rows`). Computation runs in fp32 (fp64 for fp64).
    """
    return _attention(
        q, k, v, thresholds=[threshold], degrees=[degree], sketch_dims=[sketch_dim], sketch_seed=sketch_seed,
        kernel=kernel, causal=causal, scale=scale, key_padding_mask=key_padding_mask, sliding_window=sliding_window, radius=radius,
        radius_limit=radius_limit, chunk_size=chunk_size, max_feature_bytes=max_feature_bytes, evaluation=evaluation,
        sinks=sinks, local_window=local_window, column_queries=column_queries, column_threshold=column_threshold,
        dropped_real_keys=dropped_real_keys, stats=stats, decoding_state=decoding_state,
    )


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
    max_feature_bytes: int = DEFAULT_MAX_FEATURE_BYTES,
    evaluation: str = "auto",
    sinks: int = 0,
    local_window: int = 0,
    column_queries: torch.Tensor | None = None,
    column_threshold: float | torch.Tensor | None = None,
    dropped_real_keys: torch.Tensor | None = None,
    stats: dict | None = None,
    decoding_state: "DecodingState | None" = None,
) -> torch.Tensor:
    """Multi-threshold support-basis attention: thresholds ``T1 > T2 > ... > Tm``.

    Rows with an entry above ``T1`` are exact, as in :func:`support_basis_attention`. The other keys
    fall into buckets by their largest entry (``(T2, T1]``, ``(T3, T2]``, ..., ``[0, Tm]``); the
    small-query x bucket-``b`` block gets its own polynomial of degree ``degrees[b]`` on its own
    interval ``R_ib = scale |q_i| max |k_j|`` over the visible keys of bucket ``b`` (narrower for the
    smaller buckets), with features sketched to ``sketch_dim[b]`` (seed ``sketch_seed + b``). The
    attention is the exact part plus the sum of the buckets' polynomial attentions, over the sum of
    their masses. One threshold is :func:`support_basis_attention`. ``radius`` (fixed interval)
    and ``kernel`` apply to every bucket.
    """
    thresholds, degrees, sketch_dims = check_buckets(thresholds, degrees, sketch_dim)
    return _attention(
        q, k, v, thresholds=thresholds, degrees=degrees, sketch_dims=sketch_dims, sketch_seed=sketch_seed,
        kernel=kernel, causal=causal, scale=scale, key_padding_mask=key_padding_mask, sliding_window=sliding_window, radius=radius,
        radius_limit=radius_limit, chunk_size=chunk_size, max_feature_bytes=max_feature_bytes, evaluation=evaluation,
        sinks=sinks, local_window=local_window, column_queries=column_queries, column_threshold=column_threshold,
        dropped_real_keys=dropped_real_keys, stats=stats, decoding_state=decoding_state,
    )


def _attention(q, k, v, *, thresholds, degrees, sketch_dims, sketch_seed, kernel, causal, scale, key_padding_mask,
               sliding_window, radius, radius_limit, chunk_size, max_feature_bytes, evaluation, sinks, local_window,
               column_queries, column_threshold, dropped_real_keys, stats, decoding_state):
    threshold = thresholds[0]
    shapes = check_inputs(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window,
        degree=max(degrees), threshold=threshold, scale=scale, radius=radius, radius_limit=radius_limit,
        check_finite=False,  # below: a decoding step checks only the keys no earlier step checked
    )
    check_structure(sinks, local_window, column_queries, column_threshold, causal, shapes, dropped_real_keys)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None (the measured defaults), got {chunk_size!r}")
    scan_chunk = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
    check_kernel(kernel, degrees)
    feature_maps = [FeatureMap(shapes.head_dim, g, r, sketch_seed + b, kernel)
                    for b, (g, r) in enumerate(zip(degrees, sketch_dims))]
    sketched = any(r is not None for r in sketch_dims)
    if sketched and evaluation == "scores":
        raise ValueError("a sketched kernel is not a function of the scores: use evaluation='features' or 'auto'")
    requested_evaluation = evaluation
    if evaluation == "auto":
        evaluation = "scores" if not sketched and shapes.q_len < sum(f.dim for f in feature_maps) else "features"
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))  # training: see _step
    if evaluation == "features":
        check_memory(shapes, feature_maps, scan_chunk, sliding_window, recompute, max_feature_bytes, q.dtype)

    out_dtype = q.dtype
    compute = compute_dtype(q.dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scale = shapes.head_dim**-0.5 if scale is None else float(scale)
    s = shapes
    offset = s.kv_len - s.q_len  # key position of query 0
    window = sliding_window if (causal and sliding_window is not None and sliding_window < s.kv_len) else None

    qg = q.view(s.batch, s.kv_heads, s.groups, s.q_len, s.head_dim)  # query head h = kv_head * groups + g
    key_valid = (
        torch.ones(s.batch, s.kv_len, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    )
    if decoding_state is not None:  # a decoding step takes the far part from the state's running sums
        from .decoding import Units  # (decoding builds on this module)

        core = dict(thresholds=thresholds, degrees=degrees, sketch_dims=sketch_dims, sketch_seed=sketch_seed, kernel=kernel,
                    radius=radius, scale=scale)
        units = Units.shared(s.kv_heads, s.q_heads, local_window=local_window, sinks=sinks, radius_limit=radius_limit,
                             column_queries=column_queries, column_threshold=column_threshold)
        if decoding_state.serves(shapes, compute, q.device, core, units, causal=causal, window=window, recompute=recompute,
                                 dropped_real_keys=dropped_real_keys, evaluation=requested_evaluation):
            out = decoding_state.step(qg, k, v, key_valid, padded=key_padding_mask is not None, stats=stats,
                                      out_dtype=out_dtype)
            return out.reshape(s.batch, s.q_heads, s.q_len, s.value_dim).to(out_dtype)
    check_finite_inputs(q, k, v)
    if decoding_state is not None:
        decoding_state.checked_keys = s.kv_len
    # Every row exact (threshold 0, or every interval at least as wide as the limit allows): without padding,
    # where each row sees a key, that is plain attention.
    every_row_exact = threshold == 0 or (RADIUS_FLOOR if radius is None else radius) > radius_limit
    if every_row_exact and key_padding_mask is None:
        if stats is not None:
            rows = torch.ones(s.batch, s.kv_heads, s.groups, s.q_len, dtype=torch.bool, device=q.device)
            _count_pairs(stats, rows, torch.zeros_like(k[..., 0], dtype=torch.bool), key_valid, causal, window, local_window)
        out = _plain_attention(qg, k, v, scale, causal, window, offset, recompute)
        return out.reshape(s.batch, s.q_heads, s.q_len, s.value_dim).to(out_dtype)
    q_large = large_rows(qg, threshold)  # (B, Hk, G, Lq)
    if every_row_exact:
        q_large = torch.ones_like(q_large)  # (rows without far keys too, which skip the far part)
    lag = local_window
    rows_shape = (s.batch, s.kv_heads, s.groups, s.q_len)
    num, den = qg.new_zeros(*rows_shape, s.value_dim), qg.new_zeros(rows_shape)
    shift = qg.new_full(rows_shape, float("-inf"))
    settings = dict(thresholds=thresholds, feature_maps=feature_maps, kernel=kernel, scale=scale, radius=radius,
                    radius_limit=radius_limit)
    structure = dict(sinks=sinks, column_queries=column_queries, column_threshold=column_threshold, scale=scale)
    exact_keys, k_bucket = split_keys(k, key_valid, thresholds, dropped_real_keys=dropped_real_keys, **structure)
    # The far part (exact keys + polynomial) covers the keys j <= p - local_window: it runs in a frame lagged
    # by the window, where query i sits at p - local_window and only the first kv_len - local_window keys exist.
    first = min(max(lag - offset, 0), s.q_len) if lag else 0  # earlier queries have no far key
    far_window = None if window is None else window - lag
    far_keys = s.kv_len - lag
    if first < s.q_len and (far_window is None or far_window > 0) and not bool(q_large[..., first:].all()):
        far_large, far_num, far_den, far_shift = _far_part(
            qg[..., first:, :], k[:, :, :far_keys], v[:, :, :far_keys], k_bucket[..., :far_keys],
            exact_keys[..., :far_keys], q_large[..., first:], offset - lag + first, far_window, causal=causal,
            evaluation=evaluation, chunk_size=chunk_size, recompute=recompute, **settings,
        )
        q_large = torch.cat([q_large[..., :first], far_large], dim=-1)
        num, den = torch.cat([num[..., :first, :], far_num], dim=-2), torch.cat([den[..., :first], far_den], dim=-1)
        shift = torch.cat([shift[..., :first], far_shift], dim=-1)
    band = None
    if lag:
        band = _local_band(qg, k, v, key_valid, scale, lag, window, offset, chunk_size, recompute,
                           padded=key_padding_mask is not None)
    out, exact_rows = _combine(qg, k, v, key_valid, (num, den, shift), band, q_large, scale=scale, causal=causal,
                               window=window, offset=offset, recompute=recompute, out_dtype=out_dtype)
    if stats is not None:
        _count_pairs(stats, exact_rows, exact_keys, key_valid, causal, window, lag)
    return out.reshape(s.batch, s.q_heads, s.q_len, s.value_dim).to(out_dtype)


def _plain_attention(qg, k, v, scale, causal, window, offset, recompute):
    """Softmax attention of every row of ``qg (B, Hk, G, Lq, d)`` in PyTorch's SDPA (fused kernels on CPU and CUDA;
    a prompt's causal call on CPU through :func:`_fused_causal`, which keeps every thread busy), queries at key
    positions ``offset + i``: ``(B, Hk, G, Lq, dv)``. Every row must see a key (no padding)."""
    batch, kv_heads, groups, q_len, d = qg.shape
    mask = None
    if causal and (window is not None or offset):
        mask = visible(torch.arange(q_len, device=qg.device) + offset, torch.arange(k.shape[2], device=k.device),
                       causal=True, sliding_window=window)
    elif causal and not recompute and _fused_attention_available(qg, v):  # (a prompt's causal call kept busy on every thread)
        num, den, _ = _fused_causal(qg, k, v, scale)
        return num / den[..., None]
    out = torch.nn.functional.scaled_dot_product_attention(
        qg.reshape(batch, kv_heads * groups, q_len, d), k, v, attn_mask=mask, is_causal=causal and mask is None,
        scale=scale, enable_gqa=True)
    return out.view(batch, kv_heads, groups, q_len, -1)


def _combine(qg, k, v, key_valid, far, band, q_large, *, scale, causal, window, offset, recompute, out_dtype):
    """The output from the far part ``(num, den, shift)`` and the local band (or None), with the large query
    rows and the rows whose approximation broke down (:func:`sb_hf.ops.common.suspect_rows`) computed exactly
    over every visible key. Returns ``(out, exact_rows)``."""
    num, den, shift = far
    if band is not None:
        num, den = _merge(far, band)
    out = num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    exact_rows = q_large | suspect_rows(den, out, out_dtype)
    return _exact_rows(qg, k, v, out, exact_rows, scale, causal, window, key_valid, offset, recompute), exact_rows


def _far_part(qg, k, v, k_bucket, exact_keys, q_large, offset, window, *, thresholds, feature_maps, kernel, scale, causal,
              radius, radius_limit, evaluation, chunk_size, recompute):
    """The exact keys plus each bucket's polynomial, for the rows of ``qg`` over the keys ``k``, ``v``
    (queries at positions ``offset + i``). Returns ``q_large`` (with the rows the guard sends to the exact
    path), and per row the numerator, the mass and the shift they are taken relative to."""
    buckets = range(len(thresholds))
    key_norm_max = None
    if radius is None:  # per bucket: max |k_j| over the visible keys of the bucket
        k_norm = k.norm(dim=-1)
        norms = [torch.where(k_bucket == b, k_norm, torch.zeros_like(k_norm)) for b in buckets]
        norms = [visible_key_max(n, window)[..., offset:] if causal else n.amax(-1, keepdim=True) for n in norms]
        key_norm_max = torch.stack(norms, dim=-1)[:, :, None]  # (B, Hk, 1, Lq or 1, m)
    centers = _row_centers(qg, k, k_bucket, len(thresholds), scale, causal, window, offset) if kernel == "taylor" else None
    q_large, row_fit = _fit_rows(qg, q_large, key_norm_max, centers, len(thresholds), scale=scale, radius=radius, radius_limit=radius_limit)
    exact = _gather_rows(exact_keys, (k, v))
    rows = _RowAttention(scale, feature_maps, causal, window, exact, qg.device)
    if evaluation == "scores":
        num, den, shift = _score_chunks(
            rows, k, v, k_bucket, qg, row_fit, q_large, offset, chunk_size or DEFAULT_CHUNK_SIZE, causal, window, recompute
        )
    else:
        key_features = _KeyFeatures(k, v, k_bucket, feature_maps)
        scan, block = _global_sum, DEFAULT_CHUNK_SIZE
        if causal:
            few = sum(f.dim for f in feature_maps) <= PREFIX_FEATURES
            scan, block = (_prefix_scan, PREFIX_BLOCK_SIZE) if few else (_causal_scan, DEFAULT_CHUNK_SIZE)
        num, den, shift = scan(rows, key_features, qg, row_fit, q_large, offset, chunk_size or block, window, recompute)
    return q_large, num, den, shift


def split_keys(k, key_valid, thresholds, *, sinks, column_queries, column_threshold, scale, dropped_real_keys=None):
    """Which keys are exact for every query that sees them (large keys, sinks, columns), ``(B, Hk, Lk)`` bool,
    and the polynomial bucket of the others (``-1``: none, for exact and padded keys). ``key_valid``: ``(B, Lk)``
    or per head ``(B, Hk, Lk)``."""
    valid = key_valid if key_valid.dim() == 3 else key_valid[:, None, :]
    buckets = key_buckets(k, thresholds)  # (B, Hk, Lk), -1 for large keys
    exact_keys = structural_keys(k, key_valid, sinks=sinks, column_queries=column_queries, column_threshold=column_threshold,
                                 scale=scale, dropped_real_keys=dropped_real_keys)
    exact_keys = exact_keys | ((buckets == -1) & valid)
    return exact_keys, torch.where(valid & ~exact_keys, buckets, -1)


def _fit_rows(qg, q_large, key_norm_max, centers, buckets, *, scale, radius, radius_limit):
    """Each row's interval half-width and centre per bucket, ``row_fit (B, Hk, G, Lq, m, 2)``, and ``q_large``
    with the rows whose interval is wider than ``radius_limit`` (they go to the exact path). The half-width is
    ``scale |q_i| key_norm_max`` (the largest norm of the bucket's keys the row sees, ``(B, Hk, 1, Lq or 1, m)``),
    floored at 1, or the fixed ``radius`` (``buckets`` of them); ``centers`` (taylor kernel, else None) the rows' mean small scores."""
    if radius is None:
        row_radius = (scale * qg.norm(dim=-1)[..., None] * key_norm_max).clamp_min(RADIUS_FLOOR)  # (B, Hk, G, Lq, m)
    else:
        row_radius = torch.full((*qg.shape[:-1], buckets), float(radius), dtype=qg.dtype, device=qg.device)
    q_large = q_large | (row_radius.amax(dim=-1) > radius_limit)  # outside the fit's (calibrated) range
    row_radius = torch.where(q_large[..., None], torch.full_like(row_radius, RADIUS_FLOOR), row_radius)
    row_center = torch.zeros_like(row_radius)  # only the taylor kernel has a centre
    if centers is not None:
        row_center = torch.where(q_large[..., None], row_center, centers)
    return q_large, torch.stack([row_radius, row_center], dim=-1)


def _local_band(qg, k, v, key_valid, scale, local_window, window, offset, chunk, recompute, padded=True):
    """Exact attention of every query ``p`` to the keys ``p - local_window < j <= p`` it may see, query
    chunk by chunk (a ``(c, c + local_window)`` block; ``chunk`` None: the measured default of the path): per
    row the numerator, the mass and the maximum score they are taken relative to (``-inf`` when the row sees
    no key). ``padded=False`` promises every key valid: blocks of one shape and one query-key offset then
    share their mask."""
    reach = local_window if window is None else min(local_window, window)
    q_len, kv_len = qg.shape[3], k.shape[2]
    longest = min(reach, kv_len)  # (no query reaches further back than the first key)
    if not recompute and q_len > 1 and _fused_attention_available(qg, v):  # (one row: the plain matmuls are faster)
        chunk = min(chunk or FUSED_BAND_BLOCK_SIZE, q_len)  # (fewer rows: one block, not padded)
        if offset:
            return _fused_band(qg, k, v, key_valid, scale, reach, longest, offset, chunk, padded)
        # The first `reach` queries see every earlier key: causal attention, no block masks to build; the rest are
        # blocks whose keys all exist (the ones with keys before position 0 would each need their own bias).
        head = min(reach, q_len)
        first = _fused_causal(qg[:, :, :, :head], k[:, :, :head], v[:, :, :head], scale,
                              key_valid[:, :head] if padded else None)
        if head == q_len:
            return first
        rest = _fused_band(qg[:, :, :, head:], k, v, key_valid, scale, reach, longest, head, chunk, padded)
        return _concat_rows([first, rest])
    chunk = chunk or BAND_BLOCK_SIZE
    shared = {}  # (rows, keys, first query's position - first key's) -> the block's mask
    parts = []
    for i0 in range(0, q_len, chunk):
        i1 = min(i0 + chunk, q_len)
        lo, hi = max(offset + i0 - longest + 1, 0), offset + i1

        def block(i0=i0, i1=i1, lo=lo, hi=hi):
            key = (i1 - i0, hi - lo, offset + i0 - lo)
            mask = shared.get(key)
            if mask is None:  # the mask depends on the positions only through their differences
                q_pos, k_pos = torch.arange(key[0], device=qg.device) + key[2], torch.arange(key[1], device=k.device)
                mask = visible(q_pos, k_pos, causal=True, sliding_window=reach)
                if padded:
                    mask = mask & key_valid[:, None, None, None, lo:hi]
                else:
                    shared[key] = mask
            return _exact_part(qg[:, :, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi], mask, scale)

        parts.append(_step(recompute, block))
    return _concat_rows(parts)


def _exact_part(qg, k, v, mask, scale):
    """Exact attention of ``qg (B, Hk, G, c, d)`` to the keys ``k``, ``v`` ``(B, Hk, n, d)`` that ``mask``
    shows, as a partial attention ``(num, den, shift)`` for :func:`_merge` (the plain-matmul form)."""
    weights, row_max = masked_exp(scale * group_matmul(qg, k.transpose(-1, -2)), mask)  # (B, Hk, G, c, n)
    return group_matmul(weights, v), weights.sum(dim=-1), row_max


def _fused_attention_available(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the exact blocks can run in PyTorch's fused CPU attention kernel (it returns the log-sum-exp
    a partial attention needs; it wants values as wide as the keys). Elsewhere (CUDA included, untested
    here) and when training (its backward does not carry the log-sum-exp's gradient, which the merge with
    the far part needs) the blocks run as plain matmuls."""
    return (q.device.type == "cpu" and v.shape[-1] == q.shape[-1]
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def _fused_causal(qg, k, v, scale, key_valid=None):
    """Causal attention of ``qg (B, Hk, G, L, d)`` over ``k``, ``v`` ``(B, Hk, L, d)`` in the fused kernel, as
    ``(num, den, shift)`` relative to each row's log-sum-exp. ``key_valid (B, L)``: padding, one bias row per
    sequence that the kernel broadcasts (a row that sees no real key gets mass 0 and shift ``-inf``)."""
    batch, kv_heads, groups, rows, _ = qg.shape
    shape = (batch, kv_heads, groups, rows)
    if key_valid is None:
        if (batch * kv_heads * groups) % torch.get_num_threads() and rows >= max(BALANCED_CAUSAL_MIN_ROWS, 2):
            return _halved_causal(qg, k, v, scale)
        out, lse = _fused(qg, k, v, scale, causal=True)
        return out, torch.ones(shape, dtype=out.dtype, device=out.device), lse
    bias = torch.zeros(batch, 1, 1, rows, dtype=qg.dtype, device=qg.device).masked_fill_(~key_valid[:, None, None], float("-inf"))
    out, lse = _fused(qg, k, v, scale, causal=True, bias=bias)
    seen = (key_valid.cumsum(dim=-1) > 0)[:, None, None].expand(shape)  # a real key at or before the row
    return out, seen.to(out.dtype), torch.where(seen, lse, float("-inf"))


def _halved_causal(qg, k, v, scale):
    """:func:`_fused_causal` (no padding) as its two halves' causal attentions in one call, batched, plus the second
    half's queries against the first half's keys (no mask), merged. The kernel splits its (sequence, head, query
    block) items into one contiguous range per thread; in a causal call the later blocks cost more, so with one
    sequence and head the second thread had 3/4 of the work: 8192 tokens took 129 ms in one causal call and 35 +
    31 ms this way (measured on 2 threads)."""
    rows = qg.shape[3]
    half = rows - rows // 2  # the first half; the second, one shorter for odd rows, padded with a zero row
    pad = lambda x: torch.nn.functional.pad(x[..., half:, :], (0, 0, 0, 2 * half - rows))
    both = lambda x: torch.cat([x[..., :half, :], pad(x)])  # (2B, ...): the halves as two sequences
    out, lse = _fused(both(qg), both(k), both(v), scale, causal=True)
    batch = qg.shape[0]
    partial = lambda out, lse: (out, torch.ones_like(lse), lse)  # the kernel's output, normalized: mass 1
    first, second = partial(out[:batch], lse[:batch]), partial(out[batch:, ..., : rows - half, :], lse[batch:, ..., : rows - half])
    across = partial(*_fused(qg[..., half:, :], k[:, :, :half], v[:, :, :half], scale, causal=False))
    num, den = _merge(second, across)
    return _concat_rows([first, (num, den, torch.maximum(second[2], across[2]))])


def _fused(qg, k, v, scale, *, causal, bias=None):
    """PyTorch's fused CPU attention of ``qg (B, Hk, G, Lq, d)`` over ``k``, ``v`` ``(B, Hk, Lk, d)`` (each KV head
    repeated for its query heads), ``bias`` additive or None: the output ``(B, Hk, G, Lq, dv)`` and the log-sum-exp."""
    batch, kv_heads, groups, rows, d = qg.shape
    expand = lambda x: x[:, :, None].expand(batch, kv_heads, groups, *x.shape[2:]).reshape(batch, kv_heads * groups, *x.shape[2:])
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qg.reshape(batch, kv_heads * groups, rows, d), expand(k), expand(v), is_causal=causal, attn_mask=bias, scale=scale)
    shape = (batch, kv_heads, groups, rows)
    return out.view(*shape, -1), lse.view(shape).to(out.dtype)


def _fused_band(qg, k, v, key_valid, scale, reach, longest, offset, chunk, padded):
    """:func:`_local_band` in PyTorch's fused CPU attention kernel, many query blocks per call (so small blocks
    pay no call each: 64-row blocks made a 128-key window's band 2.6x faster at 4096 tokens, measured). Block
    ``j`` holds the queries ``offset + j c + t``, ``t < c`` (the last block padded), and the keys ``lo_j + s``, ``s < n = c + longest - 1``,
    ``lo_j = offset + j c - longest + 1``: overlapping strided views of K and V, no copy. The kernel's batch holds
    the blocks, its heads the batch's KV heads, its rows a KV head's query heads. Visibility depends on the
    positions only through ``t - s``, so the blocks whose keys are all real (in every sequence) share one bias;
    the others (keys before position 0 or padded) get their own, a bounded number per call."""
    batch, kv_heads, groups, q_len, d = qg.shape
    blocks, n = -(-q_len // chunk), chunk + longest - 1
    left, extra = max(longest - 1 - offset, 0), blocks * chunk - q_len  # keys padded before 0, queries after the end
    start = offset - longest + 1 + left  # block 0's first key in the padded keys

    pad = lambda x, *sides: torch.nn.functional.pad(x, sides) if any(sides) else x  # (a decoding step: no copy)

    def block_keys(x):  # (B, Hk, Lk, d) -> (blocks, B * Hk, n, d), block j's keys
        x = pad(x, 0, 0, left, extra)[:, :, start:].unfold(2, n, chunk)  # (B, Hk, blocks, d, n)
        return x.flatten(0, 1).permute(1, 0, 3, 2)

    k_blocks, v_blocks = block_keys(k), block_keys(v)
    q_blocks = pad(qg, 0, 0, 0, extra).reshape(batch * kv_heads, groups, blocks, chunk, d)
    q_blocks = q_blocks.permute(2, 0, 1, 3, 4).reshape(blocks, batch * kv_heads, groups * chunk, d)
    relative = visible(torch.arange(chunk, device=qg.device) + longest - 1, torch.arange(n, device=qg.device),
                       causal=True, sliding_window=reach)  # (c, n)
    relative = relative.expand(kv_heads, groups, chunk, n)
    valid = pad(key_valid, left, extra)[:, start:].unfold(1, n, chunk)  # (B, blocks, n)
    if padded:  # blocks whose keys are real in every sequence share the bias too (one host sync)
        shares = valid.all(dim=2).all(dim=0).tolist()
    else:  # only the first blocks reach keys before position 0
        shares = [j >= -(-left // chunk) for j in range(blocks)]
    per_block = max(1, FUSED_BIAS_BYTES // (batch * kv_heads * groups * chunk * n * qg.element_size()))
    as_bias = lambda mask: torch.zeros(mask.shape, dtype=qg.dtype, device=qg.device).masked_fill_(~mask, float("-inf"))
    shared = None

    calls = []  # (blocks, bias, rows seeing a key), in block order: runs of sharing blocks in one call each, the others
    j0 = 0      # in groups of a bounded size with their own biases
    while j0 < blocks:
        j1 = j0 + 1
        while j1 < blocks and shares[j1] == shares[j0] and (shares[j0] or j1 - j0 < per_block):
            j1 += 1
        if shares[j0]:
            if shared is None:
                shared = as_bias(relative.reshape(1, kv_heads, groups * chunk, n).repeat(1, batch, 1, 1))
            every_row = torch.ones(j1 - j0, batch, kv_heads, groups, chunk, dtype=torch.bool, device=qg.device)
            calls.append((slice(j0, j1), shared, every_row))
        else:
            mask = relative & valid[:, j0:j1].transpose(0, 1)[:, :, None, None, None, :]  # (J, B, Hk, G, c, n)
            calls.append((slice(j0, j1), as_bias(mask).view(j1 - j0, batch * kv_heads, groups * chunk, n), mask.any(dim=-1)))
        j0 = j1
    outs, lses, seens = [], [], []
    for some, bias, seen in calls:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_blocks[some], k_blocks[some], v_blocks[some], attn_mask=bias, scale=scale)
        outs.append(out)
        lses.append(lse.to(out.dtype))
        seens.append(seen)

    def rows(parts, *tail):  # (blocks, B * Hk, G * c, ...) -> (B, Hk, G, Lq, ...)
        x = torch.cat(parts).view(blocks, batch, kv_heads, groups, chunk, *tail)
        return x.permute(1, 2, 3, 0, 4, *range(5, x.dim())).reshape(batch, kv_heads, groups, blocks * chunk, *tail)[:, :, :, :q_len]

    seen = rows(seens)  # the kernel gives 0 output and 0 log-sum-exp to a row with no visible key
    return rows(outs, v.shape[-1]), seen.to(qg.dtype), torch.where(seen, rows(lses), float("-inf"))


def _merge(a, b):
    """Sum two partial attentions ``(num, den, shift)``, each relative to its own per-row shift
    (``-inf``: empty), relative to the larger shift (log-sum-exp style): returns ``(num, den)``."""
    (num_a, den_a, shift_a), (num_b, den_b, shift_b) = a, b
    top = torch.maximum(shift_a, shift_b).clamp_min(torch.finfo(shift_a.dtype).min)  # finite: -inf - top stays -inf
    scale_a, scale_b = torch.exp(shift_a - top), torch.exp(shift_b - top)  # an empty part weighs exp(-inf) = 0
    return num_a * scale_a[..., None] + num_b * scale_b[..., None], den_a * scale_a + den_b * scale_b


def as23_attention(q, k, v, *, degree: int, causal: bool = True, scale: float | None = None, kernel: str = AS23_KERNEL,
                   **kwargs) -> torch.Tensor:
    """AS23a, the bounded-entry baseline: the polynomial on every pair, no exact part."""
    return support_basis_attention(q, k, v, threshold=float("inf"), degree=degree, causal=causal, scale=scale, kernel=kernel,
                                   **kwargs)


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
    need = estimate_feature_bytes(shapes, feature_maps, chunk_size, sliding_window is not None, requires_grad, dtype)
    if need > max_feature_bytes:
        r, degree = sum(f.dim for f in feature_maps), max(f.degree for f in feature_maps)
        raise ValueError(
            f"degree {degree} with head_dim {shapes.head_dim} has {r} features per row; the polynomial part would "
            f"need about {need / 2**30:.2f} GiB (max_feature_bytes={max_feature_bytes / 2**30:.2f} GiB). "
            "Lower the degree, the chunk_size or the batch, sketch the features (sketch_dim), or raise max_feature_bytes."
        )


class _KeyFeatures:
    """Features of key ranges: one block per bucket, zero unless the key is in that bucket (large
    and padded keys are in none: their pairs belong to the exact part)."""

    def __init__(self, k, v, k_bucket, feature_maps):
        self.k, self.v, self.k_bucket, self.feature_maps = k, v, k_bucket, feature_maps

    def __call__(self, start: int, end: int):
        keys, bucket = self.k[:, :, start:end], self.k_bucket[:, :, start:end, None]
        per_map = base_features_per_map(self.feature_maps, keys)
        features = torch.cat([f.finish(psi) * (bucket == b) for b, (f, psi) in enumerate(zip(self.feature_maps, per_map))],
                             dim=-1)
        positions = torch.arange(start, end, device=self.k.device)
        return features, self.v[:, :, start:end], positions


class _RowAttention:
    """Numerator and mass of a block of query rows: exact vs large keys, each bucket's polynomial
    vs its keys. ``row_fit (..., c, m, 2)`` holds each row's interval half-width and centre per bucket."""

    def __init__(self, scale, feature_maps, causal, window, large_keys, device):
        self.scale, self.feature_maps, self.causal, self.window = scale, feature_maps, causal, window
        self.large_keys = large_keys
        self.base_degrees = [f.base_degrees(device) for f in feature_maps]

    def slot_limits(self, ends: torch.Tensor) -> list[int]:
        """Causal: for query chunks whose last position is ``ends[c]``, how many leading exact-key slots some
        row can see (the slots hold each head's exact keys in ascending position). One host sync."""
        if self.large_keys is None or not self.causal:
            return [None] * len(ends)
        _, k_pos, slot_valid = self.large_keys
        seen = slot_valid[..., None] & (k_pos[..., None] <= ends)  # (B, Hk, m, chunks)
        return seen.sum(dim=-2).flatten(0, -2).amax(dim=0).tolist()

    def __call__(self, q_rows, q_pos, row_fit, q_large, state, blocks, key_rows=None, row_state=None, slots=None):
        """``q_rows (B, Hk, G, c, d)`` at positions ``q_pos (c,)``; ``state`` = (S, z) running sums of
        ``phi(k) v^T`` and ``phi(k)`` over keys fully visible to every row; ``blocks`` = key feature
        blocks that need the positional mask; or ``row_state`` = (S, z) of each row's own visible keys,
        ``(B, Hk, c, r, dv)`` and ``(B, Hk, c, r)``; or ``key_rows`` = ``(k, v, positions, small)`` of raw
        keys, the polynomial then evaluated on the scores. ``slots``: only the first exact-key slots
        (:meth:`slot_limits`). Returns ``num (B, Hk, G, c, dv)``, ``den (B, Hk, G, c)`` and the per-row
        ``shift`` both are relative to."""
        num = den = 0
        row_radius, row_center = row_fit.unbind(dim=-1)
        large_keys = self.large_keys if slots != 0 else None
        if large_keys is None:
            exact_max = torch.full_like(row_radius[..., 0], float("-inf"))
        else:
            (k_large, v_large), k_pos, slot_valid = large_keys
            if slots is not None:
                k_large, v_large, k_pos, slot_valid = k_large[:, :, :slots], v_large[:, :, :slots], k_pos[..., :slots], slot_valid[..., :slots]
            scores = group_matmul(q_rows * self.scale, k_large.transpose(-1, -2))  # (B, Hk, G, c, n)
            mask = visible(q_pos, k_pos[:, :, None], causal=self.causal, sliding_window=self.window)
            scores = scores.masked_fill(~(mask & slot_valid[:, :, None, None, :]), float("-inf"))
            exact_max = scores.amax(dim=-1)
        shift = polynomial_shift(exact_max, row_radius.amax(dim=-1))
        if large_keys is not None:
            weights = torch.exp(scores - shift[..., None])  # the shift is finite (>= radius / 2): hidden keys weigh 0
            num = group_matmul(weights, v_large)
            den = weights.sum(dim=-1)

        coefficients = [kernel_fit(row_radius[..., b], shift, f.degree, f.kernel, row_center[..., b])
                        for b, f in enumerate(self.feature_maps)]
        if key_rows is not None:
            k_rows, v_rows, k_pos, k_bucket = key_rows
            seen = visible(q_pos, k_pos, causal=self.causal, sliding_window=self.window) & ~q_large[..., None]
            scores = self.scale * group_matmul(q_rows, k_rows.transpose(-1, -2))  # (B, Hk, G, c, n)
            for b, c in enumerate(coefficients):
                keep = seen & (k_bucket == b)[:, :, None, None, :]
                t = torch.where(keep, scores / row_radius[..., b, None], torch.zeros_like(scores))  # no overflow
                pair = kernel_on_scores(c[..., None, :], t, self.feature_maps[b].kernel)
                pair = torch.where(keep, pair, torch.zeros_like(t))  # (NaN grads)
                num, den = num + group_matmul(pair, v_rows), den + pair.sum(dim=-1)
            return num, den, shift
        q_features = []
        per_map = base_features_per_map(self.feature_maps, q_rows)
        for b, (f, psi, degrees, c) in enumerate(zip(self.feature_maps, per_map, self.base_degrees, coefficients)):
            per_feature = c[..., degrees] * (self.scale / row_radius[..., b, None]) ** degrees
            q_features.append(f.finish(psi, per_feature.masked_fill(q_large[..., None], 0)))
        q_features = torch.cat(q_features, dim=-1) if len(q_features) > 1 else q_features[0]  # (B, Hk, G, c, r)
        if state is not None:
            kv_state, k_state = state
            state_num, state_den = group_matmul(q_features, kv_state), group_matmul(q_features, k_state[..., None]).squeeze(-1)
            num, den = (state_num, state_den) if large_keys is None else (num + state_num, den + state_den)
        if row_state is not None:
            row_kv, row_k = row_state
            num = num + torch.einsum("bhgcr,bhcrv->bhgcv", q_features, row_kv)
            den = den + torch.einsum("bhgcr,bhcr->bhgc", q_features, row_k)
        for k_features, v_block, k_pos in blocks:
            pair = group_matmul(q_features, k_features.transpose(-1, -2))  # (B, Hk, G, c, n)
            pair = pair * visible(q_pos, k_pos, causal=self.causal, sliding_window=self.window)
            num = num + group_matmul(pair, v_block)
            den = den + pair.sum(dim=-1)
        return num, den, shift


def _step(recompute: bool, fn, *args):
    """``fn(*args)``; when training, under activation checkpointing, so backward keeps only the
    chunk's inputs (running states, views of q/k/v) and recomputes the rest: no score or feature
    block of any chunk stays alive, and attention memory grows linearly with the length."""
    if recompute:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _causal_scan(rows, key_features, qg, row_fit, q_large, offset, chunk, window, recompute):
    """Chunked causal scan over key positions. For the query chunk ``[a, b)`` the keys ``[f, a)`` are
    visible to every row (running state minus a trailing state when windowed), the keys
    ``[a, b)`` and, with a window, ``[a - window + 1, f)`` need the explicit positional mask."""
    kv_len = key_features.k.shape[2]
    kv_state = k_state = trail_kv = trail_k = None
    trail_end = 0
    parts = []
    starts = list(range(0, kv_len, chunk))
    slots = rows.slot_limits(torch.tensor([min(a + chunk, kv_len) - 1 for a in starts], device=qg.device))
    for a, limit in zip(starts, slots):
        b = min(a + chunk, kv_len)
        first_full = a
        if window is not None:
            first_full = min(max(-((window - a - chunk) // chunk) * chunk, 0), a)  # ceil to the grid
            while trail_end < first_full:
                trail_kv, trail_k = _step(recompute, _accumulate, key_features, trail_kv, trail_k, trail_end, trail_end + chunk)
                trail_end += chunk

        def chunk_rows(kv_state, k_state, trail_kv, trail_k, a=a, b=b, first_full=first_full, limit=limit):
            features, v_block, k_pos = key_features(a, b)
            i0, i1 = max(a, offset) - offset, b - offset
            blocks = [(features, v_block, k_pos)]
            state = None if kv_state is None else (kv_state, k_state)
            if window is not None:
                if state is not None and trail_kv is not None:
                    state = (kv_state - trail_kv, k_state - trail_k)
                if first_full == a:
                    state = None
                low = max(a - window + 1, 0)
                if low < first_full:
                    blocks.append(key_features(low, first_full))
            q_pos = torch.arange(i0, i1, device=qg.device) + offset
            return rows(qg[:, :, :, i0:i1], q_pos, row_fit[..., i0:i1, :, :], q_large[..., i0:i1], state, blocks,
                        slots=limit)

        if b > offset:
            parts.append(_step(recompute, chunk_rows, kv_state, k_state, trail_kv, trail_k))
        kv_state, k_state = _step(recompute, _accumulate, key_features, kv_state, k_state, a, b)
    return _concat_rows(parts)


def _prefix_scan(rows, key_features, qg, row_fit, q_large, offset, chunk, window, recompute):
    """The causal scan for few features per row (degree 0): each row's sums of ``phi(k) v^T`` and ``phi(k)``
    over exactly the keys it sees, as differences of prefix sums over all keys (no positional blocks), then
    the rows chunk by chunk with the exact keys."""
    kv_len, q_len = key_features.k.shape[2], qg.shape[3]
    features, v_all, _ = key_features(0, kv_len)  # (B, Hk, Lk, r), (B, Hk, Lk, dv)
    q_pos = torch.arange(q_len, device=qg.device) + offset
    row_kv = visible_key_sums(features[..., None] * v_all[..., None, :], offset, window)  # (B, Hk, Lq, r, dv)
    row_k = visible_key_sums(features, offset, window)
    starts = list(range(0, q_len, chunk))
    slots = rows.slot_limits(q_pos[[min(i0 + chunk, q_len) - 1 for i0 in starts]])
    parts = []
    for i0, limit in zip(starts, slots):
        i1 = min(i0 + chunk, q_len)

        def chunk_rows(row_kv, row_k, i0=i0, i1=i1, limit=limit):
            return rows(qg[:, :, :, i0:i1], q_pos[i0:i1], row_fit[..., i0:i1, :, :], q_large[..., i0:i1], None, [],
                        row_state=(row_kv, row_k), slots=limit)

        parts.append(_step(recompute, chunk_rows, row_kv[:, :, i0:i1], row_k[:, :, i0:i1]))
    return _concat_rows(parts)


def _concat_rows(parts):
    """``(num, den, shift)`` of consecutive query chunks, joined along the rows."""
    num, den, shift = zip(*parts)
    return torch.cat(num, dim=3), torch.cat(den, dim=3), torch.cat(shift, dim=3)


def _accumulate(key_features, kv_state, k_state, start, end):
    """The running sums ``sum phi(k) v^T`` and ``sum phi(k)`` extended by the keys ``[start, end)``."""
    features, v_block, _ = key_features(start, end)
    kv = features.transpose(-1, -2) @ v_block
    kk = features.sum(dim=-2)
    if kv_state is None:
        return kv, kk
    return kv_state + kv, k_state + kk


def _score_chunks(rows, k, v, k_bucket, qg, row_fit, q_large, offset, chunk, causal, window, recompute):
    """The polynomial on the scores: each query chunk against the key range it can see."""
    kv_len, q_len = k.shape[2], qg.shape[3]
    parts = []
    for i0 in range(0, q_len, chunk):
        i1 = min(i0 + chunk, q_len)
        lo, hi = 0, kv_len
        if causal:
            hi = offset + i1
            if window is not None:
                lo = max(offset + i0 - window + 1, 0)

        def chunk_rows(i0=i0, i1=i1, lo=lo, hi=hi):
            key_rows = (k[:, :, lo:hi], v[:, :, lo:hi], torch.arange(lo, hi, device=k.device), k_bucket[:, :, lo:hi])
            q_pos = torch.arange(i0, i1, device=qg.device) + offset
            return rows(qg[:, :, :, i0:i1], q_pos, row_fit[..., i0:i1, :, :], q_large[..., i0:i1], None, [], key_rows)

        parts.append(_step(recompute, chunk_rows))
    return _concat_rows(parts)


def _global_sum(rows, key_features, qg, row_fit, q_large, offset, chunk, window, recompute):
    """Non-causal: one state over all keys, then the query rows chunk by chunk."""
    kv_len, q_len = key_features.k.shape[2], qg.shape[3]
    kv_state = k_state = None
    for a in range(0, kv_len, chunk):
        kv_state, k_state = _step(recompute, _accumulate, key_features, kv_state, k_state, a, min(a + chunk, kv_len))
    parts = []
    for i0 in range(0, q_len, chunk):
        i1 = min(i0 + chunk, q_len)

        def chunk_rows(kv_state, k_state, i0=i0, i1=i1):
            q_pos = torch.arange(i0, i1, device=qg.device)  # unused without a causal mask
            return rows(qg[:, :, :, i0:i1], q_pos, row_fit[..., i0:i1, :, :], q_large[..., i0:i1], (kv_state, k_state), [])

        parts.append(_step(recompute, chunk_rows, kv_state, k_state))
    return _concat_rows(parts)


def _row_centers(qg, k, k_bucket, buckets, scale, causal, window, offset):
    """``c_ib = scale * q_i . mean(k_j)`` over the keys of bucket ``b`` visible to query ``i`` (0 when there
    are none), by prefix sums: ``(B, Hk, G, Lq, m)``. The centre of the ``taylor`` kernel."""
    centers = []
    for b in range(buckets):
        member = (k_bucket == b).to(k.dtype)  # (B, Hk, Lk)
        sums, counts = k * member[..., None], member
        if causal:
            sums, counts = visible_key_sums(sums, offset, window), visible_key_sums(counts, offset, window)
        else:
            sums, counts = sums.sum(dim=2, keepdim=True), counts.sum(dim=2, keepdim=True)
        centers.append(_mean_score(qg, sums, counts, scale))
    return torch.stack(centers, dim=-1)


def _mean_score(qg, key_sums, key_counts, scale):
    """``scale * q_i . mean(k)``, the mean of ``key_counts`` keys summing to ``key_sums (B, Hk, Lq or 1, d)``
    (0 for none): ``(B, Hk, G, Lq)``."""
    return scale * (qg * (key_sums / key_counts.clamp_min(1)[..., None])[:, :, None]).sum(dim=-1)


def _gather_rows(flags: torch.Tensor, tensors: tuple[torch.Tensor, ...]):
    """Gather the flagged rows (last dim of ``flags``) of each tensor into a dense block padded to the
    largest count. Returns ``(gathered, index, slot_valid)`` or None when nothing is flagged.
    One host sync (the count), the price of a static block shape."""
    count = int(flags.sum(dim=-1).max())
    if count == 0:
        return None
    index = torch.sort(flags.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :count]
    slot_valid = torch.gather(flags, -1, index)
    gathered = tuple(torch.gather(t, -2, index[..., None].expand(*index.shape, t.shape[-1])) for t in tensors)
    return gathered, index, slot_valid


def _exact_rows(qg, k, v, out, rows, scale, causal, window, key_valid, offset, recompute):
    """Overwrite the flagged query rows of ``out`` with exact attention, in blocks of gathered rows."""
    gathered = _gather_rows(rows, ())
    if gathered is None:
        return out
    _, index, slot_valid = gathered
    for s0 in range(0, index.shape[-1], EXACT_ROW_BLOCK):
        idx = index[..., s0 : s0 + EXACT_ROW_BLOCK]  # (B, Hk, G, n), ascending among the flagged
        keep = slot_valid[..., s0 : s0 + EXACT_ROW_BLOCK]
        lo, hi = 0, k.shape[2]
        if causal:  # only the keys some row of the block can see (one host sync per block)
            pos = idx + offset
            hi = int(torch.where(keep, pos, -1).max()) + 1
            if window is not None:
                lo = max(int(torch.where(keep, pos, hi).min()) - window + 1, 0)

        def block(idx=idx, lo=lo, hi=hi):
            k_pos = torch.arange(lo, hi, device=k.device)
            q_block = torch.gather(qg, 3, idx[..., None].expand(*idx.shape, qg.shape[-1]))
            scores = scale * group_matmul(q_block, k[:, :, lo:hi].transpose(-1, -2))  # (B, Hk, G, n, hi - lo)
            mask = visible(idx + offset, k_pos, causal=causal, sliding_window=window)
            mask = mask & key_valid[:, None, None, None, lo:hi]
            return group_matmul(masked_softmax(scores, mask), v[:, :, lo:hi])

        exact = _step(recompute, block)
        idx_out = idx[..., None].expand(*idx.shape, out.shape[-1])
        out = out.scatter(3, idx_out, torch.where(keep[..., None], exact, torch.gather(out, 3, idx_out)))
    return out


def _count_pairs(stats, exact_rows, exact_keys, key_valid, causal, window, local_window):
    """Visible pairs and pairs computed exactly (the local band, and the exact keys before it), from
    prefix counts (linear time)."""
    start, end = key_spans(exact_rows.shape[-1], key_valid.shape[-1], causal=causal, window=window, device=key_valid.device)
    band_start = torch.maximum(start, end - local_window)
    pairs = span_counts(key_valid, start, end)[:, None, None, :]  # (B, 1, 1, Lq)
    band = span_counts(key_valid, band_start, end)[:, None, None, :]
    exact = torch.where(exact_rows, pairs, band + span_counts(exact_keys, start, band_start)[:, :, None, :])
    add_stats(
        stats, exact_pairs=exact.sum(), pairs=pairs.expand_as(exact).sum(), exact_rows=exact_rows.sum(),
        rows=torch.tensor(exact_rows.numel(), device=exact_rows.device),
    )
