"""Block-support attention, the fast path: what :mod:`.naive` defines densely, with the skipped blocks never scored.

The query rows go by *query blocks* (the rows whose positions share a key block), a chunk of query blocks at a time.
For each chunk:

1. **fixed part**, exact: per query block its band blocks (and, under a sliding window, the blocks that straddle
   the window's edge) and the sinks as one key tile that a KV head's query heads share (their rows side by side);
2. **selection**: each row's estimated mass of every candidate block (:mod:`.estimates`), the exact mass of part 1,
   and :func:`.settings.select_blocks` per row, or over the query block's rows pooled (``selection="pooled"``; up to
   each row for ``"prefix"``);
3. **selected part**, exact: per query head and query block, the blocks its rows selected gathered as one tile;
   each row masked to its own selection (``"row"``, ``"prefix"``), or every row taking the whole tile (``"union"``,
   ``"pooled"``: one mask row per tile);
4. **far part**: the centroids of the candidates a row did not take (``far="centroid"``);

and the four parts merge exactly (:func:`..partial.merge`). The exact tiles run in PyTorch's fused CPU kernel at
inference on a CPU (:func:`..fused_cpu.fused_masked`), as plain matmuls elsewhere (and for gradients). ``stats``
reports the tiles' pairs (``computed_pairs``) and the estimate's work (``estimate_pairs``) beside the twin's counts.
The one host sync per chunk is the selected tiles' width (the CUDA path is issue 26's).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .. import fused_cpu
from ..checks import check_chunk_size, check_dropped, check_inputs, compute_dtype
from ..masking import add_stats, key_spans, sink_keys, span_counts, visible
from ..partial import Partial, masked_exp, merge, normalized
from .estimates import FAST_ESTIMATES, centroid_log_mass, estimate_pairs, estimated_log_mass
from .settings import SHARED_SELECTIONS, BlockSettings, select_blocks

DEFAULT_CHUNK_BLOCKS = 16  # query blocks per chunk (bounds the tiles' memory)


def block_support_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    gamma: float = BlockSettings.gamma,
    block_size: int = BlockSettings.block_size,
    sinks: int = BlockSettings.sinks,
    local_window: int = BlockSettings.local_window,
    selection: str = BlockSettings.selection,
    estimate: str = BlockSettings.estimate,
    far: str = BlockSettings.far,
    sample_stride: int = BlockSettings.sample_stride,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    dropped_real_keys: torch.Tensor | None = None,
    stats: dict | None = None,
    chunk_blocks: int | None = None,
) -> torch.Tensor:
    """Block-support attention (:mod:`.naive` defines it; this computes the same). ``stats`` receives the twin's counts
    and the work of a block-sparse kernel: ``computed_pairs`` (rows against their query block's tiles, masked pairs
    included) and ``estimate_pairs`` (the selection's, in pairs)."""
    settings = BlockSettings(gamma, block_size, sinks, local_window, selection, estimate, far, sample_stride)
    shapes = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window,
                          scale=scale)
    settings.check(causal)
    if settings.selection == "last" or settings.estimate not in FAST_ESTIMATES:
        raise ValueError(f"the fast block-support op selects with each row's own estimate (selection 'row', 'union', "
                         f"'pooled' or 'prefix') with the estimates "
                         f"{FAST_ESTIMATES}; got selection={settings.selection!r}, estimate={settings.estimate!r} "
                         "(sb_hf.ops.reference.block_support_attention computes every mode)")
    check_dropped(dropped_real_keys, shapes.batch)
    check_chunk_size(chunk_blocks, "chunk_blocks", f"the default, {DEFAULT_CHUNK_BLOCKS} query blocks per chunk")
    b_, hk, g, lq, lk, d = shapes.batch, shapes.kv_heads, shapes.groups, shapes.q_len, shapes.kv_len, shapes.head_dim
    size, device = settings.block_size, q.device
    scale = d**-0.5 if scale is None else scale
    # The exact tiles in PyTorch's fused CPU kernel at inference; plain matmuls for gradients (the kernel's backward
    # does not carry the log-sum-exp's gradient, which the merge needs) and elsewhere.
    fused = fused_cpu.available(q, v) and not (torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)))
    blocked = block_inputs(q, k, v, settings, key_padding_mask, dropped_real_keys)
    kp, vp, member, summary, sink_parts = blocked.kp, blocked.vp, blocked.member, blocked.summary, blocked.sinks
    qb, first_block, nqb, front, offset = blocked.qb, blocked.first_block, blocked.nqb, blocked.front, lk - lq
    out, exact_counts = [], []
    step = chunk_blocks or DEFAULT_CHUNK_BLOCKS
    for c0 in range(0, nqb, step):
        part_out, part_counts = query_blocks(
            qb[:, :, c0 : c0 + step], first_block + c0, kp, vp, member, summary, sink_parts,
            settings, scale, fused, sliding_window, offset, lk, stats)
        out.append(part_out)
        exact_counts.append(part_counts)
    rows = lambda x: x.permute(0, 1, 3, 2, 4, *range(5, x.dim())).reshape(b_, hk * g, nqb * size, *x.shape[5:])
    result = rows(torch.cat(out, dim=2))[:, :, front : front + lq].to(q.dtype)
    if stats is not None:
        exact = rows(torch.cat(exact_counts, dim=2))[:, :, front : front + lq]  # (B, Hq, Lq)
        start, end = key_spans(lq, lk, causal=True, sliding_window=sliding_window, device=device)
        seen = span_counts(blocked.key_valid, start, end)[:, None, :]  # (B, 1, Lq)
        add_stats(stats, exact_pairs=exact.sum(), pairs=seen.sum() * hk * g, exact_rows=(exact == seen).sum(),
                  rows=torch.tensor(b_ * hk * g * lq, device=device))
    return result


