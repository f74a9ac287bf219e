"""The support-basis decoding cache: the far part of a growing key sequence, kept as running sums.

A decoding step's query (position ``p``) sees every cached key. Support basis splits them as in
:mod:`sb_hf.ops.support_basis`: the local band ``p - local_window < j <= p`` is read from the KV cache and
computed exactly, and the keys behind it (the far part) are either exact keys (large, sinks, key columns),
kept gathered in a block, or small keys, whose polynomial attention only needs the sums of ``phi(k) v^T`` and
``phi(k)`` per bucket, the largest key norm (the interval) and the sum of the keys (the taylor centre). A key
leaves the band once and is folded into these then, so a step costs the band, the exact keys and the feature
dimension, not the context length. The result is the op's (the same formulas on the same keys), up to the
rounding of summing in another order. Rows the op computes exactly (large queries, the radius guard, broken
rows) still attend to every cached key.

One state serves all heads of a layer in one call, each *unit* with its own structure (:class:`Units`: local
window, sinks, key columns, radius limit): a unit is a KV head with its query heads (``support_basis_attention``,
``kv_heads`` settings) or a single query head (``heads`` settings); the polynomial (thresholds, degrees, kernel,
sketch, radius) is shared. Use: ``support_basis_attention(..., decoding_state=state)`` with the same state for
every call of one sequence, or :func:`decoding_attention` for a layer with per-head structure;
:mod:`sb_hf.integrations.hf` keeps the states on the transformers cache layer. Calls that are not single-query
causal inference steps (prefill, training, a sliding window in effect, ``evaluation="scores"``) are not served
(the op runs in full); they leave the state alone (a sliding window in effect empties it), and it folds the
keys it has not seen at the next step. Keys must
only ever be appended: :meth:`DecodingState.reset` when the key sequence changes otherwise (cropped, reordered,
another sequence). A change of shapes or settings resets it by itself; keys keep the padding
(``key_padding_mask``) they had when they were folded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import (
    RADIUS_FLOOR,
    Shapes,
    add_stats,
    check_finite_inputs,
    compute_dtype,
    large_rows,
    span_counts,
)
from .polynomial import FeatureMap
from .support_basis import (
    _accumulate,
    _combine,
    _fit_rows,
    _gather_rows,
    _KeyFeatures,
    _local_band,
    _mean_score,
    _RowAttention,
    split_keys,
)


EVERY_KEY = 2**62  # a local window that covers every key: a unit computed exactly


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
    def shared(cls, kv_heads: int, q_heads: int, *, local_window: int, sinks: int, radius_limit: float,
               column_queries=None, column_threshold=None) -> "Units":
        """One setting for every KV head (the op's arguments)."""
        if column_queries is not None:
            column_threshold = torch.as_tensor(column_threshold, dtype=column_queries.dtype,
                                               device=column_queries.device).expand(q_heads)
        return cls(1, [local_window] * kv_heads, [sinks] * kv_heads, [radius_limit] * kv_heads, column_queries,
                   column_threshold)

    def key(self) -> tuple:
        return (self.per_kv_head, tuple(self.local_windows), tuple(self.sinks), tuple(self.radius_limits),
                self.column_queries, self.column_threshold)


class DecodingState:
    """The far part of one layer's heads between decoding steps (see the module docstring)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget every folded key (the next step folds the whole cache again)."""
        self.seen = 0  # the number of keys at the last fold: unit n holds keys [0, seen - local_window[n])
        self.checked_keys = 0  # keys [0, checked_keys) were checked finite by an earlier call
        self._signature = None

    @property
    def folded(self) -> list[int]:
        """Keys held per unit (the rest is in the band)."""
        if self._signature is None:
            return []
        return [max(self.seen - lag, 0) for lag in self._units.local_windows]

    def serves(self, shapes: Shapes, dtype: torch.dtype, device: torch.device, core: dict, units: Units, *,
               causal: bool, window: int | None, recompute: bool, dropped_real_keys, evaluation: str) -> bool:
        """Whether the call is a step this state computes: one query, causal, inference, no sliding window in
        effect, every key of the sequence held. Resets the state when the shapes, the polynomial (``core``) or
        the ``units`` changed, when there are fewer keys than it folded, and once a sliding window drops keys."""
        shape = (shapes.batch, shapes.kv_heads, shapes.groups, shapes.head_dim, shapes.value_dim, dtype, device)
        *structure, columns, thresholds = units.key()  # plain values, and the key columns' tensors
        unchanged = (self._signature is not None and (shape, core, structure) == self._signature[0]
                     and _unchanged((columns, thresholds), self._signature[1]))
        if not unchanged or shapes.kv_len < self.seen or window is not None or dropped_real_keys is not None:
            self.reset()
            self._signature = (shape, dict(core), structure), _recorded((columns, thresholds))
            self._start(shapes, dtype, device, core, units)
        step = shapes.q_len == 1 and causal and not recompute and evaluation != "scores"
        return step and window is None and dropped_real_keys is None

    def step(self, qg, k, v, key_valid, *, stats=None, out_dtype):
        """One decoding step: ``qg (B, Hk, G, 1, d)`` (the last key position) over ``k``, ``v`` ``(B, Hk, Lk, d)``
        (compute dtype), ``key_valid (B, Lk)``; returns ``(B, Hk, G, 1, dv)``. Call :meth:`serves` first."""
        batch, kv_heads, groups, _, d = qg.shape
        kv_len = k.shape[2]
        check_finite_inputs(qg, k[:, :, self.checked_keys:], v[:, :, self.checked_keys:])
        self.checked_keys = kv_len
        if kv_len > self.seen:
            self._fold(k, v, key_valid, kv_len)
        units, per_unit = self._units.per_kv_head, groups // self._units.per_kv_head
        qu = qg.reshape(batch, kv_heads * units, per_unit, 1, d)  # the query heads of each unit
        narrowest = RADIUS_FLOOR if self._core["radius"] is None else self._core["radius"]  # every interval is this wide
        q_large = large_rows(qu, self._threshold) | (self._radius_limit < narrowest)
        far_large, num, den, shift = self._far_part(qu, q_large, kv_len)
        view = lambda x: x.reshape(batch, kv_heads, groups, *x.shape[3:])
        far, q_large = (view(num), view(den), view(shift)), view(far_large)
        band = None
        if self._longest:
            band = _local_band(qg, k, v, key_valid, self._scale, self._band_windows, None, kv_len - 1, None,
                               False, longest=self._longest)
        out, exact_rows = _combine(qg, k, v, key_valid, far, band, q_large, scale=self._scale, causal=True, window=None,
                                   offset=kv_len - 1, recompute=False, out_dtype=out_dtype)
        if stats is not None:
            self._count_pairs(stats, exact_rows, key_valid)
        return out

    def _start(self, shapes, dtype, device, core, units):
        """Settings as tensors on the device, and empty sums."""
        self._units, self._scale, self._core = units, core["scale"], dict(core)
        self._threshold = core["thresholds"][0]
        self._feature_maps = [FeatureMap(shapes.head_dim, g, r, core["sketch_seed"] + b, core["kernel"])
                              for b, (g, r) in enumerate(zip(core["degrees"], core["sketch_dims"]))]
        count = shapes.kv_heads * units.per_kv_head
        per_unit = shapes.groups // units.per_kv_head
        as_tensor = lambda values, kind=torch.long: torch.tensor(values, dtype=kind, device=device)
        self._lags = as_tensor(units.local_windows)  # (N,)
        self._sinks = as_tensor(units.sinks)[:, None]  # (N, 1): sink_keys' per-head form
        self._radius_limit = as_tensor(units.radius_limits, dtype)[None, :, None, None]  # (1, N, 1, 1)
        self._longest = max(units.local_windows)
        self._band_windows = self._lags.repeat_interleave(per_unit).view(shapes.kv_heads, shapes.groups, 1, 1)
        self._kv_head = torch.arange(count, device=device) // units.per_kv_head  # each unit's KV head
        self._columns = None
        if units.column_queries is not None:
            self._columns = (units.column_queries.to(device=device, dtype=dtype),
                             units.column_threshold.to(device=device, dtype=dtype))
        buckets, features = len(self._feature_maps), sum(f.dim for f in self._feature_maps)
        new = lambda *shape, kind=dtype: torch.zeros(*shape, dtype=kind, device=device)
        batch, d, dv = shapes.batch, shapes.head_dim, shapes.value_dim
        self.kv_sum, self.k_sum = new(batch, count, features, dv), new(batch, count, features)
        self.norm_max, self.key_count = new(batch, count, buckets), new(batch, count, buckets, kind=torch.long)
        self.key_sum = new(batch, count, buckets, d)
        self.real_keys = new(batch, count, kind=torch.long)  # real keys folded: the sink ranks continue from them
        self.exact_k, self.exact_v = new(batch, count, 0, d), new(batch, count, 0, dv)
        self.exact_pos, self.exact_count = new(batch, count, 0, kind=torch.long), new(batch, count, kind=torch.long)
        self.exact_slots = 0  # the largest exact_count
        self._held_exact = None  # _exact_block's answer until keys are appended

    def _fold(self, k, v, key_valid, kv_len):
        """Fold the keys that left each unit's band since the last fold: unit ``n`` gets positions
        ``[seen - lag_n, kv_len - lag_n)`` (those >= 0), gathered from its KV head."""
        new = kv_len - self.seen
        positions = self.seen - self._lags[:, None] + torch.arange(new, device=k.device)  # (N, new)
        in_range = positions >= 0
        at = positions.clamp_min(0)
        keys, values = k[:, self._kv_head[:, None], at], v[:, self._kv_head[:, None], at]  # (B, N, new, d)
        valid = key_valid[:, at] & in_range  # (B, N, new)
        self.seen = kv_len
        column_queries, column_threshold = self._columns or (None, None)
        exact, k_bucket = split_keys(keys, valid, self._core["thresholds"], sinks=self._sinks, column_queries=column_queries,
                                     column_threshold=column_threshold, scale=self._scale, dropped_real_keys=self.real_keys)
        self.kv_sum, self.k_sum = _accumulate(_KeyFeatures(keys, values, k_bucket, self._feature_maps), self.kv_sum,
                                              self.k_sum, 0, new)
        member = k_bucket[..., None] == torch.arange(len(self._feature_maps), device=k.device)  # (B, N, new, m)
        norms = torch.where(member, keys.norm(dim=-1)[..., None], torch.zeros((), dtype=keys.dtype, device=keys.device))
        self.norm_max = torch.maximum(self.norm_max, norms.amax(dim=2))
        self.key_sum = self.key_sum + torch.einsum("bhnm,bhnd->bhmd", member.to(keys.dtype), keys)
        self.key_count = self.key_count + member.sum(dim=2)
        self.real_keys = self.real_keys + valid.sum(dim=-1)
        gathered = _gather_rows(exact, (keys, values))
        if gathered is not None:
            (new_k, new_v), index, slot_valid = gathered
            self._append_exact(new_k, new_v, torch.gather(at.expand_as(valid), -1, index), slot_valid)

    def _far_part(self, qu, q_large, kv_len):
        """The exact keys and the polynomial over the folded keys, per query head of each unit ``qu (B, N, Gu, 1, d)``:
        ``(q_large, num, den, shift)`` (a unit with no folded key gets zero sums: only the band counts)."""
        core, scale, buckets = self._core, self._scale, len(self._feature_maps)
        key_norm_max = self.norm_max[:, :, None, None] if core["radius"] is None else None  # (B, N, 1, 1, m)
        centers = None
        if core["kernel"] == "taylor":
            centers = torch.stack([_mean_score(qu, self.key_sum[:, :, b, None], self.key_count[:, :, b, None], scale)
                                   for b in range(buckets)], dim=-1)
        q_large, row_fit = _fit_rows(qu, q_large, key_norm_max, centers, buckets, scale=scale, radius=core["radius"],
                                     radius_limit=self._radius_limit)
        rows = _RowAttention(scale, self._feature_maps, True, None, self._exact_block(), qu.device)
        q_pos = torch.full((1,), kv_len, device=qu.device)  # every held exact key is behind every unit's band
        num, den, shift = rows(qu, q_pos, row_fit, q_large, (self.kv_sum, self.k_sum), [])
        return q_large, num, den, shift

    def _append_exact(self, new_k, new_v, positions, slot_valid):
        """Write each unit's new exact keys after its others (slots ``exact_count`` on), growing the buffers by
        doubling. One host sync (the new largest count)."""
        added = new_k.shape[2]
        capacity = self.exact_k.shape[2]
        if self.exact_slots + added > capacity:
            grow = max(self.exact_slots + added, 2 * capacity) - capacity
            pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, grow) if x.dim() == 4 else (0, grow))
            self.exact_k, self.exact_v, self.exact_pos = pad(self.exact_k), pad(self.exact_v), pad(self.exact_pos)
        slots = self.exact_count[..., None] + torch.arange(added, device=new_k.device)  # (B, N, added)
        self.exact_k.scatter_(2, slots[..., None].expand_as(new_k), new_k)  # unused slots land past the new count
        self.exact_v.scatter_(2, slots[..., None].expand_as(new_v), new_v)
        self.exact_pos.scatter_(2, slots, positions)
        self.exact_count = self.exact_count + slot_valid.sum(dim=-1)
        self.exact_slots = int(self.exact_count.max())
        self._held_exact = None

    def _exact_block(self):
        """The gathered exact keys as :class:`sb_hf.ops.support_basis._RowAttention` takes them, or None (built
        once per change of the held keys)."""
        if self.exact_slots == 0:
            return None
        if self._held_exact is None:
            used = self.exact_slots
            slot_valid = torch.arange(used, device=self.exact_count.device) < self.exact_count[..., None]
            self._held_exact = (self.exact_k[:, :, :used], self.exact_v[:, :, :used]), self.exact_pos[:, :, :used], slot_valid
        return self._held_exact

    def _count_pairs(self, stats, exact_rows, key_valid):
        """The step's visible pairs and exact ones (the band, the held exact keys; every key for an exact row)."""
        kv_len = key_valid.shape[-1]
        batch, kv_heads, groups, _ = exact_rows.shape
        end = torch.full((1,), kv_len, device=key_valid.device)
        pairs = span_counts(key_valid, end - kv_len, end)  # (B, 1)
        band_start = (end - self._lags).clamp_min(0)  # (N,)
        band = span_counts(key_valid, band_start, end.expand_as(band_start))  # (B, N)
        per_unit = (band + self.exact_count).repeat_interleave(groups // self._units.per_kv_head, dim=1)
        exact = torch.where(exact_rows, pairs[:, :, None, None], per_unit.view(batch, kv_heads, groups, 1))
        add_stats(stats, exact_pairs=exact.sum(), pairs=pairs.sum() * exact_rows[0].numel(), exact_rows=exact_rows.sum(),
                  rows=torch.tensor(exact_rows.numel(), device=exact_rows.device))


def decoding_attention(q, k, v, state: DecodingState, *, core: dict, units: Units, scale: float | None = None,
                       causal: bool = True, key_padding_mask=None, sliding_window=None, dropped_real_keys=None,
                       stats=None):
    """A layer's decoding step with per-unit structure in one call: ``(B, Hq, 1, dv)``, or None when ``state``
    does not serve this call (not a single-query causal inference step, a sliding window in effect): run the op.
    ``core``: the shared polynomial (``thresholds``, ``degrees``, ``sketch_dims``, ``sketch_seed``, ``kernel``,
    ``radius``), already validated (the settings of a :class:`sb_hf.SupportBasisConfig`)."""
    batch, q_heads, q_len, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads or (q_heads // kv_heads) % units.per_kv_head:
        raise ValueError(f"{q_heads} query heads, {kv_heads} KV heads and {units.per_kv_head} units per KV head do not fit")
    shapes = Shapes(batch, q_heads, kv_heads, q_heads // kv_heads, q_len, kv_len, d, v.shape[-1])
    scale = d**-0.5 if scale is None else float(scale)
    window = sliding_window if (causal and sliding_window is not None and sliding_window < kv_len) else None
    compute = compute_dtype(q.dtype)
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not state.serves(shapes, compute, q.device, {**core, "scale": scale}, units, causal=causal, window=window,
                        recompute=recompute, dropped_real_keys=dropped_real_keys, evaluation="auto"):
        return None
    key_valid = torch.ones(batch, kv_len, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    qg = q.to(compute).view(batch, kv_heads, q_heads // kv_heads, 1, d)
    out = state.step(qg, k.to(compute), v.to(compute), key_valid, stats=stats, out_dtype=q.dtype)
    return out.reshape(batch, q_heads, 1, -1).to(q.dtype)


def _recorded(tensors) -> list:
    """The key columns' tensors (or Nones) as :func:`_unchanged` compares them later: ``(tensor, version, copy)``."""
    return [None if t is None else (t, t._version, t.detach().clone()) for t in tensors]


def _unchanged(tensors, recorded) -> bool:
    """Whether ``tensors`` equal the :func:`_recorded` ones: the same tensor not edited in place since (its version
    counter) without comparing values, else by value (an op-level caller often passes new tensors)."""
    def same(t, entry):
        if t is None or entry is None:
            return t is None and entry is None
        tensor, version, copy = entry
        if t is tensor and t._version == version:
            return True
        return t.shape == copy.shape and t.device == copy.device and bool(torch.equal(t, copy))

    return all(same(t, entry) for t, entry in zip(tensors, recorded))
