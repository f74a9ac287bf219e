"""Different settings per head: one op call per group of heads that share settings.

Two units. A KV head (``kv_heads``): its query heads run together, so the key columns of support basis are
exact for the key's whole query group (:func:`sb_hf.ops.support_basis_attention`). A query head (``heads``):
each runs on its KV head's keys as if it had them alone, its key columns its own.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def head_groups(settings: dict[int, dict[str, Any]], heads: int, unit: str = "KV") -> list[tuple[list[int], dict[str, Any]]]:
    """``[(head indices, op kwargs), ...]`` from ``{head: op kwargs}`` (one entry per head of the ``unit``,
    ``"KV"`` or ``"query"``): heads whose kwargs are the same object share a call (the caller builds one
    object per distinct setting)."""
    missing = sorted(set(range(heads)) - set(settings))
    if missing:
        raise ValueError(f"no settings for {unit} heads {missing} of {heads}")
    extra = sorted(set(settings) - set(range(heads)))
    if extra:
        name = "kv_heads" if unit == "KV" else "heads"
        raise ValueError(f"settings given for {unit} heads {extra}, but the layer has {heads} (0 to {heads - 1}); "
                         f"{name} entries must index the model's {'key/value' if unit == 'KV' else 'query'} heads")
    groups: dict[int, tuple[list[int], dict[str, Any]]] = {}
    for g in range(heads):
        groups.setdefault(id(settings[g]), ([], settings[g]))[0].append(g)
    return list(groups.values())


def grouped_attention(op: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      groups: list[tuple[list[int], dict[str, Any]]], *, per_query_head: bool = False,
                      decoding_states: list | None = None, **common: Any) -> torch.Tensor:
    """``op`` run once per group of heads with that group's kwargs (and ``common``); the outputs reassembled
    in head order, ``(B, Hq, n, dv)`` (``query``: ``(B, Hq, n, d)``, ``key``/``value``: ``(B, Hkv, m, d)``, ``Hq`` a
    multiple of ``Hkv``). The groups hold KV heads (each with its query heads), or with ``per_query_head``
    query heads, each paired with its own copy of its KV head's keys and values. ``decoding_states``: one
    :class:`sb_hf.ops.decoding.DecodingState` per group, passed to its calls as ``decoding_state``."""
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads ({key.shape[1]})")
    if decoding_states is not None and len(decoding_states) != len(groups):
        raise ValueError(f"{len(decoding_states)} decoding states for {len(groups)} groups of heads")
    per_group = [{"decoding_state": state} for state in decoding_states] if decoding_states is not None else [{}] * len(groups)
    if len(groups) == 1:
        return op(query, key, value, **common, **groups[0][1], **per_group[0])
    rep = query.shape[1] // key.shape[1]
    outputs, order = [], []
    for (heads, kwargs), extra in zip(groups, per_group):
        q_heads = heads if per_query_head else [g * rep + r for g in heads for r in range(rep)]
        kv_heads = [h // rep for h in heads] if per_query_head else heads
        outputs.append(op(_heads(query, q_heads), _heads(key, kv_heads), _heads(value, kv_heads), **common, **kwargs, **extra))
        order += q_heads
    out = torch.cat(outputs, dim=1)
    if order == list(range(len(order))):
        return out
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return out.index_select(1, inverse.to(query.device))


def _heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """``x[:, heads]``: a view when the heads are consecutive (no copy of a long KV cache), else a copy."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0] : heads[0] + len(heads)]
    return x.index_select(1, torch.tensor(heads, device=x.device))
