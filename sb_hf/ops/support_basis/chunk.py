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
``naive.py`` beside this file (``sb_hf.ops.reference.support_basis_attention``) is the quadratic twin that
defines the result; windows are named as in :mod:`sb_hf.ops.masking`.
"""

from __future__ import annotations

import torch

from ..checks import check_chunk_size, check_dropped, check_finite_inputs, check_inputs, compute_dtype
from ..exact import local_band, plain_attention
from ..masking import add_stats, key_spans, span_counts
from ..partial import Partial, concat
from ..polynomial import AS23_KERNEL, DEFAULT_KERNEL
from .decoding import DecodingState
from .far import combine, far_part
from .keys import large_rows, split_keys
from .scan import DEFAULT_CHUNK_SIZE
from .settings import (DEFAULT_MAX_FEATURE_BYTES, EVALUATIONS, RADIUS_FLOOR, RADIUS_LIMIT, Polynomial, Structure, Units,
                       check_memory)


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
    decoding_state: DecodingState | None = None,
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
        decoding_state: a :class:`sb_hf.ops.DecodingState` passed to every call of one sequence of
            decoding steps: single-query causal inference steps then take the far part from its running sums
            (cost independent of the context length), the result the same up to rounding; other calls leave it alone.

    Rows whose approximate mass is not positive, or whose output is not finite, are recomputed
    exactly (see :func:`sb_hf.ops.support_basis.keys.suspect_rows`). Computation runs in fp32 (fp64 for fp64).
    """
    polynomial = Polynomial.single(threshold, degree, sketch_dim, sketch_seed=sketch_seed, kernel=kernel, radius=radius)
    structure = Structure(sinks, local_window, column_queries, column_threshold, radius_limit)
    return attention(q, k, v, polynomial, structure, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                     sliding_window=sliding_window, dropped_real_keys=dropped_real_keys, chunk_size=chunk_size,
                     max_feature_bytes=max_feature_bytes, evaluation=evaluation, stats=stats, decoding_state=decoding_state)


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
    decoding_state: DecodingState | None = None,
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
    polynomial = Polynomial.buckets(thresholds, degrees, sketch_dim, sketch_seed=sketch_seed, kernel=kernel, radius=radius)
    structure = Structure(sinks, local_window, column_queries, column_threshold, radius_limit)
    return attention(q, k, v, polynomial, structure, causal=causal, scale=scale, key_padding_mask=key_padding_mask,
                     sliding_window=sliding_window, dropped_real_keys=dropped_real_keys, chunk_size=chunk_size,
                     max_feature_bytes=max_feature_bytes, evaluation=evaluation, stats=stats, decoding_state=decoding_state)


