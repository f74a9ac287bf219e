"""The far part of support basis: the exact keys (large, sinks, columns) and each bucket's polynomial, for the
query rows over the keys behind their local band; each row's interval and centre; and the combination with the
band into the output. The sums over keys are :mod:`sb_hf.ops.support_basis.scan`'s."""

from __future__ import annotations

import torch

from ..exact import exact_rows, gather_rows
from ..masking import visible, visible_key_max, visible_key_sums
from ..partial import Partial, group_matmul, merge, normalized
from ..polynomial import base_features_per_map, kernel_fit, kernel_on_scores, polynomial_shift
from .keys import suspect_rows
from .scan import (DEFAULT_CHUNK_SIZE, PREFIX_BLOCK_SIZE, PREFIX_FEATURES, KeyFeatures, causal_scan, global_sum,
                   prefix_scan, score_chunks)
from .settings import RADIUS_FLOOR, Polynomial


def far_part(qg, k, v, k_bucket, exact_keys, q_large, offset, sliding_window, *, polynomial: Polynomial, feature_maps,
             scale, causal, radius_limit, evaluation, chunk_size, recompute) -> tuple[torch.Tensor, Partial]:
    """The exact keys plus each bucket's polynomial, for the rows of ``qg`` over the keys ``k``, ``v``
    (queries at positions ``offset + i``). Returns ``q_large`` (with the rows the guard sends to the exact
    path), and their partial attention. ``sliding_window``: the model's window in the far part's frame."""
    buckets, radius = range(len(polynomial.thresholds)), polynomial.radius
    key_norm_max = None
    if radius is None:  # per bucket: max |k_j| over the visible keys of the bucket
        k_norm = k.norm(dim=-1)
        norms = [torch.where(k_bucket == b, k_norm, torch.zeros_like(k_norm)) for b in buckets]
        norms = [visible_key_max(n, sliding_window)[..., offset:] if causal else n.amax(-1, keepdim=True) for n in norms]
        key_norm_max = torch.stack(norms, dim=-1)[:, :, None]  # (B, Hk, 1, Lq or 1, m)
    centers = row_centers(qg, k, k_bucket, len(buckets), scale, causal, sliding_window, offset) if polynomial.kernel == "taylor" else None
    q_large, row_fit = fit_rows(qg, q_large, key_norm_max, centers, len(buckets), scale=scale, radius=radius, radius_limit=radius_limit)
    exact = gather_rows(exact_keys, (k, v))
    rows = RowAttention(scale, feature_maps, causal, sliding_window, exact, qg.device)
    if evaluation == "scores":
        part = score_chunks(
            rows, k, v, k_bucket, qg, row_fit, q_large, offset, chunk_size or DEFAULT_CHUNK_SIZE, causal, sliding_window,
            recompute)
    else:
        key_features = KeyFeatures(k, v, k_bucket, feature_maps)
        scan, block = global_sum, DEFAULT_CHUNK_SIZE
        if causal:
            few = sum(f.dim for f in feature_maps) <= PREFIX_FEATURES
            scan, block = (prefix_scan, PREFIX_BLOCK_SIZE) if few else (causal_scan, DEFAULT_CHUNK_SIZE)
        part = scan(rows, key_features, qg, row_fit, q_large, offset, chunk_size or block, sliding_window, recompute)
    return q_large, part


def combine(qg, k, v, key_valid, far: Partial, band: Partial | None, q_large, *, scale, causal, sliding_window, offset,
            recompute, out_dtype):
    """The output from the far part and the local band (or None), with the large query rows and the rows whose
    approximation broke down (:func:`sb_hf.ops.support_basis.keys.suspect_rows`) computed exactly over every
    visible key. Returns ``(out, exact_rows)``."""
    num, den, _ = far if band is None else merge(far, band)
    out = normalized(num, den)
    rows = q_large | suspect_rows(den, out, out_dtype)
    return exact_rows(qg, k, v, out, rows, scale, causal, sliding_window, key_valid, offset, recompute), rows


def fit_rows(qg, q_large, key_norm_max, centers, buckets, *, scale, radius, radius_limit):
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


def row_centers(qg, k, k_bucket, buckets, scale, causal, sliding_window, offset):
    """``c_ib = scale * q_i . mean(k_j)`` over the keys of bucket ``b`` visible to query ``i`` (0 when there
    are none), by prefix sums: ``(B, Hk, G, Lq, m)``. The centre of the ``taylor`` kernel."""
    centers = []
    for b in range(buckets):
        member = (k_bucket == b).to(k.dtype)  # (B, Hk, Lk)
        sums, counts = k * member[..., None], member
        if causal:
            sums, counts = visible_key_sums(sums, offset, sliding_window), visible_key_sums(counts, offset, sliding_window)
        else:
            sums, counts = sums.sum(dim=2, keepdim=True), counts.sum(dim=2, keepdim=True)
        centers.append(mean_score(qg, sums, counts, scale))
    return torch.stack(centers, dim=-1)


def mean_score(qg, key_sums, key_counts, scale):
    """``scale * q_i . mean(k)``, the mean of ``key_counts`` keys summing to ``key_sums (B, Hk, Lq or 1, d)``
    (0 for none): ``(B, Hk, G, Lq)``."""
    return scale * (qg * (key_sums / key_counts.clamp_min(1)[..., None])[:, :, None]).sum(dim=-1)


class RowAttention:
    """Numerator and mass of a block of query rows: exact vs large keys, each bucket's polynomial
    vs its keys. ``row_fit (..., c, m, 2)`` holds each row's interval half-width and centre per bucket."""

    def __init__(self, scale, feature_maps, causal, sliding_window, large_keys, device):
        self.scale, self.feature_maps, self.causal, self.sliding_window = scale, feature_maps, causal, sliding_window
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
        ``shift`` both are relative to (a :class:`sb_hf.ops.partial.Partial`)."""
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
            mask = visible(q_pos, k_pos[:, :, None], causal=self.causal, sliding_window=self.sliding_window)
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
            seen = visible(q_pos, k_pos, causal=self.causal, sliding_window=self.sliding_window) & ~q_large[..., None]
            scores = self.scale * group_matmul(q_rows, k_rows.transpose(-1, -2))  # (B, Hk, G, c, n)
            for b, c in enumerate(coefficients):
                keep = seen & (k_bucket == b)[:, :, None, None, :]
                t = torch.where(keep, scores / row_radius[..., b, None], torch.zeros_like(scores))  # no overflow
                pair = kernel_on_scores(c[..., None, :], t, self.feature_maps[b].kernel)
                pair = torch.where(keep, pair, torch.zeros_like(t))  # (NaN grads)
                num, den = num + group_matmul(pair, v_rows), den + pair.sum(dim=-1)
            return Partial(num, den, shift)
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
            pair = pair * visible(q_pos, k_pos, causal=self.causal, sliding_window=self.sliding_window)
            num = num + group_matmul(pair, v_block)
            den = den + pair.sum(dim=-1)
        return Partial(num, den, shift)
