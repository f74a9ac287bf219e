"""The exact parts of an attention, on any device: plain attention, the local band, exact rows, checkpointing.

Each returns a :class:`sb_hf.ops.partial.Partial` (or an output) from plain matmuls or PyTorch's SDPA; on a
CPU at inference the band and causal calls take PyTorch's fused CPU kernel instead
(:mod:`sb_hf.ops.fused_cpu`, picked here). Windows are named as in :mod:`sb_hf.ops.masking`.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from . import fused_cpu
from .masking import visible
from .partial import Partial, concat, exact_part, group_matmul, masked_softmax

BAND_BLOCK_SIZE = 256  # query rows per block of the band in plain matmuls (a (c, c + local_window) block); by measurement
EXACT_ROW_BLOCK = 128  # gathered exact query rows handled per block: bounds the (rows x keys) score block


def checkpointed(recompute: bool, fn, *args):
    """``fn(*args)``; when training, under activation checkpointing, so backward keeps only the
    chunk's inputs (running states, views of q/k/v) and recomputes the rest: no score or feature
    block of any chunk stays alive, and attention memory grows linearly with the length."""
    if recompute:
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def plain_attention(qg, k, v, scale, causal, sliding_window, offset, recompute):
    """Softmax attention of every row of ``qg (B, Hk, G, Lq, d)`` in PyTorch's SDPA (fused kernels on CPU and CUDA;
    a prompt's causal call on CPU through :func:`sb_hf.ops.fused_cpu.fused_causal`, which keeps every thread busy),
    queries at key positions ``offset + i``: ``(B, Hk, G, Lq, dv)``. Every row must see a key (no padding)."""
    batch, kv_heads, groups, q_len, d = qg.shape
    mask = None
    if causal and (sliding_window is not None or offset):
        mask = visible(torch.arange(q_len, device=qg.device) + offset, torch.arange(k.shape[2], device=k.device),
                       causal=True, sliding_window=sliding_window)
    elif causal and not recompute and fused_cpu.available(qg, v):  # (a prompt's causal call kept busy on every thread)
        num, den, _ = fused_cpu.fused_causal(qg, k, v, scale)
        return num / den[..., None]
    out = torch.nn.functional.scaled_dot_product_attention(
        qg.reshape(batch, kv_heads * groups, q_len, d), k, v, attn_mask=mask, is_causal=causal and mask is None,
        scale=scale, enable_gqa=True)
    return out.view(batch, kv_heads, groups, q_len, -1)


def local_band(qg, k, v, key_valid, scale, local_window, sliding_window, offset, chunk, recompute,
               padded=True) -> Partial:
    """Exact attention of every query ``p`` to the keys ``p - local_window < j <= p`` it may see, query
    chunk by chunk (a ``(c, c + local_window)`` block; ``chunk`` None: the measured default of the path), as a
    partial attention (shift ``-inf`` when the row sees no key). ``padded=False`` promises every key valid:
    blocks of one shape and one query-key offset then share their mask."""
    band_width = local_window if sliding_window is None else min(local_window, sliding_window)
    q_len, kv_len = qg.shape[3], k.shape[2]
    band_keys = min(band_width, kv_len)  # (no query reaches further back than the first key)
    if not recompute and q_len > 1 and fused_cpu.available(qg, v):  # (one row: the plain matmuls are faster)
        chunk = min(chunk or fused_cpu.FUSED_BAND_BLOCK_SIZE, q_len)  # (fewer rows: one block, not padded)
        if offset:
            return fused_cpu.fused_band(qg, k, v, key_valid, scale, band_width, band_keys, offset, chunk, padded)
        # The first `band_width` queries see every earlier key: causal attention, no block masks to build; the rest
        # are blocks whose keys all exist (the ones with keys before position 0 would each need their own bias).
        head = min(band_width, q_len)
        first = fused_cpu.fused_causal(qg[:, :, :, :head], k[:, :, :head], v[:, :, :head], scale,
                                       key_valid[:, :head] if padded else None)
        if head == q_len:
            return first
        rest = fused_cpu.fused_band(qg[:, :, :, head:], k, v, key_valid, scale, band_width, band_keys, head, chunk, padded)
        return concat([first, rest])
    chunk = chunk or BAND_BLOCK_SIZE
    shared = {}  # (rows, keys, first query's position - first key's) -> the block's mask
    parts = []
    for i0 in range(0, q_len, chunk):
        i1 = min(i0 + chunk, q_len)
        lo, hi = max(offset + i0 - band_keys + 1, 0), offset + i1

        def block(i0=i0, i1=i1, lo=lo, hi=hi):
            key = (i1 - i0, hi - lo, offset + i0 - lo)
            mask = shared.get(key)
            if mask is None:  # the mask depends on the positions only through their differences
                q_pos, k_pos = torch.arange(key[0], device=qg.device) + key[2], torch.arange(key[1], device=k.device)
                mask = visible(q_pos, k_pos, causal=True, sliding_window=band_width)
                if padded:
                    mask = mask & key_valid[:, None, None, None, lo:hi]
                else:
                    shared[key] = mask
            return exact_part(qg[:, :, :, i0:i1], k[:, :, lo:hi], v[:, :, lo:hi], mask, scale)

        parts.append(checkpointed(recompute, block))
    return concat(parts)


def gather_rows(flags: torch.Tensor, tensors: tuple[torch.Tensor, ...]):
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


def exact_rows(qg, k, v, out, rows, scale, causal, sliding_window, key_valid, offset, recompute):
    """Overwrite the flagged query rows of ``out`` with exact attention, in blocks of gathered rows."""
    gathered = gather_rows(rows, ())
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
            if sliding_window is not None:
                lo = max(int(torch.where(keep, pos, hi).min()) - sliding_window + 1, 0)

        def block(idx=idx, lo=lo, hi=hi):
            k_pos = torch.arange(lo, hi, device=k.device)
            q_block = torch.gather(qg, 3, idx[..., None].expand(*idx.shape, qg.shape[-1]))
            k_span, v_span = k[:, :, lo:hi].to(qg.dtype), v[:, :, lo:hi].to(qg.dtype)  # (a cache's keys: cast as read)
            scores = scale * group_matmul(q_block, k_span.transpose(-1, -2))  # (B, Hk, G, n, hi - lo)
            mask = visible(idx + offset, k_pos, causal=causal, sliding_window=sliding_window)
            mask = mask & key_valid[:, None, None, None, lo:hi]
            return group_matmul(masked_softmax(scores, mask), v_span)

        exact = checkpointed(recompute, block)
        idx_out = idx[..., None].expand(*idx.shape, out.shape[-1])
        out = out.scatter(3, idx_out, torch.where(keep[..., None], exact, torch.gather(out, 3, idx_out)))
    return out