def attention(q, k, v, polynomial: Polynomial, structure: Structure, *, causal: bool, scale: float | None,
              key_padding_mask, sliding_window, dropped_real_keys, chunk_size, max_feature_bytes, evaluation, stats,
              decoding_state: DecodingState | None) -> torch.Tensor:
    """:func:`support_basis_attention` with its settings as the typed objects (validated here against the inputs)."""
    shapes = check_inputs(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window, scale=scale,
        check_finite=False,  # below: a decoding step checks only the keys no earlier step checked
    )
    check_dropped(dropped_real_keys, shapes.batch)
    structure.check(shapes, causal)
    check_chunk_size(chunk_size)
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}")
    feature_maps = polynomial.feature_maps(shapes.head_dim)
    sketched = any(r is not None for r in polynomial.sketch_dims)
    if sketched and evaluation == "scores":
        raise ValueError("a sketched kernel is not a function of the scores: use evaluation='features' or 'auto'")
    requested_evaluation = evaluation
    if evaluation == "auto":
        evaluation = "scores" if not sketched and shapes.q_len < sum(f.dim for f in feature_maps) else "features"
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))  # training: see exact.checkpointed
    if evaluation == "features":
        check_memory(shapes, feature_maps, chunk_size or DEFAULT_CHUNK_SIZE, sliding_window, recompute, max_feature_bytes,
                     q.dtype)

    out_dtype = q.dtype
    compute = compute_dtype(q.dtype)
    q = q.to(compute)  # (k and v below: a decoding step reads the cache as it is, casting only what it reads)
    scale = shapes.head_dim**-0.5 if scale is None else float(scale)
    s = shapes
    offset = s.kv_len - s.q_len  # key position of query 0
    if not (causal and sliding_window is not None and sliding_window < s.kv_len):
        sliding_window = None  # (not in effect: it hides no key)

    qg = q.view(s.batch, s.kv_heads, s.groups, s.q_len, s.head_dim)  # query head h = kv_head * groups + g
    key_valid = (
        torch.ones(s.batch, s.kv_len, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    )
    if decoding_state is not None:  # a decoding step takes the far part from the state's running sums
        units = Units.shared(s.kv_heads, s.q_heads, structure)
        if decoding_state.serves(shapes, compute, q.device, polynomial, scale, units, causal=causal,
                                 sliding_window=sliding_window, recompute=recompute, dropped_real_keys=dropped_real_keys,
                                 evaluation=requested_evaluation):
            out = decoding_state.step(qg, k, v, key_valid, padded=key_padding_mask is not None, stats=stats,
                                      out_dtype=out_dtype)
            return out.reshape(s.batch, s.q_heads, s.q_len, s.value_dim).to(out_dtype)
    k, v = k.to(compute), v.to(compute)
    check_finite_inputs(q, k, v)
    if decoding_state is not None:
        decoding_state.checked_keys = s.kv_len
    local_window, radius_limit = structure.local_window, structure.radius_limit
    # Every row exact (threshold 0, or every interval at least as wide as the limit allows): without padding,
    # where each row sees a key, that is plain attention.
    every_row_exact = polynomial.threshold == 0 or (RADIUS_FLOOR if polynomial.radius is None else polynomial.radius) > radius_limit
    if every_row_exact and key_padding_mask is None:
        if stats is not None:
            rows = torch.ones(s.batch, s.kv_heads, s.groups, s.q_len, dtype=torch.bool, device=q.device)
            count_pairs(stats, rows, torch.zeros_like(k[..., 0], dtype=torch.bool), key_valid, causal, sliding_window,
                        local_window)
        out = plain_attention(qg, k, v, scale, causal, sliding_window, offset, recompute)
        return out.reshape(s.batch, s.q_heads, s.q_len, s.value_dim).to(out_dtype)
    q_large = large_rows(qg, polynomial.threshold)  # (B, Hk, G, Lq)
    if every_row_exact:
        q_large = torch.ones_like(q_large)  # (rows without far keys too, which skip the far part)
    rows_shape = (s.batch, s.kv_heads, s.groups, s.q_len)
    far = Partial(qg.new_zeros(*rows_shape, s.value_dim), qg.new_zeros(rows_shape), qg.new_full(rows_shape, float("-inf")))
    exact_keys, k_bucket = split_keys(k, key_valid, polynomial.thresholds, sinks=structure.sinks,
                                      column_queries=structure.column_queries, column_threshold=structure.column_threshold,
                                      scale=scale, dropped_real_keys=dropped_real_keys)
    # The far part (exact keys + polynomial) covers the keys j <= p - local_window: it runs in a frame lagged
    # by the band, where query i sits at p - local_window and only the first kv_len - local_window keys exist.
    first = min(max(local_window - offset, 0), s.q_len) if local_window else 0  # earlier queries have no far key
    far_sliding_window = None if sliding_window is None else sliding_window - local_window
    far_keys = s.kv_len - local_window
    if first < s.q_len and (far_sliding_window is None or far_sliding_window > 0) and not bool(q_large[..., first:].all()):
        far_large, part = far_part(
            qg[..., first:, :], k[:, :, :far_keys], v[:, :, :far_keys], k_bucket[..., :far_keys],
            exact_keys[..., :far_keys], q_large[..., first:], offset - local_window + first, far_sliding_window,
            polynomial=polynomial, feature_maps=feature_maps, scale=scale, causal=causal, radius_limit=radius_limit,
            evaluation=evaluation, chunk_size=chunk_size, recompute=recompute,
        )
        q_large = torch.cat([q_large[..., :first], far_large], dim=-1)
        far = concat([Partial(far.num[..., :first, :], far.den[..., :first], far.shift[..., :first]), part])
    band = None
    if local_window:
        band = local_band(qg, k, v, key_valid, scale, local_window, sliding_window, offset, chunk_size, recompute,
                          padded=key_padding_mask is not None)
    out, exact_rows = combine(qg, k, v, key_valid, far, band, q_large, scale=scale, causal=causal,
                              sliding_window=sliding_window, offset=offset, recompute=recompute, out_dtype=out_dtype)
    if stats is not None:
        count_pairs(stats, exact_rows, exact_keys, key_valid, causal, sliding_window, local_window)
    return out.reshape(s.batch, s.q_heads, s.q_len, s.value_dim).to(out_dtype)


def count_pairs(stats, exact_rows, exact_keys, key_valid, causal, sliding_window, local_window):
    """Visible pairs and pairs computed exactly (the local band, and the exact keys before it), from
    prefix counts (linear time)."""
    start, end = key_spans(exact_rows.shape[-1], key_valid.shape[-1], causal=causal, sliding_window=sliding_window,
                           device=key_valid.device)
    band_start = torch.maximum(start, end - local_window)
    pairs = span_counts(key_valid, start, end)[:, None, None, :]  # (B, 1, 1, Lq)
    band = span_counts(key_valid, band_start, end)[:, None, None, :]
    exact = torch.where(exact_rows, pairs, band + span_counts(exact_keys, start, band_start)[:, :, None, :])
    add_stats(
        stats, exact_pairs=exact.sum(), pairs=pairs.expand_as(exact).sum(), exact_rows=exact_rows.sum(),
        rows=torch.tensor(exact_rows.numel(), device=exact_rows.device),
    )


def as23_attention(q, k, v, *, degree: int, causal: bool = True, scale: float | None = None, kernel: str = AS23_KERNEL,
                   **kwargs) -> torch.Tensor:
    """AS23a, the bounded-entry baseline: the polynomial on every pair, no exact part."""
    return support_basis_attention(q, k, v, threshold=float("inf"), degree=degree, causal=causal, scale=scale, kernel=kernel,
                                   **kwargs)
