"""Different settings per KV head: one op call per group of KV heads that share settings.

A KV head is the unit (not a query head) because the key columns of support basis are exact for a key's
whole query group (:func:`sb_hf.ops.support_basis_attention`); splitting a group would change them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def kv_head_groups(settings: dict[int, dict[str, Any]], kv_heads: int) -> list[tuple[list[int], dict[str, Any]]]:
    """``[(kv head indices, op kwargs), ...]`` from ``{kv_head: op kwargs}`` (one entry per KV head): KV heads
    whose kwargs are the same object share a call (the caller builds one object per distinct setting)."""
    missing = sorted(set(range(kv_heads)) - set(settings))
    if missing:
        raise ValueError(f"no settings for KV heads {missing} of {kv_heads}")
    extra = sorted(set(settings) - set(range(kv_heads)))
    if extra:
        raise ValueError(f"settings given for KV heads {extra}, but the layer has {kv_heads} (0 to {kv_heads - 1}); "
                         "kv_heads entries must index the model's key/value heads")
    groups: dict[int, tuple[list[int], dict[str, Any]]] = {}
    for g in range(kv_heads):
        groups.setdefault(id(settings[g]), ([], settings[g]))[0].append(g)
    return list(groups.values())


def grouped_attention(op: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      groups: list[tuple[list[int], dict[str, Any]]], **common: Any) -> torch.Tensor:
    """``op`` run once per group of KV heads with that group's kwargs (and ``common``), on the group's
    query heads (``query``: ``(B, Hq, n, d)``, ``key``/``value``: ``(B, Hkv, m, d)``, ``Hq`` a multiple of
    ``Hkv``); the outputs reassembled in head order, ``(B, Hq, n, dv)``."""
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    if len(groups) == 1:
        return op(query, key, value, **common, **groups[0][1])
    rep = query.shape[1] // key.shape[1]
    outputs, order = [], []
    for kv, kwargs in groups:
        kv_index = torch.tensor(kv, device=query.device)
        q_heads = [g * rep + r for g in kv for r in range(rep)]
        outputs.append(op(query[:, q_heads], key.index_select(1, kv_index), value.index_select(1, kv_index),
                          **common, **kwargs))
        order += q_heads
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(outputs, dim=1).index_select(1, inverse.to(query.device))
