"""Attention sinks + local window (StreamingLLM-style), computed exactly: the training-free baseline.

Query ``p`` attends with an exact softmax to the keys ``j`` it may see under the model's mask (causal,
the model's sliding window, padding) that are either *sinks*, the first ``sinks`` real keys of the
sequence, or *local*, ``p - local_window < j <= p``. Ranks count real keys only, so left padding
does not move the sinks. The local keys run in the exact band of :mod:`sb_hf.ops.exact` (query blocks of
``(c, local_window + c)``, the fused CPU kernel at inference), the sinks older than a row's band in one
``(n, sinks)`` block, merged: ``O(n (sinks + local_window))`` time and memory, never an ``n x n`` matrix.
``naive.py`` beside this file (``sb_hf.ops.reference.sink_window_attention``) is the dense twin that defines it.
"""

from __future__ import annotations

import torch

from ..checks import check_chunk_size, check_inputs, check_sink_window, compute_dtype
from ..exact import local_band
from ..masking import add_stats, key_spans, span_counts, visible
from ..partial import exact_part, merge, normalized


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sinks: int,
    local_window: int,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    stats: dict | None = None,
    dropped_real_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sink + local window attention of ``q (B, Hq, Lq, d)`` over ``k, v (B, Hk, Lk, d)``, returns ``(B, Hq, Lq, dv)``.

    Args:
        sinks: every query also attends to the first ``sinks`` real keys (rank among keys with
            ``key_padding_mask`` True), when the model's mask lets it see them.
        local_window: query ``p`` attends to the keys ``p - local_window < j <= p``.
        causal: must be True (a sink/window pattern is defined over past keys).
        scale: score scale, default ``1/sqrt(d)``.
        key_padding_mask: ``(B, Lk)`` bool, True for real keys; padded keys are never attended nor ranked.
        sliding_window: the model's window: query ``p`` never sees keys ``j <= p - sliding_window``.
        chunk_size: query rows per block of the local band (None: the band's measured default).
        stats: optional dict; receives tensors ``exact_pairs`` (pairs computed), ``pairs`` (pairs
            visible under the model's mask), ``exact_rows`` (rows equal to exact attention), ``rows``.
        dropped_real_keys: optional ``(B,)`` integer tensor, the real keys of each sequence that precede
            ``k`` but are no longer given (a sliding-window KV cache dropped them). They hold the first
            sink ranks and are attended by no query. Default: none.

    Rows with no key to attend give zeros. Computation runs in fp32 (fp64 for fp64 inputs).
    """
    s = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window, scale=scale)
    check_sink_window(sinks, local_window, causal, dropped_real_keys, s.batch)
    check_chunk_size(chunk_size)
    out_dtype = q.dtype
    compute = compute_dtype(q.dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scale = s.head_dim**-0.5 if scale is None else float(scale)
    offset = s.kv_len - s.q_len  # key position of query 0
    device = q.device
    key_valid = torch.ones(s.batch, s.kv_len, dtype=torch.bool, device=device) if key_padding_mask is None else key_padding_mask

    # The sinks, in `slots` slots: slot r holds the real key of rank r (the first key where the count
    # of real keys reaches r + 1), a sink while its rank in the sequence (after the dropped keys) < sinks.
    slots = min(sinks, s.kv_len)
    real_count = key_valid.long().cumsum(dim=-1)  # (B, Lk)
    rank = torch.arange(slots, device=device).expand(s.batch, slots)
    sink_pos = torch.searchsorted(real_count, (rank + 1).contiguous()).clamp_max(s.kv_len - 1)  # (B, S)
    sink_valid = rank < real_count[:, -1:]
    if dropped_real_keys is not None:  # the dropped real keys held the first ranks
        sink_valid = sink_valid & (rank < sinks - dropped_real_keys.to(device)[:, None])
    is_sink = torch.zeros_like(key_valid).scatter(1, sink_pos, sink_valid)  # (B, Lk)
    sink_k = torch.gather(k, 2, sink_pos[:, None, :, None].expand(-1, s.kv_heads, -1, s.head_dim))
    sink_v = torch.gather(v, 2, sink_pos[:, None, :, None].expand(-1, s.kv_heads, -1, s.value_dim))

    qg = q.view(s.batch, s.kv_heads, s.groups, s.q_len, s.head_dim)  # query head h = kv_head * groups + g
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    # The local keys in the exact band; the sinks older than the band (at most `sinks` per row) apart.
    band = local_band(qg, k, v, key_valid, scale, local_window, sliding_window, offset, chunk_size, recompute,
                       padded=key_padding_mask is not None)
    num, den, _ = band
    if slots:
        q_pos = torch.arange(s.q_len, device=device) + offset
        older = sink_pos[:, None, :] <= q_pos[:, None] - local_window  # (B, Lq, S): outside the band
        sink_mask = visible(q_pos, sink_pos[:, None, :], causal=True, sliding_window=sliding_window)[:, 0]
        sink_mask = (sink_mask & older & sink_valid[:, None, :])[:, None, None]  # (B, 1, 1, Lq, S)
        num, den, _ = merge(band, exact_part(qg, sink_k, sink_v, sink_mask, scale))
    out = normalized(num, den)  # a row with no key: zeros

    if stats is not None:
        count_pairs(stats, s, key_valid, is_sink, local_window, sliding_window)
    return out.reshape(s.batch, s.q_heads, s.q_len, s.value_dim).to(out_dtype)


def count_pairs(stats, s, key_valid, is_sink, local_window, sliding_window):
    """Pairs visible under the model's mask, and those computed (the local real keys plus the
    visible sinks before the local range), from prefix counts (linear time)."""
    start, end = key_spans(s.q_len, s.kv_len, causal=True, sliding_window=sliding_window, device=key_valid.device)
    local_start = torch.maximum(start, end - local_window)
    pairs = span_counts(key_valid, start, end)  # (B, Lq)
    computed = span_counts(key_valid, local_start, end) + span_counts(is_sink, start, local_start)
    add_stats(
        stats, exact_pairs=computed.sum() * s.q_heads, pairs=pairs.sum() * s.q_heads,
        exact_rows=(computed == pairs).sum() * s.q_heads,
        rows=torch.tensor(s.batch * s.q_heads * s.q_len, device=key_valid.device),
    )
