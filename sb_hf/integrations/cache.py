"""The transformers KV cache, as the sb-hf backends see it: the decoding states kept on its layers, and the
names transformers gives the cache in calls and outputs.

transformers passes the cache to a model's and an attention module's ``forward`` as ``cache`` from the
releases that renamed it, as ``past_key_values`` before (the old name is deprecated); outputs carry it under
the same name. :func:`cache_argument` and :func:`returned_cache` let code (our benchmarks, tests, a user's
decoding loop) use whichever the installed release takes, without its deprecation warnings.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from ..ops import DecodingState

CACHE_NAMES = ("cache", "past_key_values")  # the current name first, then the deprecated one
STATES_ATTRIBUTE = "_sb_hf_decoding_states"  # where a cache layer keeps its decoding states


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword under which ``model.forward`` takes the KV cache: ``"cache"``, or ``"past_key_values"`` on
    the transformers releases before the rename. E.g. ``model(input_ids=t, **{cache_argument(model): cache})``."""
    parameters = inspect.signature(model.forward).parameters
    for name in CACHE_NAMES:
        if name in parameters:
            return name
    raise ValueError(f"{type(model).__name__}.forward takes no KV cache argument (neither of {CACHE_NAMES})")


def returned_cache(output) -> Any:
    """The KV cache a model output (``model(...)`` or ``generate(..., return_dict_in_generate=True)``) carries,
    under either name, or None."""
    for name in CACHE_NAMES:
        if name in output.keys():
            return output[name]
    return None


def call_cache(kwargs: dict) -> Any:
    """The KV cache among the keyword arguments of a module call, under either name, or None."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def layer_states(cache) -> list[dict]:
    """The decoding states each layer of ``cache`` holds: ``{(implementation, group): DecodingState}`` per layer
    (empty where none was kept)."""
    return [layer.__dict__.get(STATES_ATTRIBUTE, {}) for layer in getattr(cache, "layers", [])]


def decoding_states(module: torch.nn.Module, name: str, groups: int) -> list[DecodingState] | None:
    """The decoding states of ``module``'s op calls (one per group of heads), kept on the layer of the
    transformers cache the model was called with, or None when there is none to keep them on.

    The states live on a ``DynamicLayer`` or ``DynamicSlidingWindowLayer`` (what ``generate()`` and the models
    create by default): ``update`` only appends keys (the sliding one also drops the oldest, which the op sees
    and then runs in full: a state serves only while no sliding window is in effect), and their other methods
    that change the keys (``crop``, ``reorder_cache`` for beam search, ``reset``, the batch selections) are
    wrapped on that layer object to drop the states first. Static and quantized layers get none: those calls
    run the op in full.
    The cache reaches us through a forward pre-hook on the attention module (the attention function itself is
    not given it), installed on the first call, which keeps a weak reference to it.
    """
    if module not in _module_caches:
        _module_caches[module] = None
        module.register_forward_pre_hook(_remember_cache, with_kwargs=True)
        return None  # the pre-hook sees this module's calls from the next one on
    reference = _module_caches[module]
    cache = reference() if reference is not None else None
    layer_idx = getattr(module, "layer_idx", None)
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx is None or layer_idx >= len(layers) or type(layers[layer_idx]) not in _APPEND_ONLY_LAYERS:
        return None
    layer = layers[layer_idx]
    states = layer.__dict__.get(STATES_ATTRIBUTE)
    if states is None:
        states = layer.__dict__[STATES_ATTRIBUTE] = {}
        for method in _KEY_CHANGING_METHODS:
            if hasattr(layer, method):
                setattr(layer, method, _dropping_states(layer, getattr(layer, method)))
    return [states.setdefault((name, group), DecodingState()) for group in range(groups)]


_APPEND_ONLY_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer)
_KEY_CHANGING_METHODS = ("crop", "reset", "reorder_cache", "batch_repeat_interleave", "batch_select_indices",
                         "lazy_initialization")


def _dropping_states(layer, method):
    def wrapped(*args, **kwargs):
        layer.__dict__[STATES_ATTRIBUTE].clear()
        return method(*args, **kwargs)

    return wrapped


# attention module -> weak reference to the cache of its current call; weak both ways (no module or cache kept
# alive) and off the module (a pickled model holds no weak reference)
_module_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _remember_cache(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = call_cache(kwargs)
    _module_caches[module] = weakref.ref(cache) if cache is not None else None
