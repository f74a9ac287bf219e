"""Transformers glue: the attention functions, their mask function, and ``apply_support_basis``.

The mask function follows transformers' ``flash_attention_mask``: instead of a dense
``(batch, 1, q, kv)`` mask it returns the 2-D key padding mask (or None when there is no padding),
cut to the keys the queries can reach, and the attention function rebuilds causality and the
sliding window structurally from positions. Without a registered mask function transformers
would hand us no mask at all, silently dropping padding.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Iterator

import torch
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
)

from ..config import SupportBasisConfig, load_settings
from ..ops import as23_attention, multi_threshold_attention, sink_window_attention, support_basis_attention
from ..ops.heads import grouped_attention, head_groups

IMPLEMENTATIONS = {
    "support_basis": support_basis_attention,
    "support_basis_multi": multi_threshold_attention,
    "as23": as23_attention,
    "sink_window": sink_window_attention,
}
# The settings (fields of SupportBasisConfig, as op keyword arguments) each implementation takes.
STRUCTURE = ("sinks", "local_window", "column_queries", "column_threshold")
OP_SETTINGS = {
    "support_basis": ("threshold", "degree", "radius", "chunk_size", "max_feature_bytes", "sketch_dim", "sketch_seed", "kernel",
                      "radius_limit", *STRUCTURE),
    "support_basis_multi": ("thresholds", "degrees", "radius", "chunk_size", "max_feature_bytes", "sketch_dim",
                            "sketch_seed", "kernel", "radius_limit", *STRUCTURE),
    "as23": ("degree", "radius", "chunk_size", "max_feature_bytes", "sketch_dim", "sketch_seed", "kernel", "radius_limit"),
    "sink_window": ("sinks", "local_window", "chunk_size"),
}
_active_stats: list[dict] = []  # innermost `attention_stats()` context receives the pair counts


@contextlib.contextmanager
def attention_stats() -> Iterator[dict]:
    """Count, over every support-basis attention call inside the block, the visible (query, key)
    pairs and those computed exactly: ``{"exact_pairs", "pairs", "exact_rows", "rows"}`` (tensors)."""
    stats: dict = {}
    _active_stats.append(stats)
    try:
        yield stats
    finally:
        _active_stats.remove(stats)


def _make_attention_forward(name: str):
    op = IMPLEMENTATIONS[name]

    def attention_forward(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        is_causal: bool | None = None,
        softcap: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if softcap is not None:
            raise ValueError(f"`{name}` attention does not support softcap; use attn_implementation='eager'")
        if dropout:
            raise ValueError(
                f"`{name}` attention has no attention dropout (got dropout={dropout}); set "
                "config.attention_dropout = 0.0 or use another attention implementation for training with it"
            )
        if kwargs.get("output_attentions", False):
            raise ValueError(f"`{name}` attention never forms the attention matrix; use attn_implementation='eager' for output_attentions")
        if kwargs.get("s_aux") is not None:
            raise ValueError(f"`{name}` attention does not support learned attention sinks (s_aux)")
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        key_padding_mask, extra = None, {}
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"`{name}` attention got a prepared {attention_mask.dim()}-D {attention_mask.dtype} mask; it needs "
                    "the 2-D padding mask that its registered mask function builds. Pass a 2-D attention_mask "
                    "(1 for tokens, 0 for padding) instead of a 4-D mask."
                )
            dropped = attention_mask.shape[-1] - key.shape[2]
            if dropped > 0:  # leading keys that a sliding-window cache dropped (see `support_basis_mask`)
                if "sinks" in OP_SETTINGS[name]:  # their real tokens still hold the first sink ranks
                    extra["dropped_real_keys"] = attention_mask[:, :dropped].sum(dim=-1)
                attention_mask = attention_mask[:, dropped:]
            keys = attention_mask.shape[-1]
            key, value, key_padding_mask = key[:, :, :keys], value[:, :, :keys], attention_mask
        groups, per_query_head = _module_groups(module, name, query.device, query.shape[1], key.shape[1])
        out = grouped_attention(
            op, query, key, value, groups, per_query_head=per_query_head, causal=causal, scale=scaling, key_padding_mask=key_padding_mask,
            sliding_window=sliding_window, stats=_active_stats[-1] if _active_stats else None, **extra,
        )
        return out.transpose(1, 2).contiguous(), None

    attention_forward.__name__ = f"{name}_attention_forward"
    return attention_forward


def _op_kwargs(settings: SupportBasisConfig, name: str) -> dict[str, Any]:
    available = settings.bucket_settings() if name == "support_basis_multi" else settings.op_kwargs(name)
    return {field: available[field] for field in OP_SETTINGS[name]}


def attention_groups(layer: SupportBasisConfig, name: str, device: torch.device, q_heads: int,
                     kv_heads: int) -> tuple[list[tuple[list[int], dict[str, Any]]], bool]:
    """The op calls of one layer's settings (:meth:`SupportBasisConfig.for_layer`) for implementation ``name``:
    ``[(heads, op kwargs), ...]`` (tensors on ``device``), one per group of heads that share settings, and
    whether the heads are query heads (``heads`` settings) rather than KV heads; the arguments of
    :func:`sb_hf.ops.heads.grouped_attention`."""
    unit, heads = layer.head_settings()
    if heads and not name.startswith("support_basis"):
        field = "kv_heads" if unit == "KV" else "heads"
        raise ValueError(f"{field} settings are for the support-basis methods, not {name!r}; remove {field} from "
                         "config.support_basis or use attn_implementation='support_basis'")

    def on_device(settings: SupportBasisConfig) -> dict[str, Any]:
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value
                for key, value in _op_kwargs(settings, name).items()}

    count = q_heads if unit == "query" else kv_heads
    kwargs = {**dict.fromkeys(range(count), on_device(layer)), **{g: on_device(s) for g, s in heads.items()}}
    return head_groups(kwargs, count, unit), unit == "query"


def _module_groups(module: torch.nn.Module, name: str, device: torch.device, q_heads: int,
                   kv_heads: int) -> tuple[list[tuple[list[int], dict[str, Any]]], bool]:
    """:func:`attention_groups` of ``module``'s layer, parsed once and cached on the module: validating a
    calibrated config (per-head mean queries of every layer) on every call would cost more than the
    attention of a decoding step. The cache holds a copy of the stored settings and is rebuilt whenever
    they compare different (replaced or edited in place)."""
    stored = getattr(getattr(module, "config", None), "support_basis", None)
    key = (name, device, q_heads, kv_heads)
    cached = module.__dict__.get("_sb_hf_op_kwargs")
    if cached is not None and cached[0] == key and cached[1] == stored:
        return cached[2]
    groups = attention_groups(settings_for(module), name, device, q_heads, kv_heads)
    module.__dict__["_sb_hf_op_kwargs"] = (key, copy.deepcopy(stored), groups)
    return groups


def settings_for(module: torch.nn.Module) -> SupportBasisConfig:
    """The settings of an attention module: ``module.config.support_basis`` for its layer, or defaults."""
    config = getattr(module, "config", None)
    stored = getattr(config, "support_basis", None)
    return SupportBasisConfig.from_dict(stored).for_layer(getattr(module, "layer_idx", None))


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


def register() -> None:
    """Register ``support_basis``, ``support_basis_multi``, ``as23`` and ``sink_window`` with transformers'
    attention and mask interfaces."""
    for name in IMPLEMENTATIONS:
        AttentionInterface.register(name, _make_attention_forward(name))
        AttentionMaskInterface.register(name, support_basis_mask)


def apply_support_basis(
    model: torch.nn.Module | None = None,
    config: SupportBasisConfig | dict | None = None,
    *,
    method: str = "support_basis",
    force: bool = False,
    **overrides: Any,
):
    """Switch ``model`` to support-basis attention, or, without a model, every supported model
    loaded from now on (the one-line patch for existing scripts).

    The settings are stored as a plain dict in ``model.config.support_basis`` (so
    ``save_pretrained``/``from_pretrained`` round-trip them); ``layers={i: {...}}`` overrides
    single layers; ``config`` may also be the path of a JSON settings file (``support_basis.json`` from
    ``sb-hf calibrate``, or a model's ``config.json``). ``method="support_basis_multi"`` the multi-threshold variant (settings
    ``thresholds``, ``degrees``), ``method="as23"`` the bounded-entry baseline, ``method="sink_window"``
    the attention sinks + local window baseline (settings ``sinks``, ``local_window``).

    Without a model: ``from_pretrained``/``from_config`` switch the Llama and Mistral models they
    return; a load with an explicit ``attn_implementation`` keeps it unless ``force=True``; with no
    settings given, a model keeps the settings it was saved with. Undo with :func:`revert_support_basis`.
    Returns the model (None without one).
    """
    if method not in IMPLEMENTATIONS:
        raise ValueError(f"method must be one of {sorted(IMPLEMENTATIONS)}, got {method!r}")
    if isinstance(config, SupportBasisConfig):
        settings = config.to_dict()
    elif config is None:
        settings = {}
    elif isinstance(config, dict):
        settings = dict(config)
    elif isinstance(config, (str, os.PathLike)):  # a support_basis.json from `sb-hf calibrate`, or a config.json
        settings = load_settings(config)
    else:
        raise ValueError(f"config must be a SupportBasisConfig, a dict, a JSON file path or None, got {type(config).__name__}")
    settings.update(overrides)
    checked = SupportBasisConfig.from_dict(settings)
    checked.check_method(method)
    validated = checked.to_dict()
    if model is None:
        from ..patches import patch_loading

        patch_loading(method, validated if (config is not None or overrides) else None, force)
        return None
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} is not a transformers PreTrainedModel; pass the model that from_pretrained returned")
    previous = getattr(model.config, "_attn_implementation", None)
    if previous not in IMPLEMENTATIONS:  # what revert_support_basis goes back to
        model._sb_hf_previous_attn_implementation = previous
    model.config.support_basis = validated
    model.set_attn_implementation(method)
    return model


def revert_support_basis(model: torch.nn.Module | None = None):
    """Undo :func:`apply_support_basis`: give ``model`` back the attention implementation it had
    (``sdpa`` if it was loaded with an sb-hf one) and drop its settings; without a model, stop
    switching the models loaded from now on (models already switched stay switched). Returns the
    model, or without one whether a patch was in effect."""
    if model is None:
        from ..patches import unpatch_loading

        return unpatch_loading()
    previous = getattr(model, "_sb_hf_previous_attn_implementation", None) or "sdpa"
    model.set_attn_implementation(previous)
    if hasattr(model.config, "support_basis"):
        del model.config.support_basis
    if hasattr(model, "_sb_hf_previous_attn_implementation"):
        del model._sb_hf_previous_attn_implementation
    return model
