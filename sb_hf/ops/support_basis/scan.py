"""The polynomial part's sums over keys: the feature scans (causal, windowed, prefix sums for few features, global)
and the score form, each calling a block of query rows (:class:`sb_hf.ops.support_basis.far.RowAttention`) with
the sums it needs. The keys and positions here are the far part's: its frame lags the local band (see
:mod:`sb_hf.ops.masking`), and ``sliding_window`` is the model's window in that frame."""

from __future__ import annotations

import torch

from ..exact import checkpointed
from ..masking import visible_key_sums
from ..partial import concat
from ..polynomial import base_features_per_map

DEFAULT_CHUNK_SIZE = 64  # the feature scan (many features per row); chosen by measurement (benchmarks/op_scaling.py)
PREFIX_BLOCK_SIZE = 2048  # query rows per block of the prefix scan (few features: the exact keys dominate); by measurement
PREFIX_FEATURES = 4  # up to this many features per row (degree 0: one per bucket) the causal sums are prefix sums


class KeyFeatures:
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


def causal_scan(rows, key_features, qg, row_fit, q_large, offset, chunk, sliding_window, recompute):
    """Chunked causal scan over key positions. For the query chunk ``[a, b)`` the keys ``[f, a)`` are
    visible to every row (running state minus a trailing state when windowed), the keys
    ``[a, b)`` and, with a sliding window, ``[a - sliding_window + 1, f)`` need the explicit positional mask."""
    kv_len = key_features.k.shape[2]
    kv_state = k_state = trail_kv = trail_k = None
    trail_end = 0
    parts = []
    starts = list(range(0, kv_len, chunk))
    slots = rows.slot_limits(torch.tensor([min(a + chunk, kv_len) - 1 for a in starts], device=qg.device))
    for a, limit in zip(starts, slots):
        b = min(a + chunk, kv_len)
        first_full = a
        if sliding_window is not None:
            first_full = min(max(-((sliding_window - a - chunk) // chunk) * chunk, 0), a)  # ceil to the grid
            while trail_end < first_full:
                trail_kv, trail_k = checkpointed(recompute, accumulate, key_features, trail_kv, trail_k, trail_end, trail_end + chunk)
                trail_end += chunk

        def chunk_rows(kv_state, k_state, trail_kv, trail_k, a=a, b=b, first_full=first_full, limit=limit):
            features, v_block, k_pos = key_features(a, b)
            i0, i1 = max(a, offset) - offset, b - offset
            blocks = [(features, v_block, k_pos)]
            state = None if kv_state is None else (kv_state, k_state)
            if sliding_window is not None:
                if state is not None and trail_kv is not None:
                    state = (kv_state - trail_kv, k_state - trail_k)
                if first_full == a:
                    state = None
                low = max(a - sliding_window + 1, 0)
                if low < first_full:
                    blocks.append(key_features(low, first_full))
            q_pos = torch.arange(i0, i1, device=qg.device) + offset
            return rows(qg[:, :, :, i0:i1], q_pos, row_fit[..., i0:i1, :, :], q_large[..., i0:i1], state, blocks,
                        slots=limit)

        if b > offset:
            parts.append(checkpointed(recompute, chunk_rows, kv_state, k_state, trail_kv, trail_k))
        kv_state, k_state = checkpointed(recompute, accumulate, key_features, kv_state, k_state, a, b)
    return concat(parts)


def prefix_scan(rows, key_features, qg, row_fit, q_large, offset, chunk, sliding_window, recompute):
    """The causal scan for few features per row (degree 0): each row's sums of ``phi(k) v^T`` and ``phi(k)``
    over exactly the keys it sees, as differences of prefix sums over all keys (no positional blocks), then
    the rows chunk by chunk with the exact keys."""
    kv_len, q_len = key_features.k.shape[2], qg.shape[3]
    features, v_all, _ = key_features(0, kv_len)  # (B, Hk, Lk, r), (B, Hk, Lk, dv)
    q_pos = torch.arange(q_len, device=qg.device) + offset
    row_kv = visible_key_sums(features[..., None] * v_all[..., None, :], offset, sliding_window)  # (B, Hk, Lq, r, dv)
    row_k = visible_key_sums(features, offset, sliding_window)
    starts = list(range(0, q_len, chunk))
    slots = rows.slot_limits(q_pos[[min(i0 + chunk, q_len) - 1 for i0 in starts]])
    parts = []
    for i0, limit in zip(starts, slots):
        i1 = min(i0 + chunk, q_len)

        def chunk_rows(row_kv, row_k, i0=i0, i1=i1, limit=limit):
            return rows(qg[:, :, :, i0:i1], q_pos[i0:i1], row_fit[..., i0:i1, :, :], q_large[..., i0:i1], None, [],
                        row_state=(row_kv, row_k), slots=limit)

        parts.append(checkpointed(recompute, chunk_rows, row_kv[:, :, i0:i1], row_k[:, :, i0:i1]))
    return concat(parts)


def accumulate(key_features, kv_state, k_state, start, end):
    """The running sums ``sum phi(k) v^T`` and ``sum phi(k)`` extended by the keys ``[start, end)``."""
    features, v_block, _ = key_features(start, end)
    kv = features.transpose(-1, -2) @ v_block
    kk = features.sum(dim=-2)
    if kv_state is None:
        return kv, kk
    return kv_state + kv, k_state + kk


def score_chunks(rows, k, v, k_bucket, qg, row_fit, q_large, offset, chunk, causal, sliding_window, recompute):
    """The polynomial on the scores: each query chunk against the key range it can see."""
    kv_len, q_len = k.shape[2], qg.shape[3]
    parts = []
    for i0 in range(0, q_len, chunk):
        i1 = min(i0 + chunk, q_len)
        lo, hi = 0, kv_len
        if causal:
            hi = offset + i1
            if sliding_window is not None:
                lo = max(offset + i0 - sliding_window + 1, 0)

        def chunk_rows(i0=i0, i1=i1, lo=lo, hi=hi):
            key_rows = (k[:, :, lo:hi], v[:, :, lo:hi], torch.arange(lo, hi, device=k.device), k_bucket[:, :, lo:hi])
            q_pos = torch.arange(i0, i1, device=qg.device) + offset
            return rows(qg[:, :, :, i0:i1], q_pos, row_fit[..., i0:i1, :, :], q_large[..., i0:i1], None, [], key_rows)

        parts.append(checkpointed(recompute, chunk_rows))
    return concat(parts)


def global_sum(rows, key_features, qg, row_fit, q_large, offset, chunk, sliding_window, recompute):
    """Non-causal: one state over all keys, then the query rows chunk by chunk."""
    kv_len, q_len = key_features.k.shape[2], qg.shape[3]
    kv_state = k_state = None
    for a in range(0, kv_len, chunk):
        kv_state, k_state = checkpointed(recompute, accumulate, key_features, kv_state, k_state, a, min(a + chunk, kv_len))
    parts = []
    for i0 in range(0, q_len, chunk):
        i1 = min(i0 + chunk, q_len)

        def chunk_rows(kv_state, k_state, i0=i0, i1=i1):
            q_pos = torch.arange(i0, i1, device=qg.device)  # unused without a causal mask
            return rows(qg[:, :, :, i0:i1], q_pos, row_fit[..., i0:i1, :, :], q_large[..., i0:i1], (kv_state, k_state), [])

        parts.append(checkpointed(recompute, chunk_rows, kv_state, k_state))
    return concat(parts)
