"""Block-support attention through PyTorch's FlexAttention: the path for CUDA (issue 26).

It computes what :mod:`.naive` defines (and :mod:`.chunk` computes on the CPU) for the shared selections
(``selection="pooled"``, the default, and ``"union"``: one support per query head and query block, what a
block-sparse kernel can skip on), as ONE FlexAttention call whose keys are the call's keys followed by every key
block's centroid (a pseudo-key: the mean key, the mean value, and a log-count bias added by a ``score_mod``). The far
field is then inside the same softmax: no log-sum-exp, no merge. The selection is :mod:`.chunk`'s (the fixed tile's
exact log mass, the estimates, the rule), a chunk of query blocks at a time.

- ``mask_mod`` is the element rule, the truth: a key is exact when the query sees it and it is a sink, in a block
  that is not a candidate of the query's block (its band, the blocks across a sliding window's edge, earlier blocks
  without members) or in a selected block; a centroid column when its block is a candidate left out.
- The ``BlockMask`` lists per (batch, query head, query block) the key blocks that hold an exact key and the
  centroid blocks that hold a pseudo-key; a compiled kernel reads those blocks only. The eager kernel (CPU, tests)
  evaluates ``mask_mod`` on every pair, so the listing is tested on its own (:func:`listed_blocks` against the
  rule's dense form).

No host synchronisation: every shape comes from the inputs' sizes, the tables stay on the device, and the inputs are
not checked finite (as SDPA; the CPU op checks). Compiled once per shape class (``torch.compile`` of
``flex_attention`` with static shapes, shared by every call, the blocks and query blocks padded up to a power of
two: at most one compile per doubling of the length; static because torch 2.13 fails to build the CPU kernel
with dynamic shapes); eager where compiling is not wanted (``compiled=False``, the CPU default).
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..checks import check_chunk_size, check_dropped, check_inputs
from .chunk import DEFAULT_CHUNK_BLOCKS, block_inputs, choose_blocks, fixed_tile
from .estimates import FAST_ESTIMATES
from .settings import SHARED_SELECTIONS, BlockSettings

CUDA_CHUNK_BLOCKS = 64  # query blocks selected at a time on CUDA (fewer kernel launches; memory is not the limit)


@functools.cache
def compiled_flex_attention():
    """``flex_attention`` compiled once for the process (torch.compile caches a kernel per shape class)."""
    return torch.compile(flex_attention, dynamic=False)


def block_support_flex(
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
    chunk_blocks: int | None = None,
    compiled: bool | None = None,
    info: dict | None = None,
) -> torch.Tensor:
    """Block-support attention (:mod:`.naive` defines it) in one FlexAttention call; ``compiled``: through
    ``torch.compile`` (None: on CUDA). The output in ``q``'s dtype; the kernel takes ``q``, ``k``, ``v`` in their own
    dtype (bf16 and fp16 native, accumulating in fp32), the selection runs in fp32. ``info`` receives, as tensors
    (nothing read on the host), ``listed_blocks`` (the (query block, key block) pairs the kernel reads over the query
    heads, centroid blocks included) and ``causal_blocks`` (those of dense causal attention)."""
    settings = BlockSettings(gamma, block_size, sinks, local_window, selection, estimate, far, sample_stride)
    shapes = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window,
                          scale=scale, check_finite=False)
    settings.check(causal)
    if settings.selection not in SHARED_SELECTIONS or settings.estimate not in FAST_ESTIMATES:
        raise ValueError(f"the FlexAttention path takes a selection shared by a query block's rows "
                         f"{SHARED_SELECTIONS} and the estimates {FAST_ESTIMATES}; got selection={settings.selection!r}, "
                         f"estimate={settings.estimate!r} (block_support_attention, block.engine 'chunk', computes the per-row "
                         "selection)")
    check_dropped(dropped_real_keys, shapes.batch)
    check_chunk_size(chunk_blocks, "chunk_blocks", f"the default, {DEFAULT_CHUNK_BLOCKS} query blocks per chunk")
    compiled = q.is_cuda if compiled is None else compiled
    if compiled and q.is_cuda and settings.block_size % 16:
        raise ValueError(f"on CUDA block_size must be a multiple of 16 (FlexAttention's tiles), got {settings.block_size}")
    lq, lk, d = shapes.q_len, shapes.kv_len, shapes.head_dim
    size, scale = settings.block_size, d**-0.5 if scale is None else scale
    blocked = block_inputs(q, k, v, settings, key_padding_mask, dropped_real_keys)
    nb, nqb, first = blocked.kp.shape[2], blocked.nqb, blocked.first_block
    step = chunk_blocks or (CUDA_CHUNK_BLOCKS if q.is_cuda else DEFAULT_CHUNK_BLOCKS)
    selected = selections(blocked, settings, scale, sliding_window, lk - lq, lk, step)
    # The kernel's shapes by class (blocks and query blocks rounded up to a power of two), so that a compiled kernel
    # serves every length of its class; the padding's rows and keys are masked and listed nowhere.
    nb_class, nqb_class = shape_class(nb), shape_class(nqb)
    tables = padded(rule_tables(blocked, selected, settings, sliding_window, lk - lq, lk), nqb_class, nb_class, size)
    mask_mod, score_mod = element_rule(tables, first * size, nb_class * size, size, sliding_window)

    # The keys, then the centroids padded to whole blocks; the queries padded to whole query blocks.
    n_cent = -(-nb_class // size) * size
    centroid_pad = lambda x: torch.nn.functional.pad(x.to(q.dtype), (0, 0, 0, n_cent - nb))
    keys = torch.cat([torch.nn.functional.pad(k, (0, 0, 0, nb_class * size - lk)),
                      centroid_pad(blocked.summary["centroid"])], 2)
    values = torch.cat([torch.nn.functional.pad(v, (0, 0, 0, nb_class * size - lk)),
                        centroid_pad(blocked.summary["mean_value"])], 2)
    queries = torch.nn.functional.pad(q, (0, 0, blocked.front, nqb_class * size - blocked.front - lq))
    listed = listed_blocks(tables, first, size, sliding_window)
    if info is not None:
        dense = (torch.arange(nb, device=q.device) <= torch.arange(first, nb, device=q.device)[:, None]).sum()
        info.update(listed_blocks=listed.sum(), causal_blocks=dense * listed.shape[0] * listed.shape[1])
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    block_mask = BlockMask.from_kv_blocks(listed.sum(dim=-1, dtype=torch.int32),
                                          torch.argsort(listed.to(torch.uint8), dim=-1, descending=True, stable=True).to(torch.int32),
                                          BLOCK_SIZE=size, mask_mod=mask_mod, seq_lengths=(queries.shape[2], keys.shape[2]),
                                          compute_q_blocks=grad)
    kernel = compiled_flex_attention() if compiled else flex_attention
    options = None
    if compiled and q.is_cuda:  # the kernel's tiles must divide the blocks
        tile = next(t for t in (64, 32, 16) if size % t == 0)
        options = {"BLOCK_M": tile, "BLOCK_N": tile}
    out = kernel(queries, keys, values, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=True,
                 kernel_options=options)
    return out[:, :, blocked.front : blocked.front + lq].to(q.dtype)


def selections(blocked, settings, scale, sliding_window, offset, kv_len, step) -> torch.Tensor:
    """The selected candidates per (batch, query head, query block): ``(B, Hq, nqb, nb)`` bool, chosen a chunk of
    ``step`` query blocks at a time as :mod:`.chunk` chooses them (the fixed tile's exact log mass from its scores)."""
    qb, kp, member, summary = blocked.qb, blocked.kp, blocked.member, blocked.summary
    b_, hk, nqb, g, size, d = qb.shape
    nb, parts = kp.shape[2], []
    for c0 in range(0, nqb, step):
        qc, first = qb[:, :, c0 : c0 + step], blocked.first_block + c0
        nc = qc.shape[2]
        rows = qc.reshape(b_, hk, nc, g * size, d)
        pos = torch.arange(first, first + nc, device=qb.device)[:, None] * size + torch.arange(size, device=qb.device)
        k_tile, _, mask, _ = fixed_tile(qc.shape, first, kp, None, member, blocked.sinks, settings, sliding_window,
                                        offset, kv_len)  # (scores only: no value tile)
        exact_log_mass = torch.where(mask, scale * rows @ k_tile.transpose(-1, -2), float("-inf")).logsumexp(dim=-1)
        _, own, _ = choose_blocks(rows, exact_log_mass, first, kp, member, summary, blocked.sinks[-1], settings, scale,
                                  sliding_window, (pos >= offset) & (pos < kv_len))
        parts.append(own.view(b_, hk, nc, g, size, nb).any(dim=4))
    return torch.cat(parts, dim=2).transpose(2, 3).reshape(b_, hk * g, nqb, nb)  # query head h = KV head * G + j


def rule_tables(blocked, selected, settings, sliding_window, offset, kv_len) -> dict:
    """The tables the element rule reads: per key ``key_ok``, ``sink`` ``(B, nb * size)``; per (batch, query head,
    query block, key block) ``exact_block`` (a visible key of the block is exact) and ``pseudo`` (its centroid
    enters); per key block ``log_count`` ``(B, nb)``; per query row ``row_ok`` (inside the call)."""
    b_, nb, size = blocked.member.shape
    device, nqb = selected.device, selected.shape[2]
    key_ok = torch.nn.functional.pad(blocked.key_valid, (0, nb * size - kv_len))
    blocks = torch.arange(blocked.first_block, blocked.first_block + nqb, device=device)
    block = torch.arange(nb, device=device)
    candidate = block < (blocks - settings.band_blocks)[:, None]  # (nqb, nb), as the twin's
    if sliding_window is not None:
        candidate = candidate & (block * size > ((blocks + 1) * size - 1 - sliding_window)[:, None])
    candidate = (candidate[None] & (blocked.summary["count"] > 0)[:, None, :])[:, None]  # (B, 1, nqb, nb)
    pseudo = candidate & ~selected if settings.far == "centroid" else torch.zeros_like(selected)
    row = torch.arange(nqb * size, device=device) + blocked.first_block * size
    return dict(key_ok=key_ok, sink=key_ok & ~blocked.member.view(b_, -1), exact_block=~candidate | selected,
                pseudo=pseudo, log_count=blocked.summary["log_count"][:, 0, 0],
                row_ok=(row >= offset) & (row < kv_len))


def element_rule(tables, first_pos, n_keys, size, sliding_window):
    """FlexAttention's ``mask_mod`` and ``score_mod`` over ``[keys (n_keys, padded to whole blocks); centroids]``,
    query row ``i`` at key position ``first_pos + i``."""
    key_ok, sink, exact_block, pseudo = tables["key_ok"], tables["sink"], tables["exact_block"], tables["pseudo"]
    log_count, row_ok, nb = tables["log_count"], tables["row_ok"], tables["log_count"].shape[-1]

    def mask_mod(b, h, q_idx, kv_idx):
        pos, query_block = q_idx + first_pos, q_idx // size
        key = torch.clamp(kv_idx, max=n_keys - 1)
        sees = (key <= pos) & key_ok[b, key] & (sink[b, key] | exact_block[b, h, query_block, key // size])
        if sliding_window is not None:
            sees = sees & (key > pos - sliding_window)
        cent = torch.clamp(kv_idx - n_keys, min=0, max=nb - 1)
        far = pseudo[b, h, query_block, cent] & (kv_idx - n_keys < nb)
        return row_ok[q_idx] & torch.where(kv_idx < n_keys, sees, far)

    def score_mod(score, b, h, q_idx, kv_idx):
        cent = torch.clamp(kv_idx - n_keys, min=0, max=nb - 1)
        return torch.where(kv_idx < n_keys, score, score + log_count[b, cent])

    return mask_mod, score_mod


def listed_blocks(tables, first_block, size, sliding_window) -> torch.Tensor:
    """The key blocks FlexAttention reads per (batch, query head, query block; the first of them query block
    ``first_block``): ``(B, Hq, nqb, nb + ceil(nb / size))``, for a query block with a row inside the call the key
    blocks that may hold an exact key (not later than the query block nor behind its window, exact or holding a sink,
    a real key) and the centroid blocks that hold a pseudo-key of the query block."""
    exact_block, pseudo, key_ok = tables["exact_block"], tables["pseudo"], tables["key_ok"]
    (b_, n_keys), nqb, device = key_ok.shape, tables["row_ok"].shape[0] // size, key_ok.device
    nb = n_keys // size
    query_block = torch.arange(nqb, device=device) + first_block
    block = torch.arange(nb, device=device)
    reach = (block <= query_block[:, None]) & tables["row_ok"].view(nqb, size).any(dim=-1)[:, None]  # (nqb, nb)
    if sliding_window is not None:  # and not wholly behind the window of the query block's first row
        reach = reach & ((block + 1) * size - 1 > (query_block * size - sliding_window)[:, None])
    has_sink = tables["sink"].view(b_, nb, size).any(dim=-1)[:, None, None, :]  # (B, 1, 1, nb)
    has_key = key_ok.view(b_, nb, size).any(dim=-1)[:, None, None, :]
    keys = reach & has_key & (exact_block | has_sink)
    n_cent = -(-nb // size)
    cents = torch.nn.functional.pad(pseudo, (0, n_cent * size - nb)).view(*pseudo.shape[:3], n_cent, size).any(dim=-1)
    return torch.cat([keys.expand(*pseudo.shape[:3], nb), cents.expand(*pseudo.shape[:3], n_cent)], dim=-1)


def shape_class(n: int) -> int:
    """The number of blocks a kernel is compiled for: ``n`` rounded up to a power of two."""
    return 1 << max(0, n - 1).bit_length()


def padded(tables, nqb, nb, size) -> dict:
    """:func:`rule_tables` padded to ``nqb`` query blocks and ``nb`` key blocks: the padding's rows are outside the
    call, its keys not real, its blocks neither exact nor centroids."""
    last = lambda x, n: torch.nn.functional.pad(x, (0, n - x.shape[-1]))
    blocks = lambda x: torch.nn.functional.pad(x, (0, nb - x.shape[-1], 0, nqb - x.shape[-2]))
    return dict(key_ok=last(tables["key_ok"], nb * size), sink=last(tables["sink"], nb * size),
                exact_block=blocks(tables["exact_block"]), pseudo=blocks(tables["pseudo"]),
                log_count=last(tables["log_count"], nb), row_ok=last(tables["row_ok"], nqb * size))
