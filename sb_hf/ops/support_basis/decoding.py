"""The support-basis decoding cache: the far part of a growing key sequence, kept as running sums.

A decoding step's query (position ``p``) sees every cached key. Support basis splits them as in
the op (:mod:`sb_hf.ops.support_basis.chunk`): the local band ``p - local_window < j <= p`` is read from the KV cache and
computed exactly, and the keys behind it (the far part) are either exact keys (large, sinks, key columns),
kept gathered in a block, or small keys, whose polynomial attention only needs the sums of ``phi(k) v^T`` and
``phi(k)`` per bucket, the largest key norm (the interval) and the sum of the keys (the taylor centre). A key
leaves the band once and is folded into these then, so a step costs the band, the exact keys and the feature
dimension, not the context length. The result is the op's (the same formulas on the same keys), up to the
rounding of summing in another order. Rows the op computes exactly (large queries, the radius guard, broken
rows) still attend to every cached key.

One state serves all heads of a layer in one call, each *unit* with its own structure (``Units``: local
window, sinks, key columns, radius limit): a unit is a KV head with its query heads (``support_basis_attention``,
``kv_heads`` settings) or a single query head (``heads`` settings); the polynomial (thresholds, degrees, kernel,
sketch, radius) is shared. Use: ``support_basis_attention(..., decoding_state=state)`` with the same state for
every call of one sequence, or :func:`decoding_attention` for a layer with per-head structure;
:mod:`sb_hf.integrations.cache` keeps the states on the transformers cache layer. Calls that are not single-query
causal inference steps (prefill, training, a sliding window in effect, ``evaluation="scores"``) are not served
(the op runs in full); they leave the state alone (a sliding window in effect empties it), and it folds the
keys it has not seen at the next step. Keys must
only ever be appended: :meth:`DecodingState.reset` when the key sequence changes otherwise (cropped, reordered,
another sequence). A change of shapes or settings resets it by itself; keys keep the padding
(``key_padding_mask``) they had when they were folded. With :func:`sb_hf.ops.use_cpu_kernel` a step whose far
part is the degree-0 taylor kernel runs on a CPU as one C++ call (``csrc/decoding_step.cpp``, the same formulas).
"""

from __future__ import annotations

import torch

from .. import fused_cpu
from ..checks import Shapes, all_finite, check_finite_inputs, compute_dtype
from ..cpu_kernel import cpu_kernel
from ..exact import gather_rows
from ..masking import add_stats, span_counts, visible
from ..partial import Partial, exact_part, group_matmul
from .far import RowAttention, combine, fit_rows, mean_score
from .keys import large_rows, split_keys
from .scan import KeyFeatures, accumulate
from .settings import RADIUS_FLOOR, Polynomial, Units

BAND_SPLIT = 0.75  # the band of a decoding step runs one kernel call per KV head when that reads at most this share
MIN_EXACT_SLOTS = 64  # the exact-key buffers grow by at least this many slots (fewer host syncs while they fill)


