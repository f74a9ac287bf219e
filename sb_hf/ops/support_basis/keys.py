"""Which rows support basis computes exactly: large rows, the keys of the structure, the polynomial's buckets,
and the rows whose approximation broke down. The same rules serve the fast op, its twin and the decoding step."""

from __future__ import annotations

import torch

from ..checks import all_finite
from ..masking import sink_keys


def large_rows(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """A row is large (computed exactly) when any ``|entry| > threshold``; threshold 0 makes every row large."""
    if threshold == 0 or threshold == float("inf"):  # (no pass over x: the inputs are checked finite)
        return torch.full(x.shape[:-1], threshold == 0, dtype=torch.bool, device=x.device)
    return x.abs().amax(dim=-1) > threshold


def key_buckets(x: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Bucket of each row for thresholds ``T1 > T2 > ... > Tm``: ``-1`` when large (an entry above
    ``T1``), else ``b`` with ``T(b+2) < max |entry| <= T(b+1)`` (bucket 0 just below ``T1``, bucket
    ``m - 1`` holds the smallest rows). One threshold: every small row is in bucket 0."""
    if len(thresholds) == 1:
        return torch.where(large_rows(x, thresholds[0]), -1, 0)
    top = x.abs().amax(dim=-1)
    bucket = torch.zeros(top.shape, dtype=torch.long, device=x.device)
    for lower in thresholds[1:]:
        bucket = bucket + (top <= lower).long()
    return torch.where(large_rows(x, thresholds[0]), torch.full_like(bucket, -1), bucket)


def structural_keys(k: torch.Tensor, key_valid: torch.Tensor, *, sinks: int | torch.Tensor, column_queries: torch.Tensor | None,
                    column_threshold, scale: float, dropped_real_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Keys every query attends to exactly because of where or what they are, ``(B, Hk, Lk)`` bool:
    the first ``sinks`` real keys (rank among real keys, after ``dropped_real_keys``), and the *columns*,
    keys whose score with a head's mean query ``scale * qbar_h . k_j`` exceeds ``column_threshold`` for
    some query head of the KV group. Both rules look at the key alone, so a KV cache agrees.
    ``key_valid``: ``(B, Lk)``, or per head ``(B, Hk, Lk)`` (see :func:`sink_keys` for ``sinks``; None: no sinks)."""
    batch, kv_heads, kv_len, d = k.shape
    valid = key_valid if key_valid.dim() == 3 else key_valid[:, None, :].expand(batch, kv_heads, kv_len)
    keys = sink_keys(valid, sinks, dropped_real_keys) if sinks is not None else torch.zeros_like(valid)
    if column_queries is not None:
        groups = column_queries.shape[0] // kv_heads
        mean_queries = column_queries.to(device=k.device, dtype=k.dtype).view(kv_heads, groups, d)
        threshold = torch.as_tensor(column_threshold, dtype=k.dtype, device=k.device).expand(kv_heads * groups)
        scores = scale * torch.einsum("bhnd,hgd->bhng", k, mean_queries)
        keys = keys | (scores > threshold.view(kv_heads, 1, groups)).any(dim=-1)
    return keys & valid


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


def suspect_rows(den: torch.Tensor, out: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Rows whose approximate attention broke down: a non-positive row mass (the polynomial went
    negative), or an output that is not finite in ``out_dtype``. These rows are recomputed exactly."""
    finite = all_finite(out, dim=-1)
    if torch.finfo(out_dtype).max < torch.finfo(out.dtype).max:  # finite here, inf once cast
        finite = finite & (out.abs() <= torch.finfo(out_dtype).max).all(dim=-1)
    return ~((den > 0) & finite)
