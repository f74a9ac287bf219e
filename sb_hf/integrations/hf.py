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
import re
from typing import Any, Iterator

import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
)

from ..config import SupportBasisConfig, _index, load_settings
from ..ops import as23_attention, multi_threshold_attention, sink_window_attention, support_basis_attention
from ..ops.common import check_buckets
from ..ops.decoding import EVERY_KEY, Units, decoding_attention
from ..ops.heads import grouped_attention, head_groups
from .cache import decoding_states

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
DECODING_CACHE = ("support_basis", "support_basis_multi", "as23")  # the implementations that keep a decoding state
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
        query, key, value = autocast_inputs(query, key, value)
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
        stats = _active_stats[-1] if _active_stats else None
        if name in DECODING_CACHE:
            units = _layer_units(module, name, groups, per_query_head, query.shape[1], key.shape[1])
            states = decoding_states(module, name, 1 if units is not None else len(groups))
            if units is not None and states is not None:  # one call for every head of the layer
                out = decoding_attention(query, key, value, states[0], core=units[0], units=units[1], scale=scaling,
                                         causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window,
                                         stats=stats, **extra)
                if out is not None:
                    return out.transpose(1, 2).contiguous(), None
            elif states is not None:
                extra["decoding_states"] = states
        out = grouped_attention(
            op, query, key, value, groups, per_query_head=per_query_head, causal=causal, scale=scaling, key_padding_mask=key_padding_mask,
            sliding_window=sliding_window, stats=stats, **extra,
        )
        return out.transpose(1, 2).contiguous(), None

    attention_forward.__name__ = f"{name}_attention_forward"
    return attention_forward


def autocast_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The attention inputs as SDPA takes them under ``torch.autocast``: inside an autocast region for their
    device, each of ``query``, ``key``, ``value`` that is a float below fp64 is cast to autocast's dtype (the
    output is then in that dtype; the op computes in fp32 as always). transformers hands the attention
    function fp32 queries and keys (its rotary embedding) with autocast's values there. Outside autocast the
    tensors are returned as they are (the op refuses mixed dtypes, as SDPA does)."""
    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return query, key, value
    dtype = torch.get_autocast_dtype(device)
    cast = lambda x: x.to(dtype) if x.is_floating_point() and x.dtype != torch.float64 else x
    return cast(query), cast(key), cast(value)


def _layer_units(module, name, groups, per_query_head, q_heads, kv_heads) -> tuple[dict, Units] | None:
    """:func:`layer_plan` of the module's groups, cached on the module with ``groups``."""
    cached = module.__dict__.get("_sb_hf_units")
    if cached is not None and cached[0] is groups:
        return cached[1]
    plan = layer_plan(name, groups, per_query_head, q_heads, kv_heads)
    module.__dict__["_sb_hf_units"] = (groups, plan)
    return plan


def layer_plan(name: str, groups, per_query_head: bool, q_heads: int, kv_heads: int) -> tuple[dict, Units] | None:
    """The polynomial a layer's groups of heads share and the structure of each head (``(core, units)``, the
    arguments of :func:`sb_hf.ops.decoding.decoding_attention`), when the groups differ only in structure (local
    window, sinks, key columns, radius limit) or are computed exactly (threshold 0): a decoding step then runs
    every head in one call. None otherwise (one call per group)."""
    # Heads computed exactly (threshold 0) join as heads whose local band covers every key.
    exact = [_polynomial(name, kwargs)["thresholds"][0] == 0 for _, kwargs in groups]
    if all(exact):
        exact = [False] * len(groups)
    groups = [(heads, {**kwargs, "local_window": EVERY_KEY, "sinks": 0, "column_queries": None}) if is_exact else (heads, kwargs)
              for (heads, kwargs), is_exact in zip(groups, exact)]
    cores = [_polynomial(name, kwargs) for (_, kwargs), is_exact in zip(groups, exact) if not is_exact]
    rep = q_heads // kv_heads
    columns_fit = all(kwargs.get("column_queries") is None or kwargs["column_queries"].shape[0] == len(heads) * (1 if per_query_head else rep)
                      for heads, kwargs in groups)  # else the op itself says what is wrong with them
    if not columns_fit or any(core != cores[0] for core in cores):
        return None
    return cores[0], _units(groups, per_query_head, q_heads, kv_heads)


