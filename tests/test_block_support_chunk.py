"""The fast block-support op against its dense twin: shapes that are not multiples of the block, padding, GQA,
sliding windows, chunks of query blocks, dtypes, gradients, the pair counts; the selected tile holds the union of
the rows' selections and no more (it fails if the op scores every candidate); causality; bad settings."""

from __future__ import annotations

import pytest
import torch

from sb_hf.ops import reference
from sb_hf.ops.block_support import block_support_attention, chunk

F64 = torch.float64
SETTINGS = dict(gamma=0.7, block_size=7, sinks=3, local_window=10)
FAST_SELECTIONS, FAST_ESTIMATES = ("row", "union", "pooled", "prefix"), chunk.FAST_ESTIMATES


def qkv(batch=2, q_heads=4, kv_heads=2, q_len=37, kv_len=90, d=8, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(batch, q_heads, q_len, d, generator=g, dtype=F64).to(dtype),
            2 * torch.randn(batch, kv_heads, kv_len, d, generator=g, dtype=F64).to(dtype),
            torch.randn(batch, kv_heads, kv_len, d, generator=g, dtype=F64).to(dtype))


def left_padded(batch, kv_len, pad=23):
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    mask[-1, :pad] = False
    return mask


def both(q, k, v, **kw):
    """The op's and the twin's outputs and pair counts."""
    fast_stats, twin_stats = {}, {}
    fast = block_support_attention(q, k, v, stats=fast_stats, **kw)
    kw.pop("chunk_blocks", None)
    twin = reference.block_support_attention(q, k, v, stats=twin_stats, **kw)
    return fast, twin, fast_stats, twin_stats


@pytest.mark.parametrize("selection", FAST_SELECTIONS)
@pytest.mark.parametrize("estimate", FAST_ESTIMATES)
@pytest.mark.parametrize("sliding_window,padded", [(None, False), (None, True), (40, True), (100, False)],
                         ids=["plain", "padded", "window", "wide-window"])
@pytest.mark.parametrize("block_size,q_len,chunk_blocks,far", [(7, 37, None, "centroid"), (16, 90, 2, "none"),
                                                               (7, 1, None, "none"), (7, 90, 3, "centroid")])
def test_op_equals_the_twin(selection, estimate, far, sliding_window, padded, block_size, q_len, chunk_blocks):
    """37, 90 or 1 queries (the last positions) over 90 keys, GQA 4/2, blocks of 7 or 16, 3 sinks, a band of 10 keys,
    all query blocks in one chunk or 2-3 per chunk; the output and every pair count of the twin."""
    q, k, v = qkv(q_len=q_len)
    kw = dict(SETTINGS, block_size=block_size, selection=selection, estimate=estimate, far=far,
              key_padding_mask=left_padded(2, 90) if padded else None, sliding_window=sliding_window,
              chunk_blocks=chunk_blocks)
    fast, twin, fast_stats, twin_stats = both(q, k, v, **kw)
    torch.testing.assert_close(fast, twin, rtol=1e-10, atol=1e-10)
    assert {key: int(value) for key, value in twin_stats.items()} == {key: int(fast_stats[key]) for key in twin_stats}


@pytest.mark.parametrize("sample_stride,block_size", [(3, 7), (3, 16), (16, 16), (4, 16), (1, 7)])
@pytest.mark.parametrize("selection", ["row", "pooled"])
def test_other_sample_strides(sample_stride, block_size, selection):
    """Strides that divide the block (each block's samples summed by a reshape) and that do not (a scatter)."""
    q, k, v = qkv(q_len=90)
    fast, twin, _, _ = both(q, k, v, **{**SETTINGS, "block_size": block_size}, selection=selection, estimate="sampled",
                            sample_stride=sample_stride, key_padding_mask=left_padded(2, 90), chunk_blocks=2)
    torch.testing.assert_close(fast, twin, rtol=1e-10, atol=1e-10)


def test_query_blocks_alike_share_one_fixed_mask(monkeypatch):
    """Without padding, the chunks past the sinks' blocks give the kernel one mask for all their fixed tiles (a
    stride-0 view: a test that fails if every tile's mask is built); with padding, none does."""
    from sb_hf.ops import fused_cpu

    shared = []
    real = fused_cpu.kernel
    monkeypatch.setattr(fused_cpu, "kernel", lambda *a, attn_mask=None, **kw: shared.append(
        attn_mask is not None and attn_mask.shape[0] > 1 and attn_mask.stride(0) == 0) or real(*a, attn_mask=attn_mask, **kw))
    q, k, v = qkv(q_len=90, dtype=torch.float32)
    with torch.no_grad():
        block_support_attention(q, k, v, **SETTINGS, chunk_blocks=3)
        assert sum(shared) == 3  # chunks 2 to 4 of 5 (blocks 3-11); the first holds the sinks, the last the short block
        shared.clear()
        block_support_attention(q, k, v, **SETTINGS, chunk_blocks=3, key_padding_mask=left_padded(2, 90))
        assert shared and not any(shared)