class DecodingState:
    """The far part of one layer's heads between decoding steps (see the module docstring)."""

    def __init__(self) -> None:
        self.served_steps = 0  # decoding steps computed from this state, over its whole life (resets included)
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
        return [max(self.seen - local_window, 0) for local_window in self._units.local_windows]

    def serves(self, shapes: Shapes, dtype: torch.dtype, device: torch.device, polynomial: Polynomial, scale: float,
               units: Units, *, causal: bool, sliding_window: int | None, recompute: bool, dropped_real_keys,
               evaluation: str) -> bool:
        """Whether the call is a step this state computes: one query, causal, inference, no sliding window in
        effect, every key of the sequence held. Resets the state when the shapes, the polynomial, the scale or
        the ``units`` changed, when there are fewer keys than it folded, and once a sliding window drops keys."""
        shape = (shapes.batch, shapes.kv_heads, shapes.groups, shapes.head_dim, shapes.value_dim, dtype, device)
        *structure, columns, thresholds = units.key()  # plain values, and the key columns' tensors
        unchanged = (self._signature is not None and (shape, polynomial, scale, structure) == self._signature[0]
                     and _unchanged((columns, thresholds), self._signature[1]))
        if not unchanged or shapes.kv_len < self.seen or sliding_window is not None or dropped_real_keys is not None:
            self.reset()
            self._signature = (shape, polynomial, scale, structure), _recorded((columns, thresholds))
            self._start(shapes, dtype, device, polynomial, scale, units)
        step = shapes.q_len == 1 and causal and not recompute and evaluation != "scores"
        return step and sliding_window is None and dropped_real_keys is None

    def step(self, qg, k, v, key_valid, *, padded=True, stats=None, out_dtype):
        """One decoding step: ``qg (B, Hk, G, 1, d)`` (the last key position, the compute dtype) over the cache ``k``,
        ``v`` ``(B, Hk, Lk, d)`` in its own dtype (a step casts only the keys it reads: the new ones, the band and the
        exact rows' keys, never the whole cache), ``key_valid (B, Lk)`` (``padded=False`` promises it all true); returns ``(B, Hk, G, 1, dv)``.
        Call :meth:`serves` first."""
        self.served_steps += 1
        kernel = cpu_kernel() if self._kernel_serves and stats is None else None
        if kernel is not None:
            return self._kernel_step(kernel, qg, k.to(qg.dtype), v.to(qg.dtype), key_valid, padded, out_dtype)
        batch, kv_heads, groups, _, d = qg.shape
        kv_len = k.shape[2]
        self._check_finite(qg, k, v, kv_len)
        if kv_len > self.seen:
            self._fold(k, v, key_valid, kv_len)
        units, per_unit = self._units.per_kv_head, groups // self._units.per_kv_head
        qu = qg.reshape(batch, kv_heads * units, per_unit, 1, d)  # the query heads of each unit
        q_large, far = self._polynomial_part(qu)
        part = self._joined(qg, qu, k, v, key_valid if padded else None, far)
        view = lambda x: x.reshape(batch, kv_heads, groups, *x.shape[3:])
        out, exact_rows = combine(qg, k, v, key_valid, Partial(*map(view, part)), None,
                                  view(q_large), scale=self._scale, causal=True, sliding_window=None, offset=kv_len - 1,
                                  recompute=False, out_dtype=out_dtype)
        if stats is not None:
            self._count_pairs(stats, exact_rows, key_valid)
        return out

    def _kernel_step(self, kernel, qg, k, v, key_valid, padded, out_dtype):
        """:meth:`step` in :mod:`sb_hf.ops.cpu_kernel`'s one call (the state's tensors updated in place). A fold of
        more than one key per unit (the first step) runs here first, so the kernel folds at most one."""
        kv_len = k.shape[2]
        if kv_len - self.seen > 1:
            self._check_finite(qg, k, v, kv_len)
            self._fold(k, v, key_valid, kv_len)
        if kv_len > self.seen:
            self._reserve(1)
        for name in self._KERNEL_STATE:  # (the PyTorch path's updates may leave views behind)
            if not getattr(self, name).is_contiguous():
                setattr(self, name, getattr(self, name).contiguous())
        batch, kv_heads, groups, _, d = qg.shape
        contiguous = lambda x: x if x.stride(-1) == 1 else x.contiguous()
        out = qg.new_empty(batch, kv_heads, groups, v.shape[-1])
        column_queries, column_threshold = self._columns or (None, None)
        status = kernel.decoding_step(
            contiguous(qg[:, :, :, 0]), contiguous(k), contiguous(v), key_valid.contiguous() if padded else None,
            out, *(getattr(self, name) for name in self._KERNEL_STATE), self._units.local_windows, self._units.sinks,
            self._units.radius_limits, column_queries, column_threshold, self.seen, self.checked_keys, not self._sinks_done,
            self._polynomial.threshold, self._scale, -1.0 if self._polynomial.radius is None else self._polynomial.radius, RADIUS_FLOOR,
            torch.finfo(out_dtype).max)
        if status:  # 1-3: a non-finite q, k or v (named by the same check as the PyTorch path); else a bug
            checked = self.checked_keys
            self.reset()
            check_finite_inputs(qg, k[:, :, checked:], v[:, :, checked:])
            raise RuntimeError(f"the decoding kernel failed with status {status} (a full exact-key buffer: a bug)")
        self.seen = self.checked_keys = kv_len
        self._note_sinks()
        return out.unsqueeze(3)

    # The state as the kernel takes it, in its argument order.
    _KERNEL_STATE = ("kv_sum", "k_sum", "key_sum", "key_count", "norm_max", "real_keys", "exact_k", "exact_v", "exact_bias",
                     "exact_count")

    def _check_finite(self, qg, k, v, kv_len):
        """The query and the keys and values no earlier call checked, in one pass (a step checks one key per head);
        on a failure the state forgets everything and :func:`check_finite_inputs` names the culprit."""
        new_k, new_v = k[:, :, self.checked_keys:].to(qg.dtype), v[:, :, self.checked_keys:].to(qg.dtype)
        if not bool(all_finite(torch.cat([qg.reshape(-1), new_k.reshape(-1), new_v.reshape(-1)]))):
            self.reset()
            check_finite_inputs(qg, new_k, new_v)
        self.checked_keys = kv_len

    def _start(self, shapes, dtype, device, polynomial, scale, units):
        """Settings as tensors on the device, and empty sums."""
        self._units, self._scale, self._polynomial = units, scale, polynomial
        self._feature_maps = polynomial.feature_maps(shapes.head_dim)
        self._rows = RowAttention(self._scale, self._feature_maps, True, None, None, device)  # the polynomial alone
        # What the C++ step computes: one bucket's degree-0 taylor kernel, on a CPU (sb_hf.ops.cpu_kernel).
        self._kernel_serves = (device.type == "cpu" and polynomial.degrees == (0,) and polynomial.kernel == "taylor")
        count = shapes.kv_heads * units.per_kv_head
        per_unit = shapes.groups // units.per_kv_head
        as_tensor = lambda values, kind=torch.long: torch.tensor(values, dtype=kind, device=device)
        self._local_windows = as_tensor(units.local_windows)  # (N,)
        self._sinks = as_tensor(units.sinks)[:, None]  # (N, 1): sink_keys' per-head form
        self._sinks_done = max(units.sinks) == 0  # every unit has folded its sinks: no later key can be one
        radius_limit = as_tensor(units.radius_limits, dtype)[None, :, None, None]  # (1, N, 1, 1)
        narrowest = RADIUS_FLOOR if polynomial.radius is None else polynomial.radius  # every interval is this wide
        self._radius_limit, self._every_row = radius_limit, radius_limit < narrowest  # units whose rows are all exact
        self._band_windows = self._local_windows.repeat_interleave(per_unit).view(shapes.kv_heads, shapes.groups, 1, 1)
        self._band_bias = torch.zeros(shapes.kv_heads, shapes.groups, 1, 0, dtype=dtype, device=device)
        self._band_sees = (self._band_windows > 0)[..., 0] if min(units.local_windows) == 0 else None  # (Hk, G, 1)
        # The band reads, per KV head, the keys of its query heads' widest local window: one kernel call for all KV
        # heads (at the widest of all) unless one call per KV head reads at most BAND_SPLIT of that.
        widest = [max(units.local_windows[h * units.per_kv_head : (h + 1) * units.per_kv_head]) for h in range(shapes.kv_heads)]
        split = sum(widest) <= BAND_SPLIT * len(widest) * max(widest)
        self._band_spans = ([(h, h + 1, w) for h, w in enumerate(widest)] if split else [(0, shapes.kv_heads, max(widest))])
        self._kv_head = torch.arange(count, device=device) // units.per_kv_head  # each unit's KV head
        self._buckets = torch.arange(len(self._feature_maps), device=device)
        self._columns = None
        if units.column_queries is not None:
            self._columns = (units.column_queries.to(device=device, dtype=dtype).contiguous(),
                             units.column_threshold.to(device=device, dtype=dtype).contiguous())
        buckets, features = len(self._feature_maps), sum(f.dim for f in self._feature_maps)
        new = lambda *shape, kind=dtype: torch.zeros(*shape, dtype=kind, device=device)
        batch, d, dv = shapes.batch, shapes.head_dim, shapes.value_dim
        self.kv_sum, self.k_sum = new(batch, count, features, dv), new(batch, count, features)
        self.norm_max, self.key_count = new(batch, count, buckets), new(batch, count, buckets, kind=torch.long)
        self.key_sum = new(batch, count, buckets, d)
        self.real_keys = new(batch, count, kind=torch.long)  # real keys folded: the sink ranks continue from them
        # Each unit's exact keys, in slots [0, exact_count); exact_bias is 0 there and -inf in the free slots, so a
        # step reads the whole buffer without a host sync; slot_bound >= the largest count (a host-side bound).
        self.exact_k, self.exact_v = new(batch, count, 0, d), new(batch, count, 0, dv)
        self.exact_bias, self.exact_count = new(batch, count, 0), new(batch, count, kind=torch.long)
        self._slot_bound = 0

    def _fold(self, k, v, key_valid, kv_len):
        """Fold the keys that left each unit's band since the last fold: unit ``n`` gets positions
        ``[seen - local_window_n, kv_len - local_window_n)`` (those >= 0), gathered from its KV head."""
        new = kv_len - self.seen
        positions = self.seen - self._local_windows[:, None] + torch.arange(new, device=k.device)  # (N, new)
        in_range = positions >= 0
        at = positions.clamp_min(0)
        keys, values = (x[:, self._kv_head[:, None], at].to(self.key_sum.dtype) for x in (k, v))  # (B, N, new, d)
        valid = key_valid[:, at] & in_range  # (B, N, new)
        self.seen = kv_len
        column_queries, column_threshold = self._columns or (None, None)
        exact, k_bucket = split_keys(keys, valid, self._polynomial.thresholds, sinks=None if self._sinks_done else self._sinks,
                                     column_queries=column_queries, column_threshold=column_threshold, scale=self._scale,
                                     dropped_real_keys=self.real_keys)
        self.kv_sum, self.k_sum = accumulate(KeyFeatures(keys, values, k_bucket, self._feature_maps), self.kv_sum,
                                              self.k_sum, 0, new)
        member = k_bucket[..., None] == self._buckets  # (B, N, new, m)
        if self._polynomial.radius is None:  # the intervals
            norms = torch.where(member, keys.norm(dim=-1)[..., None], torch.zeros((), dtype=keys.dtype, device=keys.device))
            self.norm_max = torch.maximum(self.norm_max, norms.amax(dim=2))
        if self._polynomial.kernel == "taylor":  # the centres
            self.key_sum = self.key_sum + torch.einsum("bhnm,bhnd->bhmd", member.to(keys.dtype), keys)
            self.key_count = self.key_count + member.sum(dim=2)
        if not self._sinks_done:
            self.real_keys = self.real_keys + valid.sum(dim=-1)
            self._note_sinks()
        self._append_exact(keys, values, exact)

    def _note_sinks(self):
        """Whether every unit has now folded its sinks (then no later key can be one, and folds skip the test)."""
        if not self._sinks_done:
            self._sinks_done = bool((self.real_keys >= self._sinks[:, 0]).all())

    def _append_exact(self, keys, values, exact):
        """Write each unit's new exact keys (``exact (B, N, new)`` of ``keys``, ``values``) after its others. One key
        per unit (a decoding step) is written at the unit's next slot whether exact or not (a non-exact one stays a
        free slot), with no host sync; the buffers grow by doubling when the host-side bound on the largest count
        says they might be full (then one sync: the true count)."""
        if keys.shape[2] == 1:
            slot_valid = exact
        else:
            gathered = gather_rows(exact, (keys, values))
            if gathered is None:
                return
            (keys, values), _, slot_valid = gathered
        added = keys.shape[2]
        self._reserve(added)
        slots = self.exact_count[..., None] + torch.arange(added, device=keys.device)  # (B, N, added)
        self.exact_k.scatter_(2, slots[..., None].expand_as(keys), keys)
        self.exact_v.scatter_(2, slots[..., None].expand_as(values), values)
        self.exact_bias.scatter_(2, slots, torch.zeros((), dtype=keys.dtype, device=keys.device).masked_fill(~slot_valid, float("-inf")))
        self.exact_count = self.exact_count + slot_valid.sum(dim=-1)

    def _reserve(self, added):
        """Room for ``added`` more exact keys in every unit's buffers: they grow (by doubling) when the host-side bound
        on the largest count says they might be full (then one sync: the true count)."""
        capacity = self.exact_k.shape[2]
        self._slot_bound += added
        if self._slot_bound > capacity:
            self._slot_bound = int(self.exact_count.max()) + added
            if self._slot_bound > capacity:
                grow = max(self._slot_bound, 2 * capacity, MIN_EXACT_SLOTS) - capacity
                pad = lambda x, value=0.0: torch.nn.functional.pad(x, (0, 0, 0, grow) if x.dim() == 4 else (0, grow), value=value)
                self.exact_k, self.exact_v, self.exact_bias = pad(self.exact_k), pad(self.exact_v), pad(self.exact_bias, float("-inf"))

    def _polynomial_part(self, qu):
        """The polynomial over the folded small keys, per query head of each unit ``qu (B, N, Gu, 1, d)``: ``q_large``
        (the large rows and those the radius guard sends to the exact path) and its partial attention (a unit
        with no folded key gets zero sums)."""
        polynomial, scale, buckets = self._polynomial, self._scale, len(self._feature_maps)
        q_large = large_rows(qu, polynomial.threshold) | self._every_row
        key_norm_max = self.norm_max[:, :, None, None] if polynomial.radius is None else None  # (B, N, 1, 1, m)
        centers = None
        if polynomial.kernel == "taylor":
            centers = torch.stack([mean_score(qu, self.key_sum[:, :, b, None], self.key_count[:, :, b, None], scale)
                                   for b in range(buckets)], dim=-1)
        q_large, row_fit = fit_rows(qu, q_large, key_norm_max, centers, buckets, scale=scale, radius=polynomial.radius,
                                     radius_limit=self._radius_limit)
        return q_large, self._rows(qu, None, row_fit, q_large, (self.kv_sum, self.k_sum), [])

    def _joined(self, qg, qu, k, v, key_valid, far):
        """The local band and the held exact keys joined with the polynomial part ``far``, relative to one shift per
        row: a partial attention per unit. ``key_valid`` None: no padding."""
        batch, count, per_unit = qu.shape[:3]
        band_num, band_den, band_shift = (x.reshape(batch, count, per_unit, *x.shape[3:]) for x in self._band(qg, k, v, key_valid))
        held = group_matmul(qu * self._scale, self.exact_k.transpose(-1, -2)) + self.exact_bias[:, :, None, None]  # (B, N, Gu, 1, slots)
        num, den, shift = far
        top = torch.maximum(shift, band_shift)  # finite: the polynomial's shift is
        if held.shape[-1]:
            top = torch.maximum(top, held.amax(dim=-1))
        weights = torch.exp(held - top[..., None])  # a free slot weighs exp(-inf) = 0
        far_weight, band_weight = torch.exp(shift - top), torch.exp(band_shift - top)
        num = group_matmul(weights, self.exact_v) + num * far_weight[..., None] + band_num * band_weight[..., None]
        return Partial(num, weights.sum(dim=-1) + den * far_weight + band_den * band_weight, top)

    def _band(self, qg, k, v, key_valid):
        """Exact attention of the query to its local band, a partial attention per query head ``(B, Hk, G, 1, ...)``
        (``shift`` -inf for a head that sees no key): per span of KV heads (:meth:`_start`), the last
        ``min(widest local window, Lk)`` keys, each query head's window as a bias."""
        parts = [self._band_span(qg[:, h0:h1], k[:, h0:h1], v[:, h0:h1], key_valid, h0, h1, widest)
                 for h0, h1, widest in self._band_spans]
        if len(parts) == 1:
            return parts[0]
        return Partial(*(torch.cat(x, dim=1) for x in zip(*parts)))

    def _band_span(self, qg, k, v, key_valid, h0, h1, widest):
        """:meth:`_band` for the KV heads ``[h0, h1)``. On a CPU in PyTorch's fused kernel (GQA as it is, the
        log-sum-exp for the merge; faster than the matmuls for bands of hundreds of keys, as fast for thousands, measured),
        elsewhere plain matmuls."""
        batch, kv_heads, groups, _, d = qg.shape
        kv_len = k.shape[2]
        width = min(widest, kv_len)
        if width == 0:
            empty = qg.new_zeros(batch, kv_heads, groups, 1)
            return Partial(empty[..., None].expand(*empty.shape, v.shape[-1]), empty, torch.full_like(empty, float("-inf")))
        band_k, band_v = k[:, :, kv_len - width:].to(qg.dtype), v[:, :, kv_len - width:].to(qg.dtype)
        bias = self._band_bias_for(width)[h0:h1]  # (Hk, G, 1, width)
        if key_valid is not None:
            bias = bias.masked_fill(~key_valid[:, None, None, None, kv_len - width:], float("-inf"))  # (B, Hk, G, 1, width)
        if not fused_cpu.available(qg, v):
            return exact_part(qg, band_k, band_v, bias > float("-inf"), self._scale)
        heads = kv_heads * groups
        out, lse = fused_cpu.kernel(
            qg.reshape(batch, heads, 1, d), band_k, band_v, attn_mask=bias.reshape(-1, heads, 1, width), scale=self._scale)
        shape = (batch, kv_heads, groups, 1)
        out, lse = out.view(*shape, -1), lse.view(shape).to(out.dtype)
        # The kernel gives a row that sees no key 0 and 0; a row sees one when its window is not empty (then it
        # holds the query's own key) and that key is real.
        seen = None if self._band_sees is None else self._band_sees[h0:h1]
        if key_valid is not None:
            seen = key_valid[:, -1, None, None, None] if seen is None else seen & key_valid[:, -1, None, None, None]
        if seen is not None:
            lse = torch.where(seen, lse, float("-inf"))
        return Partial(out, torch.ones_like(lse), lse)

    def _band_bias_for(self, width):
        """``(Hk, G, 1, width)``: 0 where the query head's window shows the key (of the last ``width`` keys), else
        -inf. It depends only on the distance from the last key, so a longer one's tail serves."""
        if self._band_bias.shape[-1] < width:
            length = max(width, 2 * self._band_bias.shape[-1])
            positions = torch.arange(length, device=self._band_bias.device)
            shown = visible(positions[-1:], positions, causal=True, sliding_window=self._band_windows)  # (Hk, G, 1, length)
            self._band_bias = torch.zeros(shown.shape, dtype=self._band_bias.dtype, device=shown.device).masked_fill(
                ~shown, float("-inf"))
        return self._band_bias[..., self._band_bias.shape[-1] - width:]

    def _count_pairs(self, stats, exact_rows, key_valid):
        """The step's visible pairs and exact ones (the band, the held exact keys; every key for an exact row)."""
        kv_len = key_valid.shape[-1]
        batch, kv_heads, groups, _ = exact_rows.shape
        end = torch.full((1,), kv_len, device=key_valid.device)
        pairs = span_counts(key_valid, end - kv_len, end)  # (B, 1)
        band_start = (end - self._local_windows).clamp_min(0)  # (N,)
        band = span_counts(key_valid, band_start, end.expand_as(band_start))  # (B, N)
        per_unit = (band + self.exact_count).repeat_interleave(groups // self._units.per_kv_head, dim=1)
        exact = torch.where(exact_rows, pairs[:, :, None, None], per_unit.view(batch, kv_heads, groups, 1))
        add_stats(stats, exact_pairs=exact.sum(), pairs=pairs.sum() * exact_rows[0].numel(), exact_rows=exact_rows.sum(),
                  rows=torch.tensor(exact_rows.numel(), device=exact_rows.device))


def decoding_attention(q, k, v, state: DecodingState, *, polynomial: Polynomial, units: Units, scale: float | None = None,
                       causal: bool = True, key_padding_mask=None, sliding_window=None, dropped_real_keys=None,
                       stats=None):
    """A layer's decoding step with per-unit structure in one call: ``(B, Hq, 1, dv)``, or None when ``state``
    does not serve this call (not a single-query causal inference step, a sliding window in effect): run the op.
    ``polynomial``: the one every unit shares; ``units``: each unit's structure."""
    batch, q_heads, q_len, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_heads % kv_heads or (q_heads // kv_heads) % units.per_kv_head:
        raise ValueError(f"{q_heads} query heads, {kv_heads} KV heads and {units.per_kv_head} units per KV head do not fit")
    shapes = Shapes(batch, q_heads, kv_heads, q_heads // kv_heads, q_len, kv_len, d, v.shape[-1])
    scale = d**-0.5 if scale is None else float(scale)
    if not (causal and sliding_window is not None and sliding_window < kv_len):
        sliding_window = None  # (not in effect: it hides no key)
    compute = compute_dtype(q.dtype)
    recompute = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if not state.serves(shapes, compute, q.device, polynomial, scale, units, causal=causal, sliding_window=sliding_window,
                        recompute=recompute, dropped_real_keys=dropped_real_keys, evaluation="auto"):
        return None
    key_valid = torch.ones(batch, kv_len, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    qg = q.to(compute).view(batch, kv_heads, q_heads // kv_heads, 1, d)
    out = state.step(qg, k, v, key_valid, padded=key_padding_mask is not None, stats=stats,
                     out_dtype=q.dtype)
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
