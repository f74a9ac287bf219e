"""The dense twin of sink + local window attention: it defines what :mod:`.chunk` computes."""

from __future__ import annotations

import torch

from ..checks import check_inputs, check_sink_window
from ..masking import add_stats, sink_keys
from ..naive import dense_inputs
from ..partial import masked_softmax


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    sinks: int,
    local_window: int,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    stats: dict | None = None,
    dropped_real_keys: torch.Tensor | None = None,
    return_weights: bool = False,
) -> torch.Tensor:
    """Sink + local window attention computed densely. See :func:`sb_hf.ops.sink_window_attention` (``chunk.py`` beside this file).

    ``chunk_size`` is unused; ``stats`` receives the same counts as the fast op, from the dense masks.
    With ``return_weights`` the attention weights ``(B, Hq, Lq, Lk)`` are returned instead."""
    shapes = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window,
                          scale=scale)
    check_sink_window(sinks, local_window, causal, dropped_real_keys, shapes.batch)
    out_dtype = q.dtype
    q, k, v, scale, mask, key_valid = dense_inputs(q, k, v, shapes, scale, key_padding_mask, causal, sliding_window)

    sink = sink_keys(key_valid, sinks, dropped_real_keys)  # (B, Lk)
    q_pos = torch.arange(shapes.q_len, device=q.device) + (shapes.kv_len - shapes.q_len)
    k_pos = torch.arange(shapes.kv_len, device=q.device)
    local = (q_pos[:, None] - k_pos[None, :]) < local_window  # (Lq, Lk)
    attend = mask & (sink[:, None, None, :] | local)  # (B, 1, Lq, Lk)

    if stats is not None:
        heads = shapes.q_heads  # the masks are shared by all heads
        add_stats(
            stats, exact_pairs=attend.sum() * heads, pairs=mask.sum() * heads,
            exact_rows=(attend == mask).all(dim=-1).sum() * heads,
            rows=torch.tensor(shapes.batch * heads * shapes.q_len, device=q.device),
        )
    weights = masked_softmax(scale * q @ k.transpose(-1, -2), attend)
    return weights if return_weights else (weights @ v).to(out_dtype)