def test_default_blocks_dropped_keys_and_no_gqa():
    """The default settings (blocks of 64, band 256) over 700 keys with 300 queries, one head per KV head, and real
    keys a cache dropped before the call (no sink left to keep)."""
    q, k, v = qkv(batch=2, q_heads=3, kv_heads=3, q_len=300, kv_len=700, d=16, seed=4)
    for kw in (dict(gamma=0.5), dict(gamma=0.5, dropped_real_keys=torch.tensor([0, 9])), dict(gamma=0.9, sinks=0)):
        fast, twin, _, _ = both(q, k, v, **kw)
        torch.testing.assert_close(fast, twin, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_dtypes(dtype, tol):
    """Half-precision inputs are computed in fp32 and returned in their dtype, as the twin does."""
    q, k, v = qkv(dtype=dtype)
    fast, twin, _, _ = both(q, k, v, **SETTINGS, key_padding_mask=left_padded(2, 90))
    assert fast.dtype == dtype
    torch.testing.assert_close(fast.float(), twin.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("selection", FAST_SELECTIONS)
def test_gradients_equal_the_twins(selection):
    q, k, v = qkv()
    grads = []
    for op in (block_support_attention, reference.block_support_attention):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = op(*leaves, **SETTINGS, selection=selection, key_padding_mask=left_padded(2, 90))
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=F64)).sum().backward()
        grads.append([x.grad for x in leaves])
    for fast, twin in zip(*grads):
        torch.testing.assert_close(fast, twin, rtol=1e-9, atol=1e-10)


