"""Transformers glue: the attention function of each sb-hf implementation, its registration with transformers'
attention and mask interfaces, and switching one model to them (``sb_hf.apply_support_basis``, in
:mod:`sb_hf.patches`, builds on it).

The attention function validates what transformers hands it, cuts the compact padding mask (:mod:`.masks`) to the
keys, and runs the layer's op calls (:mod:`.plan`): one call per decoding step for the whole layer when a decoding
state serves it (kept on the transformers cache, :mod:`.cache`), else one op call per group of heads.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Iterator

import torch
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..config import SupportBasisConfig, load_settings
from ..ops import decoding_attention
from ..ops.heads import grouped_attention
from .cache import decoding_states
from .masks import support_basis_mask
from .plan import DECODING_CACHE, IMPLEMENTATIONS, OP_SETTINGS, module_groups, module_plan

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
        groups, per_query_head = module_groups(module, name, query.device, query.shape[1], key.shape[1])
        stats = _active_stats[-1] if _active_stats else None
        if name in DECODING_CACHE:
            units = module_plan(module, name, groups, per_query_head, query.shape[1], key.shape[1])
            states = decoding_states(module, name, 1 if units is not None else len(groups))
            if units is not None and states is not None:  # one call for every head of the layer
                out = decoding_attention(query, key, value, states[0], polynomial=units[0], units=units[1], scale=scaling,
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


OLDEST_TRANSFORMERS = (5, 4)  # the first release whose mask functions take (batch_size, q_length, kv_length, ...)


def check_transformers_version(version: str) -> None:
    """Raise ``ImportError`` for a transformers release older than :data:`OLDEST_TRANSFORMERS`."""
    installed = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if installed < OLDEST_TRANSFORMERS:
        oldest = ".".join(map(str, OLDEST_TRANSFORMERS))
        raise ImportError(f"sb-hf needs transformers >= {oldest} (its attention mask interface), found {version}; "
                          f"pip install -U 'transformers>={oldest}' (the range sb-hf is tested with: its pyproject.toml)")


def register() -> None:
    """Register ``support_basis``, ``support_basis_multi``, ``as23``, ``sink_window`` and ``block_support`` with transformers'
    attention and mask interfaces (an ``ImportError`` on a transformers release older than the package supports)."""
    check_transformers_version(transformers.__version__)
    for name in IMPLEMENTATIONS:
        AttentionInterface.register(name, _make_attention_forward(name))
        AttentionMaskInterface.register(name, support_basis_mask)


def validated_settings(config: SupportBasisConfig | dict | str | os.PathLike | None, method: str,
                       overrides: dict[str, Any]) -> dict[str, Any]:
    """The settings ``config`` (a :class:`SupportBasisConfig`, a dict, a JSON file or None) with ``overrides``,
    validated for ``method``, as the plain dict a model's config stores."""
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
    return checked.to_dict()


def switch_model(model: torch.nn.Module, settings: dict[str, Any], method: str) -> torch.nn.Module:
    """Give ``model`` the attention implementation ``method`` with ``settings`` (:func:`validated_settings`), stored
    in ``model.config.support_basis``; :func:`restore_model` undoes it."""
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"{type(model).__name__} is not a transformers PreTrainedModel; pass the model that from_pretrained returned")
    previous = getattr(model.config, "_attn_implementation", None)
    if previous not in IMPLEMENTATIONS:  # what restore_model goes back to
        model._sb_hf_previous_attn_implementation = previous
    model.config.support_basis = settings
    model.set_attn_implementation(method)
    return model


def restore_model(model: torch.nn.Module) -> torch.nn.Module:
    """Give ``model`` back the attention implementation it had before :func:`switch_model` (``sdpa`` if it was
    loaded with an sb-hf one) and drop its settings."""
    previous = getattr(model, "_sb_hf_previous_attn_implementation", None) or "sdpa"
    model.set_attn_implementation(previous)
    if hasattr(model.config, "support_basis"):
        del model.config.support_basis
    if hasattr(model, "_sb_hf_previous_attn_implementation"):
        del model._sb_hf_previous_attn_implementation
    return model
