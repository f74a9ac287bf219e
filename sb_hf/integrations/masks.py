"""The mask function of the sb-hf implementations (registered with transformers' ``AttentionMaskInterface``).

It follows transformers' ``flash_attention_mask``: instead of a dense ``(batch, 1, q, kv)`` mask it returns the 2-D
key padding mask (or None when there is no padding), cut to the keys the queries can reach, and the attention
function rebuilds causality and the sliding window structurally from positions. Without a registered mask function
transformers would hand the attention no mask at all, silently dropping padding.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.masking_utils import causal_mask_function, prepare_padding_mask


def support_basis_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | torch.Tensor = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The compact mask of the implementations here: ``(batch, keys)`` bool, or None.

    ``keys`` is the number of leading cached keys that exist for these queries (fewer than
    ``kv_length`` only with a static cache that is not full); queries are the last ``q_length``
    of them. Causality and the sliding window are applied by the attention from positions.

    When a sliding-window cache has dropped the first ``kv_offset`` keys (no query can see them),
    the mask also covers them, in front: ``(batch, kv_offset + keys)``. The attention cuts them off;
    ``sink_window`` counts their real tokens, which hold the first sink ranks.
    """
    _check_mask_function(mask_function)
    q_end = int(q_offset) + q_length  # position after the last query (a tensor for static caches)
    keys = min(kv_length, q_end - kv_offset)
    if kv_offset > 0:
        if keys != kv_length:
            raise NotImplementedError(f"a cache that dropped {kv_offset} keys yet holds fewer than {kv_length} is not supported")
        if attention_mask is None:
            return torch.ones(batch_size, kv_offset + keys, dtype=torch.bool, device=kwargs.get("device"))
        return prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, : kv_offset + keys]
    if attention_mask is None:
        if keys == kv_length:
            return None
        return torch.ones(batch_size, keys, dtype=torch.bool, device=kwargs.get("device"))
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    padding = padding[:, kv_offset : kv_offset + keys]
    if keys == kv_length and bool(padding.all()):
        return None
    return padding


def _check_mask_function(mask_function) -> None:
    """Only the structural masks we rebuild from positions are accepted; anything else (packed
    sequences, block masks, custom overlays, bidirectional use) would be silently ignored."""
    if mask_function is causal_mask_function:
        return
    if getattr(mask_function, "__qualname__", "") == "and_masks.<locals>.and_mask" and mask_function.__closure__:
        parts = mask_function.__closure__[0].cell_contents
        if (
            isinstance(parts, tuple)
            and len(parts) == 2
            and getattr(parts[0], "__qualname__", "") == "sliding_window_overlay.<locals>.inner_mask"
            and parts[1] is causal_mask_function
        ):
            return
    raise NotImplementedError(
        "support_basis attention supports causal and sliding-window masks with padding only; this call needs "
        f"another mask ({getattr(mask_function, '__qualname__', mask_function)}), e.g. packed sequences "
        "(position_ids restarting without an attention_mask), block/bidirectional masks or custom overlays. "
        "Pass a padded batch with an attention_mask, or use attn_implementation='sdpa' for this model."
    )