def union_widths(q, k, v, size, band, **kw):
    """From the twin's weights (far field dropped, so a key has weight iff it is exact): per (batch, query head, query
    block) the candidate blocks (behind the band) holding an exact key that is not a sink, over the block's rows."""
    weights = reference.block_support_attention(q, k, v, far="none", return_weights=True, **kw)  # (B, Hq, Lq, Lk)
    batch, heads, q_len, kv_len = weights.shape
    offset, widths = kv_len - q_len, {}
    for b in range(batch):
        real = [j for j in range(kv_len) if kw.get("key_padding_mask") is None or kw["key_padding_mask"][b, j]]
        sink = set(real[: kw["sinks"]])
        for h in range(heads):
            for i in range(q_len):
                block = (offset + i) // size
                chosen = {j // size for j in range(kv_len) if weights[b, h, i, j] > 0 and j not in sink
                          and j // size < block - band}
                widths.setdefault((b, h, block), set()).update(chosen)
    return {key: len(value) for key, value in widths.items()}


@pytest.mark.parametrize("selection", FAST_SELECTIONS)
def test_the_selected_tiles_hold_the_union_of_the_selections(selection, monkeypatch):
    """Per query head and query block the op scores the blocks its rows selected, in calls of tiles of similar width:
    every tile with a selection is scored once, the widest call is the widest union, and the calls' padding stays
    within their buckets (a test that fails if the op scores every candidate block, pads every tile to the widest,
    or scores fewer blocks than selected)."""
    q, k, v = qkv(q_len=90)
    kw = dict(SETTINGS, gamma=0.9 if selection == "pooled" else 0.6, selection=selection, estimate="sampled",
              key_padding_mask=left_padded(2, 90))
    calls = []
    real = chunk.tile_part
    monkeypatch.setattr(chunk, "tile_part", lambda rows, k_tile, *a: calls.append(k_tile.shape[:-1]) or real(rows, k_tile, *a))
    stats = {}
    block_support_attention(q, k, v, stats=stats, **kw)
    widths = [w for w in union_widths(q, k, v, 7, 2, **kw).values() if w]
    selected = calls[1:]  # after the call of the fixed blocks and the sinks (one chunk)
    assert sum(shape[0] for shape in selected) == len(widths)  # each tile with a selection, once
    assert max(shape[1] for shape in selected) == 7 * max(widths)
    assert sum(shape[0] * shape[1] for shape in selected) <= 7 * sum(1.25 * w + 1 for w in widths)
    candidates = max(block - 2 for (_, _, block) in union_widths(q, k, v, 7, 2, **kw))  # the most a query block has
    assert 0 < max(widths) < candidates and len(selected) > 1
    assert int(stats["selected_blocks"]) < int(stats["candidate_blocks"])
    assert int(stats["computed_pairs"]) < int(stats["pairs"]) and int(stats["estimate_pairs"]) > 0


def test_gamma_zero_scores_no_selected_tile(monkeypatch):
    q, k, v = qkv(q_len=90)
    calls = []
    real = chunk.tile_part
    monkeypatch.setattr(chunk, "tile_part", lambda *a: calls.append(1) or real(*a))
    block_support_attention(q, k, v, **{**SETTINGS, "gamma": 0.0}, chunk_blocks=4)
    assert len(calls) == 4  # 13 query blocks in 4 chunks: one tile of the fixed blocks and the sinks each


def perturbed(x, positions, seed):
    y = x.clone()
    y[:, :, positions] = 3 * torch.randn(y[:, :, positions].shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return y


@pytest.mark.parametrize("selection", FAST_SELECTIONS)
def test_causality(selection):
    """``row``, ``prefix``: a row is unchanged when any later token changes; ``union``, ``pooled``: a row is unchanged
    when tokens after its block change (and may move with a later query of its own block)."""
    q, k, v = qkv(q_len=90)
    kw = dict(SETTINGS, gamma=0.9 if selection in ("pooled", "prefix") else 0.6, selection=selection, estimate="sampled")
    strict = selection in ("row", "prefix")
    out = block_support_attention(q, k, v, **kw)
    for p in (20, 41, 62, 88):
        end = p + 1 if strict else min((p // 7 + 1) * 7, 90)
        later = list(range(end, 90))
        changed = block_support_attention(perturbed(q, later, 3), perturbed(k, later, 4), perturbed(v, later, 5), **kw)
        # (up to rounding: the tiles' widths, shared by a chunk's query blocks, move with later tokens)
        torch.testing.assert_close(changed[:, :, :end], out[:, :, :end], rtol=0, atol=1e-13)
    moved = [p for p in range(7, 89) if p % 7 != 6 and (
        block_support_attention(perturbed(q, [p + 1], p), k, v, **kw)[:, :, p] - out[:, :, p]).abs().max() > 1e-6]
    assert bool(moved) == (not strict)


@pytest.mark.parametrize("bad,message", [
    (dict(selection="last"), "selection 'row', 'union', 'pooled' or 'prefix'"), (dict(selection="last"), "reference.block_support_attention"),
    (dict(gamma=-0.1), "gamma must be"), (dict(chunk_blocks=0), "chunk_blocks must be"), (dict(causal=False), "causal only"),
])
def test_bad_settings_say_what_to_change(bad, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message):
        block_support_attention(q, k, v, **{**SETTINGS, **bad})


@pytest.mark.parametrize("selection", FAST_SELECTIONS)
def test_inference_on_cpu_runs_the_tiles_in_the_fused_kernel(selection, monkeypatch):
    """At inference on a CPU every exact tile goes through PyTorch's fused kernel (a test that fails if that path is
    skipped), with the plain matmuls' result; with gradients the plain matmuls run (the kernel's backward does not
    carry the log-sum-exp's gradient)."""
    from sb_hf.ops import fused_cpu

    q, k, v = qkv(q_len=90, dtype=torch.float32)
    kw = dict(SETTINGS, gamma=0.9, selection=selection, estimate="sampled", key_padding_mask=left_padded(2, 90),
              chunk_blocks=5)
    kernel_calls, tiles = [], []
    real_kernel, real_tile = fused_cpu.kernel, chunk.tile_part
    monkeypatch.setattr(fused_cpu, "kernel", lambda *a, **k: kernel_calls.append(1) or real_kernel(*a, **k))
    monkeypatch.setattr(chunk, "tile_part", lambda *a: tiles.append(1) or real_tile(*a))
    with torch.no_grad():
        fused = block_support_attention(q, k, v, **kw)
    assert len(kernel_calls) == len(tiles) > 2 * 3  # 13 query blocks in 3 chunks: every tile in the kernel
    before = len(tiles)
    plain = block_support_attention(q.requires_grad_(), k, v, **kw)
    assert len(kernel_calls) == before < len(tiles)  # with gradients: no kernel call
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-4, atol=1e-5)  # (fp32: two orders of summation)


def test_a_call_over_the_last_queries_equals_those_rows_of_the_full_call_in_row_mode():
    """Cached decoding and chunked prefill with ``selection="row"``: the op on the last queries (one, or a chunk that
    starts inside a block) over all the keys gives those rows of the full call."""
    q, k, v = qkv(q_len=90)
    kw = dict(SETTINGS, gamma=0.8, selection="row", key_padding_mask=left_padded(2, 90))
    full = block_support_attention(q, k, v, **kw)
    for start in (89, 60, 45):
        part = block_support_attention(q[:, :, start:], k, v, **kw)
        torch.testing.assert_close(part, full[:, :, start:], rtol=1e-12, atol=1e-12)


def test_a_decoding_step_of_a_shared_selection_is_its_rows_own():
    """With ``"pooled"`` or ``"union"`` a query block's rows share a selection among the rows *in the call*: a decoding
    step (one query) selects alone, as ``"row"`` does, and so differs from the row of a full call, which its later
    block mates moved (the causality these modes state: never a token after the block)."""
    q, k, v = qkv(q_len=90)
    mask = left_padded(2, 90)
    kw = {**SETTINGS, "gamma": 0.8}
    step = lambda p, selection: block_support_attention(q[:, :, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], **kw,
                                                         selection=selection, key_padding_mask=mask[:, : p + 1])
    for selection in ("pooled", "union"):
        steps = torch.cat([step(p, selection) for p in range(40, 90, 7)], dim=2)
        torch.testing.assert_close(steps, torch.cat([step(p, "row") for p in range(40, 90, 7)], dim=2), rtol=1e-10, atol=1e-10)
        full = block_support_attention(q, k, v, **kw, selection=selection, key_padding_mask=mask)
        assert (steps - full[:, :, 40:90:7]).abs().max() > 1e-6
