"""The script-patching layer: switch the models a script loads to support-basis attention,
with one line (``sb_hf.apply_support_basis()``) or none (``sb-hf run -- script.py``).

``apply_support_basis()`` without a model wraps ``PreTrainedModel.from_pretrained`` and
``_from_config`` (what ``AutoModel*.from_pretrained``/``from_config``, ``Trainer`` users, TRL and
accelerate scripts all go through): every supported model they return is switched with
:func:`sb_hf.integrations.hf.apply_support_basis`. A model loaded with an explicit
``attn_implementation`` keeps it unless the patch is forced. ``revert_support_basis()`` undoes it.
See README.md in this folder.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedModel

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
    from ..integrations.hf import apply_support_basis

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
