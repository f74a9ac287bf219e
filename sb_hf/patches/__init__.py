"""The script-patching layer: switch the models a script loads to support-basis attention,
with one line (``sb_hf.apply_support_basis()``) or none (``sb-hf run -- script.py``).

:func:`apply_support_basis` switches one model (:func:`sb_hf.integrations.hf.switch_model`), or, without a model,
wraps ``PreTrainedModel.from_pretrained`` and ``_from_config`` (what ``AutoModel*.from_pretrained``/``from_config``,
``Trainer`` users, TRL and accelerate scripts all go through): every supported model they return is switched. A
model loaded with an explicit ``attn_implementation`` keeps it unless the patch is forced.
:func:`revert_support_basis` undoes either.
See README.md in this folder.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from ..config import SupportBasisConfig
from ..integrations.hf import restore_model, switch_model, validated_settings

logger = logging.getLogger(__name__)

# Model types whose attention goes through transformers' AttentionInterface and that the tests
# cover (Llama and TinyLlama-style GQA, Mistral with its sliding window). Others are left as loaded.
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_PATCHED_METHODS = ("from_pretrained", "_from_config")


@dataclass
class _Patch:
    method: str
    settings: dict[str, Any] | None  # None: keep settings a saved model carries, else defaults
    force: bool
    originals: dict[str, classmethod]


_active: _Patch | None = None
_depth = threading.local()  # from_pretrained may call _from_config: only the outermost call switches


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
    the attention sinks + local window baseline (settings ``sinks``, ``local_window``), ``method="block_support"``
    the support chosen per input (settings ``sinks``, ``local_window``, ``block``).

    Without a model: ``from_pretrained``/``from_config`` switch the Llama and Mistral models they
    return; a load with an explicit ``attn_implementation`` keeps it unless ``force=True``; with no
    settings given, a model keeps the settings it was saved with. Undo with :func:`revert_support_basis`.
    Returns the model (None without one).
    """
    settings = validated_settings(config, method, overrides)
    if model is None:
        patch_loading(method, settings if (config is not None or overrides) else None, force)
        return None
    return switch_model(model, settings, method)


def revert_support_basis(model: torch.nn.Module | None = None):
    """Undo :func:`apply_support_basis`: give ``model`` back the attention implementation it had
    (``sdpa`` if it was loaded with an sb-hf one) and drop its settings; without a model, stop
    switching the models loaded from now on (models already switched stay switched). Returns the
    model, or without one whether a patch was in effect."""
    if model is None:
        return unpatch_loading()
    return restore_model(model)


def is_patched() -> bool:
    """Whether models loaded from now on are switched (``apply_support_basis()`` is in effect)."""
    return _active is not None


def patch_loading(method: str, settings: dict[str, Any] | None, force: bool) -> None:
    """Make every supported model loaded from now on use ``method`` with ``settings`` (validated
    by the caller). Calling it again replaces the settings; it never wraps twice."""
    global _active
    originals = _active.originals if _active is not None else {
        name: PreTrainedModel.__dict__[name] for name in _PATCHED_METHODS
    }
    _active = _Patch(method, settings, force, originals)
    for name, original in originals.items():
        setattr(PreTrainedModel, name, classmethod(_switching(original.__func__)))


def unpatch_loading() -> bool:
    """Restore ``from_pretrained``/``_from_config``. Returns whether a patch was in effect."""
    global _active
    if _active is None:
        return False
    for name, original in _active.originals.items():
        setattr(PreTrainedModel, name, original)
    _active = None
    return True


def _switching(load):
    @functools.wraps(load)
    def wrapper(cls, *args, **kwargs):
        explicit = _requested_implementation(args, kwargs)
        _depth.value = getattr(_depth, "value", 0) + 1
        try:
            model = load(cls, *args, **kwargs)
        finally:
            _depth.value -= 1
        patch = _active
        if patch is not None and _depth.value == 0 and isinstance(model, PreTrainedModel):
            _switch(model, patch, explicit)
        return model

    return wrapper


def _requested_implementation(args, kwargs) -> str | None:
    """The attention implementation the caller asked for: the keyword, or one set on the config it
    passes (``AutoModel*.from_pretrained(..., attn_implementation=...)`` moves it there)."""
    if kwargs.get("attn_implementation") is not None:
        return kwargs["attn_implementation"]
    config = kwargs.get("config", args[0] if args and not isinstance(args[0], (str, bytes)) else None)
    return getattr(config, "_attn_implementation_internal", None)


def _switch(model: PreTrainedModel, patch: _Patch, explicit: str | None) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        logger.warning("sb_hf: %s (model_type %r) left with its own attention; supported: %s",
                       type(model).__name__, model_type, ", ".join(SUPPORTED_MODEL_TYPES))
        return
    if explicit is not None and not patch.force:
        logger.warning("sb_hf: %s keeps attn_implementation=%r that the script asked for "
                       "(force=True / sb-hf run --force switches it anyway)", type(model).__name__, explicit)
        return
    settings = patch.settings if patch.settings is not None else getattr(model.config, "support_basis", None)
    apply_support_basis(model, settings, method=patch.method)
    logger.info("sb_hf: %s switched to %s", type(model).__name__, patch.method)
