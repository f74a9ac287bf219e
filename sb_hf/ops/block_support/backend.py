"""What the ``block_support`` attention implementation runs per call: the block-support op where it pays, exact
attention elsewhere.

Exact attention (:func:`exact_attention`: PyTorch's SDPA with the same masks) serves the calls over fewer keys than
``exact_below`` (below the op's measured break-even it is the faster of the two, and exact) and the calls with fewer
queries than a block, decoding steps among them (a generated token attends exactly to the cache, as in MInference
and FlexPrefill, whose sparsity is the prompt's; block summaries kept in the cache are issue 24's to do).

Where gradients flow (training), a selection shared by a query block's rows (``"pooled"``, the default, and
``"union"``), which lets a row depend on its block's later queries, runs as ``"prefix"`` instead
(:func:`causal_selection`): each row pooled over its block's rows up to itself, so no row depends on a later token (a
later token's query could otherwise leak its identity into the support of the rows that predict it).

The op runs in one of two engines (``engine``): ``"chunk"`` (:mod:`.chunk`, PyTorch's fused CPU kernel per tile:
the fast one on a CPU, and the one with pair counts and per-row selections) or ``"flex"`` (:mod:`.flex`, one
FlexAttention call: the CUDA path). ``"auto"`` (the default) takes FlexAttention on CUDA for the shared selections
when no pair counts are asked for (:func:`engine_for`), the chunked op elsewhere.
"""

from __future__ import annotations

import torch

from ..checks import check_inputs
from ..masking import add_stats, key_spans, span_counts, visible
from .chunk import block_support_attention
from .flex import block_support_flex
from .settings import SHARED_SELECTIONS, BlockSettings

ENGINES = {
    "auto": "FlexAttention on CUDA for the shared selections without pair counts, the chunked op elsewhere",
    "chunk": "the chunked op (PyTorch's fused CPU kernel per tile; every selection; pair counts)",
    "flex": "one FlexAttention call (compiled on CUDA, eager elsewhere: slow, for checks; shared selections only)",
}


def engine_for(engine: str, device_type: str, selection: str, counting: bool) -> str:
    """Which engine runs the op: ``engine`` (:data:`ENGINES`) resolved for a call on ``device_type`` with
    ``selection``, ``counting`` when the caller asks for pair counts."""
    if engine not in ENGINES:
        raise ValueError(f"block.engine must be one of {tuple(ENGINES)}, got {engine!r}")
    if engine != "auto":
        return engine
    return "flex" if device_type == "cuda" and selection in SHARED_SELECTIONS and not counting else "chunk"


def causal_selection(selection: str, *tensors: torch.Tensor) -> str:
    """``selection`` for a call on ``tensors``: where gradients flow, a shared selection (``"pooled"``, ``"union"``)
    becomes ``"prefix"`` (strictly causal: no row depends on a later token); otherwise unchanged."""
    training = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    return "prefix" if training and selection in SHARED_SELECTIONS else selection


def block_support_or_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, exact_below: int,
                           block_size: int, sinks: int, local_window: int, engine: str = "auto",
                           **settings) -> torch.Tensor:
    """Block-support attention with ``settings`` in ``engine`` (:func:`engine_for`) when ``k`` holds at least
    ``exact_below`` keys and ``q`` at least a block of queries (with gradients, a shared selection as ``"prefix"``:
    :func:`causal_selection`), else :func:`exact_attention` with the same masks
    (``causal``, ``scale``, ``key_padding_mask``, ``sliding_window``, ``stats``; ``dropped_real_keys`` only places
    the sinks)."""
    settings["selection"] = causal_selection(settings.get("selection", BlockSettings.selection), q, k, v)
    selection = settings["selection"]
    chosen = engine_for(engine, q.device.type, selection, settings.get("stats") is not None)
    if k.shape[2] < exact_below or q.shape[2] < block_size:
        masks = {name: settings[name] for name in ("causal", "scale", "key_padding_mask", "sliding_window", "stats")
                 if name in settings}
        return exact_attention(q, k, v, **masks)
    if chosen == "flex":
        if selection not in SHARED_SELECTIONS:
            raise ValueError(f"block.engine 'flex' takes the shared selections {SHARED_SELECTIONS}; this call runs "
                             f"{selection!r} (with gradients the backend runs 'prefix', strictly causal); use engine "
                             "'auto' or 'chunk'")
        if settings.get("stats") is not None:
            raise ValueError("block.engine 'flex' gives no pair counts; use engine 'chunk' (or 'auto') to count them")
        settings.pop("stats", None)
        return block_support_flex(q, k, v, block_size=block_size, sinks=sinks, local_window=local_window, **settings)
    return block_support_attention(q, k, v, block_size=block_size, sinks=sinks, local_window=local_window, **settings)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None,
                    key_padding_mask: torch.Tensor | None = None, sliding_window: int | None = None,
                    stats: dict | None = None) -> torch.Tensor:
    """Exact attention in PyTorch's SDPA (GQA, in the inputs' dtype), the queries at the last key positions; a row
    that sees no key gets zeros (as the sb-hf ops; SDPA would give NaN). Without padding or a window, a full causal
    call or a single query needs no mask (SDPA's fused path), otherwise a boolean ``(B, 1, Lq, Lk)`` mask. No pass
    over the inputs to check them finite: a decoding step reads the cache once, as SDPA's does."""
    shapes = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window,
                          scale=scale, check_finite=False)
    lq, lk = shapes.q_len, shapes.kv_len
    if stats is not None:
        start, end = key_spans(lq, lk, causal=causal, sliding_window=sliding_window, device=q.device)
        valid = torch.ones(shapes.batch, lk, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
        pairs, rows = span_counts(valid, start, end).sum() * shapes.q_heads, torch.tensor(q.shape[:3].numel(), device=q.device)
        add_stats(stats, exact_pairs=pairs, pairs=pairs, exact_rows=rows, rows=rows)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if key_padding_mask is None and (sliding_window is None or not causal) and (lq == lk or lq == 1 or not causal):
        return sdpa(q, k, v, is_causal=causal and lq > 1, scale=scale, enable_gqa=True)
    positions = torch.arange(lk, device=q.device)
    mask = visible(positions[lk - lq:], positions, causal=causal, sliding_window=sliding_window)[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    out = sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return torch.where(mask.any(dim=-1, keepdim=True), out, 0.0)