class BlockInputs(NamedTuple):
    """The inputs of a call in blocks: keys ``kp`` and values ``vp`` ``(B, Hk, nb, size, d)`` (zero padded to whole
    blocks, the compute dtype), each block's ``member`` keys ``(B, nb, size)`` (real keys, not sinks) and their
    ``summary`` (:func:`block_summaries`); the ``sinks``: their keys, values ``(B, Hk, S, d)``, positions and flags
    ``(B, S)``, and ``leading`` (the number of sinks when they are the only non-members and come first, else None);
    the queries by query block ``qb (B, Hk, nqb, G, size, d)`` (zero rows before the call's first query and after its
    last), the first query block ``first_block``, their number ``nqb``, the rows before the first query ``front``,
    and ``key_valid (B, Lk)``."""

    kp: torch.Tensor
    vp: torch.Tensor
    member: torch.Tensor
    summary: dict
    sinks: tuple
    qb: torch.Tensor
    first_block: int
    nqb: int
    front: int
    key_valid: torch.Tensor


def block_inputs(q, k, v, settings, key_padding_mask, dropped_real_keys) -> BlockInputs:
    """The call's inputs in blocks (:class:`BlockInputs`)."""
    (b_, hq, lq, d), (hk, lk) = q.shape, k.shape[1:3]
    g, size, device, compute = hq // hk, settings.block_size, q.device, compute_dtype(q.dtype)
    offset, nb = lk - lq, -(-lk // size)
    first_block, nqb = offset // size, nb - offset // size  # the query blocks of the call
    front = offset - first_block * size  # rows of the first query block before the call's first query
    # Keys padded to whole blocks; the sinks; each block's members (real keys, not sinks) and their summaries.
    key_valid = torch.ones(b_, lk, dtype=torch.bool, device=device) if key_padding_mask is None else key_padding_mask
    sink = sink_keys(key_valid, settings.sinks, dropped_real_keys)
    pad = nb * size - lk
    kp = torch.nn.functional.pad(k.to(compute), (0, 0, 0, pad)).view(b_, hk, nb, size, d)
    vp = torch.nn.functional.pad(v.to(compute), (0, 0, 0, pad)).view(b_, hk, nb, size, -1)
    member = torch.nn.functional.pad(key_valid & ~sink, (0, pad)).view(b_, nb, size)
    summary = block_summaries(kp, vp, member, settings.estimate)
    n_sinks = min(settings.sinks, lk)
    sink_pos = torch.sort((~sink).to(torch.uint8), dim=1, stable=True).indices[:, :n_sinks]  # (B, S)
    sink_ok = sink.gather(1, sink_pos)
    take = lambda x: x.gather(2, sink_pos[:, None, :, None].expand(-1, hk, -1, x.shape[-1])).to(compute)
    leading = n_sinks if key_padding_mask is None and dropped_real_keys is None else None  # the only non-members
    # Query rows by query block: (B, Hk, nqb, G, size, d).
    qp = torch.nn.functional.pad(q.to(compute), (0, 0, front, nqb * size - front - lq))
    qb = qp.view(b_, hk, g, nqb, size, d).permute(0, 1, 3, 2, 4, 5)
    return BlockInputs(kp, vp, member, summary, (take(k), take(v), sink_pos, sink_ok, leading), qb, first_block, nqb,
                       front, key_valid)


def block_summaries(kp, vp, member, estimate) -> dict:
    """Per (batch, KV head, block): the members' ``count``, ``log_count``, mean key ``centroid``, mean value
    ``mean_value``, and for the bound their per-channel ``high`` and ``low`` (0 for a block without members)."""
    weight = member[:, None, :, :, None].to(kp.dtype)  # (B, 1, nb, size, 1)
    count = member.sum(dim=-1).to(kp.dtype)  # (B, nb)
    per = count.clamp_min(1)[:, None, :, None]
    summary = dict(count=count, log_count=count.clamp_min(1).log()[:, None, None, :],
                   centroid=(kp * weight).sum(dim=3) / per, mean_value=(vp * weight).sum(dim=3) / per)
    if estimate == "bound":
        big, some = torch.finfo(kp.dtype).max, (count > 0)[:, None, :, None]
        summary["high"] = torch.where(some, torch.where(weight > 0, kp, -big).amax(dim=3), 0.0)
        summary["low"] = torch.where(some, torch.where(weight > 0, kp, big).amin(dim=3), 0.0)
    return summary


def query_blocks(qc, first, kp, vp, member, summary, sinks, settings, scale, fused, sliding_window, offset, kv_len,
                 stats):
    """One chunk of query blocks ``qc (B, Hk, nc, G, size, d)``, the first of them query block ``first`` (``fused``:
    the exact tiles in the fused CPU kernel): the attention output ``(B, Hk, nc, G, size, dv)`` and each row's count of exact keys ``(B, Hk, nc, G, size)``."""
    b_, hk, nc, g, size, d = qc.shape
    nb, device = kp.shape[2], qc.device
    scored_keys = max(0, (first + nc - 1 - settings.band_blocks) * size)  # the keys that hold every candidate
    pos = torch.arange(first, first + nc, device=device)[:, None] * size + torch.arange(size, device=device)  # (nc, size)
    row_ok = (pos >= offset) & (pos < kv_len)
    rows = qc.reshape(b_, hk, nc, g * size, d)

    # 1. The sinks and the fixed blocks: one key tile per query block, the sinks first.
    k_tile, v_tile, mask, fixed = fixed_tile(qc.shape, first, kp, vp, member, sinks, settings, sliding_window, offset,
                                             kv_len)
    exact = tile_part(rows, k_tile, v_tile, mask, scale, fused)
    counts = mask.sum(dim=-1).expand(b_, hk, nc, g * size)  # rows' exact keys
    exact_log_mass = exact.den.log() + exact.shift  # (B, Hk, nc, G * size)

    # 2. The selection: candidates of each query block, each row's estimates, the rule.
    candidate, own, centroid = choose_blocks(rows, exact_log_mass, first, kp, member, summary, sinks[-1], settings,
                                             scale, sliding_window, row_ok)

    # 3. The selected candidates: per query head, the blocks its rows of a query block selected as one tile.
    own_heads = own.view(b_, hk, nc, g, size, nb)
    tile = own_heads.any(dim=4)  # (B, Hk, nc, G, nb)
    part, selected_counts = selected_part(rows.view(b_, hk, nc, g, size, d), own_heads, tile, kp, vp, member, scale,
                                          fused, shared=settings.selection in SHARED_SELECTIONS)
    if part is not None:
        exact = merge(exact, Partial(part.num.flatten(3, 4), part.den.flatten(3, 4), part.shift.flatten(3, 4)))
        counts = counts + (selected_counts * row_ok[None, None, :, None, :]).flatten(3, 4)

    # 4. The far field: the centroids of the candidates a row did not take.
    pseudo = candidate & ~own
    if settings.far == "centroid":
        weights, top = masked_exp(centroid, pseudo)
        exact = merge(exact, Partial(weights @ summary["mean_value"][:, :, None], weights.sum(dim=-1), top))
    out = normalized(exact.num, exact.den).view(b_, hk, nc, g, size, -1)
    counts = counts.view(b_, hk, nc, g, size)
    if stats is not None:  # a block-sparse kernel's work: each row against its query block's sinks and tiles
        tile_keys = g * (sinks[0].shape[2] + size * (fixed >= 0).sum(dim=-1)) + size * tile.sum(dim=(-1, -2))  # (B, Hk, nc)
        for key, value in (("centroid_pairs", pseudo.sum() if settings.far == "centroid" else 0), ("selected_blocks", own.sum()),
                           ("candidate_blocks", candidate.sum()), ("computed_pairs", (tile_keys * row_ok.sum(-1)).sum()),
                           ("estimate_pairs", row_ok.sum() * b_ * hk * g * estimate_pairs(settings.estimate, nb, scored_keys, settings.sample_stride))):
            stats[key] = stats.get(key, 0) + value
    return out, counts


def fixed_tile(shape, first, kp, vp, member, sinks, settings, sliding_window, offset, kv_len):
    """The exact tile of a chunk of query blocks (``shape``: the chunk's ``(B, Hk, nc, G, size, d)``, the first of
    them query block ``first``): the sinks and the fixed blocks (:func:`fixed_blocks`), ``k_tile``, ``v_tile``
    ``(B, Hk, nc, keys, d)`` (None with ``vp`` None: a caller that only scores the tile), the rows' ``mask``
    ``(B | 1, Hk | 1, nc | 1, G * size, keys)`` (one mask row set for every query block when they all see their tiles
    alike) and the fixed blocks ``(nc, nf)``."""
    b_, hk, nc, g, size, _ = shape
    nb, device = kp.shape[2], kp.device
    blocks = torch.arange(first, first + nc, device=device)
    pos = blocks[:, None] * size + torch.arange(size, device=device)  # (nc, size)
    row_ok = (pos >= offset) & (pos < kv_len)
    k_sink, v_sink, sink_pos, sink_ok, leading_sinks = sinks
    fixed = fixed_blocks(blocks, settings.band_blocks, size, sliding_window, nb)  # (nc, nf), -1: none
    k_tile, v_tile = gather_blocks(kp, vp, fixed.expand(b_, hk, -1, -1))
    fixed_pos = (fixed.clamp_min(0)[:, :, None] * size + torch.arange(size, device=device)).flatten(1)  # (nc, nf * size)
    # Without padding or a window, past the sinks' blocks and inside the call, every query block sees its tile alike
    # (the sinks, whole band blocks, its own block causally): one mask for the chunk, which the kernel broadcasts.
    past_sinks = leading_sinks is not None and first - settings.band_blocks >= -(-leading_sinks // size)
    alike = past_sinks and sliding_window is None and first * size >= offset and (first + nc) * size <= kv_len
    some, seqs = (slice(0, 1), 1) if alike else (slice(None), b_)  # (the first query block's mask stands for all)
    fixed_keys = (fixed[some] >= 0).repeat_interleave(size, dim=1)
    fixed_member = member.view(b_, -1)[:seqs, fixed_pos[some]] & fixed_keys  # (B | 1, nc | 1, nf * size)
    sees = fixed_member[:, :, None, :] & visible(pos[some], fixed_pos[some], causal=True, sliding_window=sliding_window)[None]
    if k_sink.shape[2]:
        sees_sink = sink_ok[:seqs, None, None, :] & visible(pos[some], sink_pos[:seqs, None, :], causal=True,
                                                            sliding_window=sliding_window)
        sees = torch.cat([sees_sink.expand(-1, sees.shape[1], -1, -1), sees], dim=-1)
        with_sinks = lambda sink, tile: torch.cat([sink[:, :, None].expand(-1, -1, nc, -1, -1), tile], dim=3)
        k_tile, v_tile = with_sinks(k_sink, k_tile), None if v_tile is None else with_sinks(v_sink, v_tile)
    if alike:  # (1, 1, 1, G * size, keys)
        mask = sees[:, None, :, None].expand(1, 1, 1, g, size, sees.shape[-1]).reshape(1, 1, 1, g * size, -1)
    else:
        mask = (sees[:, None, :, None] & row_ok[None, None, :, None, :, None]).expand(b_, hk, nc, g, size, -1)
        mask = mask.reshape(b_, hk, nc, g * size, -1)
    return k_tile, v_tile, mask, fixed


def choose_blocks(rows, exact_log_mass, first, kp, member, summary, leading_sinks, settings, scale, sliding_window,
                  row_ok):
    """The selection of a chunk of query blocks, ``rows (B, Hk, nc, G * size, d)`` (the first of them query block
    ``first``; ``row_ok (nc, size)``: the rows inside the call) whose fixed keys hold ``exact_log_mass (B, Hk, nc,
    G * size)``: each row's ``candidate`` blocks and its selected ones, ``own``, both ``(B, Hk, nc, G * size, nb)``
    (a shared selection repeated over its rows), and the rows' ``centroid`` scores (None unless ``far="centroid"``)."""
    b_, hk, nc, r, _ = rows.shape
    nb, size, device = kp.shape[2], kp.shape[3], rows.device
    g = r // size
    blocks = torch.arange(first, first + nc, device=device)
    scored_keys = max(0, (first + nc - 1 - settings.band_blocks) * size)  # the keys that hold every candidate
    block = torch.arange(nb, device=device)
    last_row = (blocks + 1) * size - 1
    candidate = block < (blocks - settings.band_blocks)[:, None]  # (nc, nb)
    if sliding_window is not None:
        candidate = candidate & (block * size > (last_row - sliding_window)[:, None])
    candidate = candidate[None, None, :, None, :] & (summary["count"] > 0)[:, None, None, None, :]  # (B, 1, nc, 1, nb)
    candidate = candidate & row_ok[None, None, :, :, None]  # (B, 1, nc, size, nb)
    candidate = candidate[:, :, :, None].expand(b_, hk, nc, g, size, nb).reshape(b_, hk, nc, g * size, nb)
    centroid = None if settings.far != "centroid" else centroid_log_mass(rows, summary, scale)  # (the far field's)
    estimate = estimated_log_mass(settings.estimate, rows, first * size, kp, member, summary, scale, scored_keys,
                                  settings.sample_stride, centroid, leading_sinks)
    estimate = torch.where(candidate, estimate, float("-inf"))
    if settings.selection in ("pooled", "prefix"):  # the rows' shares of their estimated totals, summed per query
        # block and head (up to each row for "prefix")
        total = torch.logaddexp(exact_log_mass, estimate.logsumexp(dim=-1))
        total = torch.where(total > float("-inf"), total, torch.zeros_like(total))[..., None]
        shares = lambda log_mass: (log_mass - total).exp().view(b_, hk, nc, g, size, -1)
        if settings.selection == "pooled":
            pooled = lambda log_mass: shares(log_mass).sum(dim=4).log()
            shared = select_blocks(pooled(exact_log_mass[..., None])[..., 0], pooled(estimate), settings.gamma)
            own = shared[:, :, :, :, None].expand(-1, -1, -1, -1, size, -1).reshape(b_, hk, nc, g * size, nb) & candidate
        else:
            prefix = lambda log_mass: shares(log_mass).cumsum(dim=4).log().view(b_, hk, nc, g * size, -1)
            own = select_blocks(prefix(exact_log_mass[..., None])[..., 0], prefix(estimate), settings.gamma) & candidate
    else:
        own = select_blocks(exact_log_mass, estimate, settings.gamma)
    if settings.selection == "union":
        own = own.view(b_, hk, nc, g, size, nb).any(dim=4, keepdim=True).expand(-1, -1, -1, -1, size, -1)
        own = own.reshape(b_, hk, nc, g * size, nb) & candidate
    return candidate, own, centroid


def selected_part(rows, own, tile, kp, vp, member, scale, fused, shared):
    """Exact attention of each tile's rows ``rows (B, Hk, nc, G, size, d)`` to its selected blocks, ``tile (B, Hk, nc,
    G, nb)``; each row masked to its own ``own (..., size, nb)`` unless ``shared`` (then one mask row per tile, the
    rows outside the call computing and dropped). Tiles go in buckets of similar width (one kernel call and one
    gather each: padding every tile to the widest wasted up to half the work, measured on SmolLM2 at 8192 tokens).
    Returns the partial ``(B, Hk, nc, G, size)`` (None: no block selected anywhere) and each row's count of keys."""
    b_, hk, nc, g, size, d = rows.shape
    nb = kp.shape[2]
    widths = tile.sum(dim=-1).flatten()  # (N,) tiles
    listed = widths.tolist()  # the one host sync: the tiles' widths
    if not max(listed, default=0):
        return None, 0
    n_tiles, dv = len(listed), vp.shape[-1]
    flat_rows, flat_own, flat_tile = rows.reshape(n_tiles, size, d), own.reshape(n_tiles, size, nb), tile.reshape(n_tiles, nb)
    num = rows.new_zeros(n_tiles, size, dv)
    den, shift = rows.new_zeros(n_tiles, size), rows.new_full((n_tiles, size), float("-inf"))
    counts = torch.zeros(n_tiles, size, dtype=torch.long, device=rows.device)
    head_base = nb * (torch.arange(n_tiles, device=rows.device) // (nc * g))  # the tile's (batch, KV head) row of blocks
    for low, high in width_buckets(max(listed)):
        members = [n for n, w in enumerate(listed) if low < w <= high]
        if not members:
            continue
        index = torch.tensor(members, device=rows.device)
        order = torch.sort(flat_tile[index].to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, :high]
        k_sel, v_sel = block_rows(kp, vp, order + head_base[index, None])
        positions = (order[..., None] * size + torch.arange(size, device=rows.device)).flatten(-2)  # (M, high * size)
        batch = index // (hk * nc * g)
        keys = flat_tile[index].gather(-1, order).repeat_interleave(size, dim=-1)  # (a narrower tile's padding: none)
        keys = keys & member.view(b_, -1)[batch[:, None], positions]
        if shared:
            mask = keys[:, None, :]
        else:
            picked = flat_own[index].gather(-1, order[:, None, :].expand(-1, size, -1))  # (M, size, high)
            mask = picked.repeat_interleave(size, dim=-1) & keys[:, None, :]
        part = tile_part(flat_rows[index], k_sel, v_sel, mask, scale, fused)
        num[index], den[index], shift[index] = part.num, part.den, part.shift
        counts[index] = mask.sum(dim=-1).expand(-1, size)
    view = lambda x: x.view(b_, hk, nc, g, size, *x.shape[2:])
    return Partial(view(num), view(den), view(shift)), view(counts)


def width_buckets(widest: int) -> list[tuple[int, int]]:
    """``(low, high]`` ranges of tile widths, each about 1.25x the last, up to ``widest``."""
    buckets, low = [], 0
    while low < widest:
        high = min(widest, max(low + 1, int(low * 1.25)))
        buckets.append((low, high))
        low = high
    return buckets


def fixed_blocks(blocks, band_blocks, size, sliding_window, nb) -> torch.Tensor:
    """Per query block, the key blocks exact whatever is selected: its band ``P - band_blocks .. P`` and, under a
    sliding window, the (at most two) blocks across the window's edge; ``(nc, nf)``, -1 where none."""
    band = blocks[:, None] - torch.arange(band_blocks, -1, -1, device=blocks.device)
    parts = [band]
    if sliding_window is not None:  # blocks some row of the block sees, not all: b * size <= last row - window
        low = (blocks * size - sliding_window + 1).clamp_min(0) // size
        edge = low[:, None] + torch.arange(2, device=blocks.device)
        across = (edge * size <= ((blocks + 1) * size - 1 - sliding_window)[:, None]) & (edge < band[:, :1])
        parts.append(torch.where(across, edge, -1))
    fixed = torch.cat(parts, dim=1)
    return torch.where((fixed >= 0) & (fixed < nb), fixed, -1)


def gather_blocks(kp, vp, index):
    """The key and value tiles of the blocks ``index (B, Hk, ...)`` (-1: a block of zeros, masked by the caller):
    ``(B, Hk, ..., w * size, d)`` each, ``w`` the last dim of ``index`` (no value tile for ``vp`` None)."""
    b_, hk, nb = kp.shape[:3]
    base = nb * torch.arange(b_ * hk, device=kp.device).view(b_, hk, *(1,) * (index.dim() - 2))
    return block_rows(kp, vp, index.clamp_min(0) + base)


def block_rows(kp, vp, flat):
    """The keys and values of the blocks ``flat (..., w)``, indices into the (batch, KV head, block) blocks of
    ``kp``, ``vp`` ``(B, Hk, nb, size, d)``: ``(..., w * size, d)`` each (rows of whole blocks, copied; None for
    ``vp`` None)."""
    size = kp.shape[3]
    take = lambda x: x.reshape(-1, size * x.shape[-1]).index_select(0, flat.flatten()).view(
        *flat.shape[:-1], flat.shape[-1] * size, x.shape[-1])
    return take(kp), None if vp is None else take(vp)


def tile_part(rows, k_tile, v_tile, mask, scale, fused) -> Partial:
    """Exact attention of ``rows (..., r, d)`` to a key tile ``(..., t, d)`` where ``mask (..., r, t)``: in PyTorch's
    fused CPU kernel when ``fused``, else as plain matmuls."""
    if fused:
        return fused_cpu.fused_masked(rows, k_tile, v_tile, mask, scale)
    weights, top = masked_exp(scale * rows @ k_tile.transpose(-1, -2), mask)
    return Partial(weights @ v_tile, weights.sum(dim=-1), top)
