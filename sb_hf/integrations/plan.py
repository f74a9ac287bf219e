"""From settings to op calls: which op each implementation runs and which settings it takes, a layer's groups of
heads that share settings (:func:`attention_groups`, cached per attention module by :func:`module_groups`), and the
one-call-per-layer plan of a decoding step (:func:`layer_plan`: the shared polynomial and each head's structure)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..config import SupportBasisConfig, parse_index
from ..ops import as23_attention, multi_threshold_attention, sink_window_attention, support_basis_attention
from ..ops.block_support import block_support_or_exact
from ..ops.support_basis import EVERY_KEY, Polynomial, Units
from ..ops.heads import head_groups

IMPLEMENTATIONS = {
    "support_basis": support_basis_attention,
    "support_basis_multi": multi_threshold_attention,
    "as23": as23_attention,
    "sink_window": sink_window_attention,
    "block_support": block_support_or_exact,
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
    "block_support": ("sinks", "local_window", "gamma", "block_size", "selection", "estimate", "far", "sample_stride",
                      "exact_below", "engine"),
}
DECODING_CACHE = ("support_basis", "support_basis_multi", "as23")  # the implementations that keep a decoding state


def module_plan(module, name, groups, per_query_head, q_heads, kv_heads) -> tuple[Polynomial, Units] | None:
    """:func:`layer_plan` of the module's groups, cached on the module with ``groups``."""
    cached = module.__dict__.get("_sb_hf_units")
    if cached is not None and cached[0] is groups:
        return cached[1]
    plan = layer_plan(name, groups, per_query_head, q_heads, kv_heads)
    module.__dict__["_sb_hf_units"] = (groups, plan)
    return plan


def layer_plan(name: str, groups, per_query_head: bool, q_heads: int, kv_heads: int) -> tuple[Polynomial, Units] | None:
    """The polynomial a layer's groups of heads share and the structure of each head (``(polynomial, units)``, the
    arguments of :func:`sb_hf.ops.decoding_attention`), when the groups differ only in structure (local
    window, sinks, key columns, radius limit) or are computed exactly (threshold 0): a decoding step then runs
    every head in one call. None otherwise (one call per group)."""
    # Heads computed exactly (threshold 0) join as heads whose local band covers every key.
    exact = [polynomial_of(name, kwargs).threshold == 0 for _, kwargs in groups]
    if all(exact):
        exact = [False] * len(groups)
    groups = [(heads, {**kwargs, "local_window": EVERY_KEY, "sinks": 0, "column_queries": None}) if is_exact else (heads, kwargs)
              for (heads, kwargs), is_exact in zip(groups, exact)]
    polynomials = [polynomial_of(name, kwargs) for (_, kwargs), is_exact in zip(groups, exact) if not is_exact]
    rep = q_heads // kv_heads
    columns_fit = all(kwargs.get("column_queries") is None or kwargs["column_queries"].shape[0] == len(heads) * (1 if per_query_head else rep)
                      for heads, kwargs in groups)  # else the op itself says what is wrong with them
    if not columns_fit or any(polynomial != polynomials[0] for polynomial in polynomials):
        return None
    return polynomials[0], units_of(groups, per_query_head, q_heads, kv_heads)


def polynomial_of(name: str, kwargs: dict) -> Polynomial:
    """The polynomial of an op call's settings (what one decoding state holds sums for)."""
    rest = dict(sketch_seed=kwargs["sketch_seed"], kernel=kwargs["kernel"], radius=kwargs["radius"])
    if name == "support_basis_multi":
        return Polynomial.buckets(kwargs["thresholds"], kwargs["degrees"], kwargs["sketch_dim"], **rest)
    threshold = kwargs["threshold"] if name == "support_basis" else float("inf")
    return Polynomial.single(threshold, kwargs["degree"], kwargs["sketch_dim"], **rest)


def units_of(groups, per_query_head: bool, q_heads: int, kv_heads: int) -> Units:
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


def op_kwargs(settings: SupportBasisConfig, name: str) -> dict[str, Any]:
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
                for key, value in op_kwargs(settings, name).items()}

    count = q_heads if unit == "query" else kv_heads
    kwargs = {**dict.fromkeys(range(count), on_device(layer)), **{g: on_device(s) for g, s in heads.items()}}
    return head_groups(kwargs, count, unit), unit == "query"


def module_groups(module: torch.nn.Module, name: str, device: torch.device, q_heads: int,
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
    return defaults, [value for key, value in layers.items() if parse_index(key, "layers") == layer_index]


def settings_for(module: torch.nn.Module) -> SupportBasisConfig:
    """The settings of an attention module: ``module.config.support_basis`` for its layer, or defaults."""
    config = getattr(module, "config", None)
    stored = getattr(config, "support_basis", None)
    return SupportBasisConfig.from_dict(stored).for_layer(getattr(module, "layer_idx", None))