def _polynomial(name: str, kwargs: dict) -> dict:
    """The settings of an op call that define its polynomial (what one decoding state holds sums for)."""
    if name == "support_basis_multi":
        thresholds, degrees, sketch_dims = check_buckets(kwargs["thresholds"], kwargs["degrees"], kwargs["sketch_dim"])
    else:
        thresholds = [kwargs["threshold"] if name == "support_basis" else float("inf")]
        degrees, sketch_dims = [kwargs["degree"]], [kwargs["sketch_dim"]]
    return dict(thresholds=list(thresholds), degrees=list(degrees), sketch_dims=list(sketch_dims),
                sketch_seed=kwargs["sketch_seed"], kernel=kwargs["kernel"], radius=kwargs["radius"])


def _units(groups, per_query_head: bool, q_heads: int, kv_heads: int) -> Units:
    """Each head's structure from its group's op kwargs: a unit per query head (``heads`` settings) or per KV head."""
    rep = q_heads // kv_heads
    count = q_heads if per_query_head else kv_heads
    per_unit = [None] * count
    query_rows = [None] * q_heads  # (group kwargs, row of the group's column_queries) of each query head
    for heads, kwargs in groups:
        q_of_group = heads if per_query_head else [g * rep + r for g in heads for r in range(rep)]
        for unit in heads:
            per_unit[unit] = kwargs
        for row, head in enumerate(q_of_group):
            query_rows[head] = (kwargs, row)
    column_queries = column_threshold = None
    if any(kwargs.get("column_queries") is not None for _, kwargs in groups):
        d = next(kwargs["column_queries"].shape[1] for _, kwargs in groups if kwargs.get("column_queries") is not None)
        rows, limits = [], []
        for kwargs, row in query_rows:
            queries = kwargs.get("column_queries")
            if queries is None:  # a head without key columns: no key passes an infinite threshold
                rows.append(torch.zeros(d, dtype=torch.float64))
                limits.append(float("inf"))
            else:
                rows.append(queries[row].double().cpu())
                threshold = torch.as_tensor(kwargs["column_threshold"], dtype=torch.float64)
                limits.append(float(threshold if threshold.dim() == 0 else threshold[row]))
        device = next(kwargs["column_queries"].device for _, kwargs in groups if kwargs.get("column_queries") is not None)
        column_queries, column_threshold = torch.stack(rows).to(device), torch.tensor(limits, dtype=torch.float64, device=device)
    return Units(per_kv_head=rep if per_query_head else 1, local_windows=[kw.get("local_window", 0) for kw in per_unit],
                 sinks=[kw.get("sinks", 0) for kw in per_unit], radius_limits=[kw["radius_limit"] for kw in per_unit],
                 column_queries=column_queries, column_threshold=column_threshold)


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
    attention of a decoding step. The cache holds a copy of the stored settings this layer's come from
    (:func:`_layer_view`) and is rebuilt whenever they compare different (replaced or edited in place)."""
    stored = _layer_view(getattr(getattr(module, "config", None), "support_basis", None), getattr(module, "layer_idx", None))
    key = (name, device, q_heads, kv_heads)
    cached = module.__dict__.get("_sb_hf_op_kwargs")
    if cached is not None and cached[0] == key and cached[1] == stored:
        return cached[2]
    groups = attention_groups(settings_for(module), name, device, q_heads, kv_heads)
    module.__dict__["_sb_hf_op_kwargs"] = (key, copy.deepcopy(stored), groups)
    return groups


def _layer_view(stored, layer_index):
    """The parts of stored settings (a dict) one layer's settings come from: the defaults and this layer's
    overrides (every layer key parsed as the config parses it: a bad one raises here too). Comparing only
    these on every call keeps a calibrated config's other 29 layers (per-head mean queries) out of a
    decoding step's cost."""
    if not isinstance(stored, dict) or layer_index is None:
        return stored
    layers = stored.get("layers") or {}
    defaults = {key: value for key, value in stored.items() if key != "layers"}
    return defaults, [value for key, value in layers.items() if _index(key, "layers") == layer_index]


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


OLDEST_TRANSFORMERS = (5, 4)  # the first release whose mask functions take (batch_size, q_length, kv_length, ...)


def check_transformers_version(version: str) -> None:
    """Raise ``ImportError`` for a transformers release older than :data:`OLDEST_TRANSFORMERS`."""
    installed = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if installed < OLDEST_TRANSFORMERS:
        raise ImportError(f"sb-hf needs transformers >= {'.'.join(map(str, OLDEST_TRANSFORMERS))} (its attention mask "
                          f"interface), found {version}; pip install -U 'transformers>=5.4,<5.25'")


def register() -> None:
    """Register ``support_basis``, ``support_basis_multi``, ``as23`` and ``sink_window`` with transformers'
    attention and mask interfaces (an ``ImportError`` on a transformers release older than the package supports)."""
    check_transformers_version(transformers.__version__)
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
