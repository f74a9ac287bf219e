"""Plain softmax attention computed densely, and the dense inputs every naive twin starts from."""

from __future__ import annotations

import torch

from .checks import check_inputs, compute_dtype
from .masking import visible
from .partial import masked_softmax


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    return_weights: bool = False,
) -> torch.Tensor:
    """Plain softmax attention with the package's masking conventions (rows with no visible key give 0).
    With ``return_weights`` the attention weights ``(B, Hq, Lq, Lk)`` are returned instead."""
    shapes = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window,
                          scale=scale)
    out_dtype = q.dtype
    q, k, v, scale, mask, _ = dense_inputs(q, k, v, shapes, scale, key_padding_mask, causal, sliding_window)
    weights = masked_softmax(scale * q @ k.transpose(-1, -2), mask)
    return weights if return_weights else (weights @ v).to(out_dtype)


def dense_inputs(q, k, v, shapes, scale, key_padding_mask, causal, sliding_window):
    """Inputs in the compute dtype with k/v repeated to the query heads, the scale, the full
    ``(B, 1, Lq, Lk)`` visibility mask (padding included) and the key validity ``(B, Lk)``."""
    compute = compute_dtype(q.dtype)
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scale = shapes.head_dim**-0.5 if scale is None else scale
    k = k.repeat_interleave(shapes.groups, dim=1)
    v = v.repeat_interleave(shapes.groups, dim=1)
    q_pos = torch.arange(shapes.q_len, device=q.device) + (shapes.kv_len - shapes.q_len)
    k_pos = torch.arange(shapes.kv_len, device=q.device)
    key_valid = (
        torch.ones(shapes.batch, shapes.kv_len, dtype=torch.bool, device=q.device)
        if key_padding_mask is None
        else key_padding_mask
    )
    mask = visible(q_pos, k_pos, causal=causal, sliding_window=sliding_window) & key_valid[:, None, None, :]
    return q, k, v, scale, mask, key_valid
