"""PyTorch's fused CPU attention kernel for the exact parts: the CPU-specific fast path of the band.

``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` returns the log-sum-exp beside the output, which is
what a :class:`sb_hf.ops.partial.Partial` needs; it runs many (sequence, head, query block) items per call on
every thread. :func:`fused_band` computes a local band as many blocks per call, :func:`fused_causal` a causal
call (halved when the heads would leave a thread idle), :func:`fused_masked` gathered key tiles under a mask. The
device-neutral forms (plain matmuls) are in :mod:`sb_hf.ops.exact`, which picks this path when :func:`available`
says so. Windows are named as in
:mod:`sb_hf.ops.masking`.
"""

from __future__ import annotations

import torch

from .masking import visible
from .partial import Partial, concat, merge

FUSED_BAND_BLOCK_SIZE = 64  # query rows per block of the band, many blocks per call; by measurement
FUSED_BIAS_BYTES = 64 * 2**20  # bound on the separately masked blocks of one fused band call
BALANCED_CAUSAL_MIN_ROWS = 512  # from this length on, a causal call over too few heads for the threads runs halved


def kernel(*args, **kwargs):
    """The fused kernel itself (one name, so that tests can count its calls)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **kwargs)


def available(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the exact blocks can run in PyTorch's fused CPU attention kernel (it returns the log-sum-exp
    a partial attention needs; it wants values as wide as the keys). Elsewhere (CUDA included, untested
    here) and when training (its backward does not carry the log-sum-exp's gradient, which the merge with
    the far part needs) the blocks run as plain matmuls."""
    return (q.device.type == "cpu" and v.shape[-1] == q.shape[-1]
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def fused_causal(qg, k, v, scale, key_valid=None):
    """Causal attention of ``qg (B, Hk, G, L, d)`` over ``k``, ``v`` ``(B, Hk, L, d)`` in the fused kernel, as
    ``(num, den, shift)`` relative to each row's log-sum-exp. ``key_valid (B, L)``: padding, one bias row per
    sequence that the kernel broadcasts (a row that sees no real key gets mass 0 and shift ``-inf``)."""
    batch, kv_heads, groups, rows, _ = qg.shape
    shape = (batch, kv_heads, groups, rows)
    if key_valid is None:
        if (batch * kv_heads * groups) % torch.get_num_threads() and rows >= max(BALANCED_CAUSAL_MIN_ROWS, 2):
            return halved_causal(qg, k, v, scale)
        out, lse = fused(qg, k, v, scale, causal=True)
        return Partial(out, torch.ones(shape, dtype=out.dtype, device=out.device), lse)
    bias = additive_bias(key_valid[:, None, None], qg.dtype)  # (B, 1, 1, L)
    out, lse = fused(qg, k, v, scale, causal=True, bias=bias)
    seen = (key_valid.cumsum(dim=-1) > 0)[:, None, None].expand(shape)  # a real key at or before the row
    return Partial(out, seen.to(out.dtype), torch.where(seen, lse, float("-inf")))


def halved_causal(qg, k, v, scale):
    """:func:`fused_causal` (no padding) as its two halves' causal attentions in one call, batched, plus the second
    half's queries against the first half's keys (no mask), merged. The kernel splits its (sequence, head, query
    block) items into one contiguous range per thread; in a causal call the later blocks cost more, so with one
    sequence and head the second thread had 3/4 of the work: 8192 tokens took 129 ms in one causal call and 35 +
    31 ms this way (measured on 2 threads)."""
    rows = qg.shape[3]
    half = rows - rows // 2  # the first half; the second, one shorter for odd rows, padded with a zero row
    pad = lambda x: torch.nn.functional.pad(x[..., half:, :], (0, 0, 0, 2 * half - rows))
    both = lambda x: torch.cat([x[..., :half, :], pad(x)])  # (2B, ...): the halves as two sequences
    out, lse = fused(both(qg), both(k), both(v), scale, causal=True)
    batch = qg.shape[0]
    partial = lambda out, lse: Partial(out, torch.ones_like(lse), lse)  # the kernel's output, normalized: mass 1
    first, second = partial(out[:batch], lse[:batch]), partial(out[batch:, ..., : rows - half, :], lse[batch:, ..., : rows - half])
    across = partial(*fused(qg[..., half:, :], k[:, :, :half], v[:, :, :half], scale, causal=False))
    return concat([first, merge(second, across)])


def additive_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The kernel's form of a visibility mask: 0 where ``mask``, ``-inf`` elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def fused(qg, k, v, scale, *, causal, bias=None):
    """PyTorch's fused CPU attention of ``qg (B, Hk, G, Lq, d)`` over ``k``, ``v`` ``(B, Hk, Lk, d)`` (each KV head
    repeated for its query heads), ``bias`` additive or None: the output ``(B, Hk, G, Lq, dv)`` and the log-sum-exp."""
    batch, kv_heads, groups, rows, d = qg.shape
    expand = lambda x: x[:, :, None].expand(batch, kv_heads, groups, *x.shape[2:]).reshape(batch, kv_heads * groups, *x.shape[2:])
    out, lse = kernel(
        qg.reshape(batch, kv_heads * groups, rows, d), expand(k), expand(v), is_causal=causal, attn_mask=bias, scale=scale)
    shape = (batch, kv_heads, groups, rows)
    return out.view(*shape, -1), lse.view(shape).to(out.dtype)


def fused_band(qg, k, v, key_valid, scale, band_width, band_keys, offset, chunk, padded):
    """:func:`sb_hf.ops.exact.local_band` in PyTorch's fused CPU attention kernel, many query blocks per call (so small blocks
    pay no call each: 64-row blocks made a 128-key window's band 2.6x faster at 4096 tokens, measured). Block
    ``j`` holds the queries ``offset + j c + t``, ``t < c`` (the last block padded), and the keys ``lo_j + s``, ``s < n = c + band_keys - 1``,
    ``lo_j = offset + j c - band_keys + 1``: overlapping strided views of K and V, no copy. The kernel's batch holds
    the blocks, its heads the batch's KV heads, its rows a KV head's query heads. Visibility depends on the
    positions only through ``t - s``, so the blocks whose keys are all real (in every sequence) share one bias;
    the others (keys before position 0 or padded) get their own, a bounded number per call."""
    batch, kv_heads, groups, q_len, d = qg.shape
    blocks, n = -(-q_len // chunk), chunk + band_keys - 1
    left, extra = max(band_keys - 1 - offset, 0), blocks * chunk - q_len  # keys padded before 0, queries after the end
    start = offset - band_keys + 1 + left  # block 0's first key in the padded keys

    pad = lambda x, *sides: torch.nn.functional.pad(x, sides) if any(sides) else x  # (a decoding step: no copy)

    def block_keys(x):  # (B, Hk, Lk, d) -> (blocks, B * Hk, n, d), block j's keys
        x = pad(x, 0, 0, left, extra)[:, :, start:].unfold(2, n, chunk)  # (B, Hk, blocks, d, n)
        return x.flatten(0, 1).permute(1, 0, 3, 2)

    k_blocks, v_blocks = block_keys(k), block_keys(v)
    q_blocks = pad(qg, 0, 0, 0, extra).reshape(batch * kv_heads, groups, blocks, chunk, d)
    q_blocks = q_blocks.permute(2, 0, 1, 3, 4).reshape(blocks, batch * kv_heads, groups * chunk, d)
    relative = visible(torch.arange(chunk, device=qg.device) + band_keys - 1, torch.arange(n, device=qg.device),
                       causal=True, sliding_window=band_width)  # (c, n)
    relative = relative.expand(kv_heads, groups, chunk, n)
    valid = pad(key_valid, left, extra)[:, start:].unfold(1, n, chunk)  # (B, blocks, n)
    if padded:  # blocks whose keys are real in every sequence share the bias too (one host sync)
        shares = valid.all(dim=2).all(dim=0).tolist()
    else:  # only the first blocks reach keys before position 0
        shares = [j >= -(-left // chunk) for j in range(blocks)]
    per_block = max(1, FUSED_BIAS_BYTES // (batch * kv_heads * groups * chunk * n * qg.element_size()))
    shared = None

    calls = []  # (blocks, bias, rows seeing a key), in block order: runs of sharing blocks in one call each, the others
    j0 = 0      # in groups of a bounded size with their own biases
    while j0 < blocks:
        j1 = j0 + 1
        while j1 < blocks and shares[j1] == shares[j0] and (shares[j0] or j1 - j0 < per_block):
            j1 += 1
        if shares[j0]:
            if shared is None:
                shared = additive_bias(relative.reshape(1, kv_heads, groups * chunk, n).repeat(1, batch, 1, 1), qg.dtype)
            every_row = torch.ones(j1 - j0, batch, kv_heads, groups, chunk, dtype=torch.bool, device=qg.device)
            calls.append((slice(j0, j1), shared, every_row))
        else:
            mask = relative & valid[:, j0:j1].transpose(0, 1)[:, :, None, None, None, :]  # (J, B, Hk, G, c, n)
            calls.append((slice(j0, j1), additive_bias(mask, qg.dtype).view(j1 - j0, batch * kv_heads, groups * chunk, n), mask.any(dim=-1)))
        j0 = j1
    outs, lses, seens = [], [], []
    for some, bias, seen in calls:
        out, lse = kernel(
            q_blocks[some], k_blocks[some], v_blocks[some], attn_mask=bias, scale=scale)
        outs.append(out)
        lses.append(lse.to(out.dtype))
        seens.append(seen)

    def rows(parts, *tail):  # (blocks, B * Hk, G * c, ...) -> (B, Hk, G, Lq, ...)
        x = torch.cat(parts).view(blocks, batch, kv_heads, groups, chunk, *tail)
        return x.permute(1, 2, 3, 0, 4, *range(5, x.dim())).reshape(batch, kv_heads, groups, blocks * chunk, *tail)[:, :, :, :q_len]

    seen = rows(seens)  # the kernel gives 0 output and 0 log-sum-exp to a row with no visible key
    return Partial(rows(outs, v.shape[-1]), seen.to(qg.dtype), torch.where(seen, rows(lses), float("-inf")))


def fused_masked(q, k, v, mask, scale) -> Partial:
    """Exact attention of ``q (..., L, d)`` to ``k``, ``v`` ``(..., S, d)`` where ``mask (..., L or 1, S)`` (the
    leading dims, broadcast to q's, flattened into the kernel's batch, one head), as a partial attention: a row's
    shift is its log-sum-exp (``-inf`` when it sees no key)."""
    lead, rows = q.shape[:-2], q.shape[-2]
    flat = lambda x: x.expand(*lead, *x.shape[-2:]).reshape(-1, 1, *x.shape[-2:])  # (k, v, mask may broadcast)
    # (a mask that broadcasts over the items stays one: ``flat`` gives the kernel a stride-0 view of it)
    out, lse = kernel(flat(q), flat(k), flat(v), attn_mask=flat(additive_bias(mask, q.dtype)), scale=scale)
    seen = mask.any(dim=-1).expand(*lead, rows)
    return Partial(out.view(*lead, rows, -1), seen.to(q.dtype), torch.where(seen, lse.view(*lead, rows).to(q.dtype), float("-inf")))
