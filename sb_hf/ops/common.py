"""Definitions shared by the fast ops and their naive twins: input checks, large rows, visibility.

Conventions (the same as ``torch.nn.functional.scaled_dot_product_attention`` plus GQA):
``q`` is ``(batch, q_heads, q_len, head_dim)``, ``k``/``v`` are ``(batch, kv_heads, kv_len, head_dim)``,
``q_heads`` a multiple of ``kv_heads``. The queries are the *last* ``q_len`` positions of the key
sequence (bottom-right alignment, as with a KV cache): query ``i`` sits at key position
``kv_len - q_len + i``. ``key_padding_mask`` is ``(batch, kv_len)``, True for real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .polynomial import MAX_DEGREE

RADIUS_FLOOR = 1.0  # below this the fit is done on [-1, 1]: still covers every score, and stays well conditioned
# Query rows whose interval is wider than this are computed exactly: a polynomial of any usable
# degree is meaningless there, and exp(radius / 2) would overflow fp32 past about 176.
RADIUS_LIMIT = 150.0


@dataclass(frozen=True)
class Shapes:
    batch: int
    q_heads: int
    kv_heads: int
    groups: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    sliding_window: int | None,
    degree: int,
    threshold: float,
    scale: float | None,
    radius: float | None = None,
    radius_limit: float = RADIUS_LIMIT,
    check_finite: bool = True,
) -> Shapes:
    """Validate the arguments of an attention op; raise ``ValueError`` saying what to change."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, head_dim), got {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one (as SDPA, "
                         "the op takes no mixed dtypes; the transformers backend casts them under torch.autocast)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, q_heads, q_len, head_dim = q.shape
    _, kv_heads, kv_len, _ = k.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k head_dim differ: {head_dim} vs {k.shape[-1]}")
    if v.shape[1] != kv_heads or v.shape[2] != kv_len:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a positive multiple of k/v heads ({kv_heads})")
    if q_len == 0 or kv_len == 0 or batch == 0 or head_dim == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}; every dimension must be >= 1")
    if causal and q_len > kv_len:
        raise ValueError(
            f"causal attention needs q_len <= kv_len (queries are the last q_len key positions), got {q_len} > {kv_len}"
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, kv_len):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (batch, kv_len) = {(batch, kv_len)}, "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if sliding_window is not None:
        if not causal:
            raise ValueError("sliding_window is only supported with causal=True")
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window!r}")
    if not isinstance(degree, int) or isinstance(degree, bool) or not 0 <= degree <= MAX_DEGREE:
        raise ValueError(f"degree must be an integer in [0, {MAX_DEGREE}], got {degree!r}")
    if not threshold >= 0:  # also rejects NaN
        raise ValueError(f"threshold must be >= 0 (0: every row exact, inf: no row exact), got {threshold}")
    if scale is not None and not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be a positive finite number or None, got {scale}")
    if radius is not None and (isinstance(radius, bool) or not 0 < radius < RADIUS_LIMIT):
        raise ValueError(f"radius must be a number in (0, {RADIUS_LIMIT}) or None, got {radius!r}")
    if isinstance(radius_limit, bool) or not isinstance(radius_limit, (int, float)) or not 0 < radius_limit <= RADIUS_LIMIT:
        raise ValueError(f"radius_limit must be a number in (0, {RADIUS_LIMIT}], got {radius_limit!r}")
    if check_finite:
        check_finite_inputs(q, k, v)
    return Shapes(batch, q_heads, kv_heads, q_heads // kv_heads, q_len, kv_len, head_dim, v.shape[-1])


def all_finite(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Whether every entry of ``x`` (or of each row along ``dim``) is finite: NaN and +-inf reach the min or
    the max, so one ``aminmax`` pass answers (measured 18x faster than ``isfinite(x).all()`` on CPU)."""
    if x.numel() == 0:
        return torch.ones(() if dim is None else x.shape[:dim] + x.shape[dim:][1:], dtype=torch.bool, device=x.device)
    low, high = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim)
    return (low > float("-inf")) & (high < float("inf"))


def check_finite_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError`` on NaN or inf in ``q``, ``k`` or ``v`` (one host sync each)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not all_finite(x):
            raise ValueError(f"{name} contains NaN or inf; attention of non-finite inputs is undefined")


def check_sink_window(
    sinks: int, local_window: int, causal: bool, dropped_real_keys: torch.Tensor | None, batch: int
) -> None:
    """Validate the settings of sink + local window attention; raise ``ValueError`` naming the field."""
    if not causal:
        raise ValueError("sink_window attention is causal only (sinks and a local window of past keys); pass causal=True")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an integer >= 0 (the first real keys every query attends to), got {sinks!r}")
    if isinstance(local_window, bool) or not isinstance(local_window, int) or local_window < 1:
        raise ValueError(
            f"local_window must be an integer >= 1 (query p attends to keys p - local_window < j <= p), got {local_window!r}"
        )
    check_dropped(dropped_real_keys, batch)


def check_dropped(dropped_real_keys: torch.Tensor | None, batch: int) -> None:
    """``dropped_real_keys``: None or ``(batch,)`` integers >= 0 (real keys a sliding-window cache dropped)."""
    if dropped_real_keys is None:
        return
    integer = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    if not isinstance(dropped_real_keys, torch.Tensor) or dropped_real_keys.dtype not in integer or (
        tuple(dropped_real_keys.shape) != (batch,)
    ):
        raise ValueError(
            f"dropped_real_keys must be an integer tensor of shape (batch,) = ({batch},), got "
            f"{getattr(dropped_real_keys, 'dtype', type(dropped_real_keys))} {tuple(getattr(dropped_real_keys, 'shape', ()))}"
        )
    if bool((dropped_real_keys < 0).any()):
        raise ValueError("dropped_real_keys must be >= 0")


def check_structure(sinks, local_window, column_queries, column_threshold, causal: bool, shapes: Shapes,
                    dropped_real_keys: torch.Tensor | None = None) -> None:
    """Validate the structural exact part of support basis (sinks, local window, key columns)."""
    check_dropped(dropped_real_keys, shapes.batch)
    for name, value in (("sinks", sinks), ("local_window", local_window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0 (0: none), got {value!r}")
    if local_window and not causal:
        raise ValueError("local_window (exact keys p - local_window < j <= p) needs causal=True; use local_window=0")
    if column_queries is None:
        if column_threshold is not None:
            raise ValueError("column_threshold needs column_queries (the per-head mean queries); give both or neither")
        return
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


def sink_keys(key_valid: torch.Tensor, sinks: int | torch.Tensor, dropped_real_keys: torch.Tensor | None = None) -> torch.Tensor:
    """The first ``sinks`` real keys of each sequence, ``(B, Lk)`` (or per head ``(B, H, Lk)``) bool: rank among the
    keys with ``key_valid`` True, counting the ``dropped_real_keys`` (``(B,)`` or ``(B, H)``) that come before them (a
    sliding-window cache no longer holds them, or a decoding state folded them). ``sinks``: a number, or per head
    ``(H, 1)``."""
    rank = key_valid.long().cumsum(dim=-1) - 1
    if dropped_real_keys is not None:
        rank = rank + dropped_real_keys.to(rank.device).view(*dropped_real_keys.shape, *(1,) * (rank.dim() - dropped_real_keys.dim()))
    return key_valid & (rank < sinks)


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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Attention is computed in fp32 (fp64 for fp64 inputs), whatever the input precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def visible(
    q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool, sliding_window: int | None
) -> torch.Tensor:
    """Which key positions each query position may attend to: ``(..., Lq) x (..., Lk) -> (..., Lq, Lk)``.

    The one masking rule of the package (padding is applied by the callers through the key features
    or an extra ``& key_valid``): causal ``k <= q``; with a window, also ``k > q - sliding_window``.
    """
    q_pos = q_pos[..., :, None]
    k_pos = k_pos[..., None, :]
    if not causal:
        return torch.ones(torch.broadcast_shapes(q_pos.shape, k_pos.shape), dtype=torch.bool, device=q_pos.device)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    return mask


def key_spans(q_len: int, kv_len: int, *, causal: bool, window: int | None, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, end)``, each ``(q_len,)``: the key range ``[start, end)`` each query sees under :func:`visible`
    (before padding). Query ``i`` sits at key position ``kv_len - q_len + i``."""
    if not causal:
        end = torch.full((q_len,), kv_len, device=device)
        return torch.zeros_like(end), end
    end = torch.arange(q_len, device=device) + (kv_len - q_len) + 1
    start = (end - window).clamp_min(0) if window is not None else torch.zeros_like(end)
    return start, end


def span_counts(flags: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """How many flagged keys lie in ``[start, end)`` for every query: ``(..., Lk) -> (..., Lq)``, by prefix sums."""
    cum = torch.nn.functional.pad(flags.long().cumsum(-1), (1, 0))
    return cum[..., end] - cum[..., start]


def add_stats(stats: dict, *, exact_pairs, pairs, exact_rows, rows) -> None:
    """Accumulate the pair counts of one call into ``stats`` (the keys of ``attention_stats``): (query, key)
    pairs computed exactly, pairs visible under the model's mask, rows computed as exact attention, rows."""
    for key, value in (("exact_pairs", exact_pairs), ("pairs", pairs), ("exact_rows", exact_rows), ("rows", rows)):
        stats[key] = stats.get(key, 0) + value


def polynomial_shift(exact_max: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per-row shift shared by the exact and the polynomial part.

    The exact scores are shifted by their maximum as in softmax; polynomial values reach at most
    about ``e^radius`` but are mostly near ``e^0``, so ``radius / 2`` keeps both ends inside fp32
    for radii up to about 170 (a fit on a wider interval is meaningless anyway).
    """
    return torch.maximum(exact_max, radius / 2)


def suspect_rows(den: torch.Tensor, out: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Rows whose approximate attention broke down: a non-positive row mass (the polynomial went
    negative), or an output that is not finite in ``out_dtype``. These rows are recomputed exactly."""
    finite = all_finite(out, dim=-1)
    if torch.finfo(out_dtype).max < torch.finfo(out.dtype).max:  # finite here, inf once cast
        finite = finite & (out.abs() <= torch.finfo(out_dtype).max).all(dim=-1)
    return ~((den > 0) & finite)


def visible_key_sums(x: torch.Tensor, offset: int, window: int | None) -> torch.Tensor:
    """For each causal query at key position ``p = offset, ..., Lk - 1``, the sum of ``x (B, H, Lk, ...)`` over
    the keys it sees (the prefix, or the last ``window`` positions): ``(B, H, Lk - offset, ...)``, by prefix sums."""
    cum = x.transpose(2, -1).cumsum(dim=-1).transpose(2, -1)  # the same sums; along the last dim 1.4-2.8x faster on CPU
    sums = cum[:, :, offset:]
    if window is None:
        return sums
    before = torch.nn.functional.pad(cum, (0, 0) * (x.dim() - 3) + (1, 0))  # [p] = the sum over keys j < p
    start = (torch.arange(offset, x.shape[2], device=x.device) - window + 1).clamp_min(0)
    return sums - before[:, :, start]


def visible_key_max(values: torch.Tensor, window: int | None) -> torch.Tensor:
    """For every key position p, the max of ``values`` (>= 0) over the keys a causal query at p
    sees: the prefix, or the last ``window`` positions."""
    if window is None:
        return values.cummax(dim=-1).values
    flat = torch.nn.functional.pad(values.reshape(-1, 1, values.shape[-1]), (window - 1, 0))
    return torch.nn.functional.max_pool1d(flat, kernel_size=window, stride=1).reshape(values.shape)


def group_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x (B, Hk, G, c, m) @ y (B, Hk, m, n) -> (B, Hk, G, c, n)``: the rows of a KV head's G query heads stacked
    into one matmul (broadcasting ``y`` over G instead copies it G times: 20x slower for a decoding step)."""
    b, h, g, c, m = x.shape
    return (x.reshape(b, h, g * c, m) @ y).view(b, h, g, c, y.shape[-1])


def masked_exp(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(score - row max)`` over the last dim where ``mask``, 0 elsewhere, and the row max the weights
    are relative to (``-inf`` for a row with no visible entry, whose weights are all 0)."""
    scores = torch.where(mask, scores, torch.full_like(scores, float("-inf")))
    row_max = scores.amax(dim=-1)
    safe = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return torch.exp(scores - safe[..., None]), row_max


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``mask``; a row with no visible entry gives zeros."""
    weights, _ = masked_exp(scores, mask)
    den = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(den > 0, den, torch.ones_like(den))
