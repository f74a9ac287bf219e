"""Capture post-RoPE queries, keys and values of a Transformers model without changing its output.

How: for the duration of a :func:`capturing` block, a private attention implementation
(``"sb_hf_capture"``) is registered with transformers' ``AttentionInterface`` (and transformers'
``sdpa_mask`` under the same name in ``AttentionMaskInterface``) and the model is switched to it
with ``model.set_attn_implementation``. The implementation records ``query``/``key``/``value`` of
the selected layers, exactly as the attention function receives them (after the rotary embedding),
and then calls transformers' own ``sdpa_attention_forward``. Afterwards the previous
implementation is restored and the registration removed, also when the forward pass raises.

The captured activations are those of the model with **exact** attention: during the capture the
model computes exactly what it computes with ``attn_implementation="sdpa"`` (the same functions on
the same tensors), whatever implementation was active before.

Layout of a :class:`Capture` (and of its safetensors file, see :func:`save_capture`): for every
selected layer ``i`` the tensors ``layers.{i}.q``, ``layers.{i}.k``, ``layers.{i}.v`` of shape
``(batch, n_selected_query_heads, seq, head_dim)``. ``k`` and ``v`` hold, for each selected query
head ``h``, the key/value head it attends with (``h // num_key_value_groups``, i.e. GQA expanded),
so all three share the head axis. With ``pre_rope=True`` also ``layers.{i}.q_pre_rope`` and
``layers.{i}.k_pre_rope`` (outputs of ``q_proj``/``k_proj`` reshaped to heads, same layout). With
an attention mask, a top-level ``attention_mask`` tensor ``(batch, seq)`` bool. Metadata (all
strings): ``model``, ``tokens``, ``layers``, ``heads`` (comma lists), ``scale``,
``sliding_window`` (``"none"`` or an int), ``num_key_value_groups``, ``pre_rope`` (``"0"``/``"1"``),
optionally ``text``; plus ``batch``, ``head_dim``, ``num_attention_heads``,
``num_key_value_heads``, ``dtype`` and ``format``.

Memory: only the selected layers and heads are kept, on the CPU, in ``dtype`` (float32 by default).
One layer costs ``3 * batch * heads * seq * head_dim`` values (5 with ``pre_rope``): for
SmolLM2-135M (9 heads of 64) and 2048 tokens, 14 MiB per layer in float32, 425 MiB for all 30.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAPTURE_IMPLEMENTATION = "sb_hf_capture"
FORMAT = "sb_hf.capture/1"
TENSORS = ("q", "k", "v")
PRE_ROPE_TENSORS = ("q_pre_rope", "k_pre_rope")
ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class Capture:
    """Captured activations: ``layers[i][name]`` with ``name`` in ``q, k, v`` (and ``q_pre_rope``,
    ``k_pre_rope``), each ``(batch, heads, seq, head_dim)``; ``meta`` holds strings only; the
    optional ``attention_mask`` is ``(batch, seq)`` bool (True for real tokens)."""

    layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    attention_mask: torch.Tensor | None = None

    @property
    def heads(self) -> list[int]:
        """The captured query heads, in the order of the head axis."""
        return _parse_ints(self.meta.get("heads", ""))

    @property
    def layer_indices(self) -> list[int]:
        return sorted(self.layers)

    @property
    def num_key_value_groups(self) -> int:
        return int(self.meta.get("num_key_value_groups", "1"))

    @property
    def kv_heads(self) -> list[int]:
        """For each captured query head, the index of the key/value head stored next to it."""
        return [h // self.num_key_value_groups for h in self.heads]


# --------------------------------------------------------------------------------------------
# The registered attention function and its recorders


class _Recorder:
    """Records one forward pass of one model into ``capture``."""

    def __init__(self, capture: Capture, layers: list[int], heads: list[int], dtype: torch.dtype, modules: dict):
        self.capture = capture
        self.layers = set(layers)
        self.heads = heads
        self.dtype = dtype
        self.modules = {id(modules[i]): i for i in layers}
        self.groups = {i: int(getattr(modules[i], "num_key_value_groups", 1)) for i in layers}

    def _keep(self, x: torch.Tensor, index: list[int]) -> torch.Tensor:
        index_t = torch.tensor(index, device=x.device)
        return x.detach().index_select(1, index_t).to(device="cpu", dtype=self.dtype).contiguous()

    def _store(self, layer: int, name: str, value: torch.Tensor) -> None:
        slot = self.capture.layers.setdefault(layer, {})
        if name in slot:
            raise RuntimeError(
                f"layer {layer} ran twice inside one capture; a capture records a single forward pass "
                "(call capture_activations once per batch, and do not generate inside `capturing`)"
            )
        slot[name] = value

    def record(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        layer = self.modules[id(module)]
        if key.shape[2] != query.shape[2]:
            raise ValueError(
                f"layer {layer} got {query.shape[2]} queries but {key.shape[2]} keys: a capture needs one forward "
                "pass over the whole sequence without a filled cache (use_cache=False)"
            )
        kv = [h // self.groups[layer] for h in self.heads]
        self._store(layer, "q", self._keep(query, self.heads))
        self._store(layer, "k", self._keep(key, kv))
        self._store(layer, "v", self._keep(value, kv))

    def record_projection(self, layer: int, name: str, output: torch.Tensor, head_dim: int) -> None:
        heads = output.view(*output.shape[:-1], -1, head_dim).transpose(1, 2)  # (batch, heads, seq, head_dim)
        index = self.heads if name == "q_pre_rope" else [h // self.groups[layer] for h in self.heads]
        self._store(layer, name, self._keep(heads, index))


_recorders: list[_Recorder] = []
_registration_depth = 0
_saved_registrations: dict[str, Any] = {}


def capture_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
    """Record q/k/v for the active captures, then run transformers' SDPA attention unchanged."""
    for recorder in _recorders:
        if id(module) in recorder.modules:
            recorder.record(module, query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)


_INTERFACES = {"attention": (AttentionInterface, capture_attention_forward), "mask": (AttentionMaskInterface, sdpa_mask)}
_MISSING = object()


@contextlib.contextmanager
def _registered() -> Iterator[None]:
    """Register the capture implementation while at least one capture is active."""
    global _registration_depth
    if _registration_depth == 0:
        for kind, (interface, function) in _INTERFACES.items():
            _saved_registrations[kind] = interface._global_mapping.get(CAPTURE_IMPLEMENTATION, _MISSING)
            interface.register(CAPTURE_IMPLEMENTATION, function)
    _registration_depth += 1
    try:
        yield
    finally:
        _registration_depth -= 1
        if _registration_depth == 0:
            for kind, (interface, _) in _INTERFACES.items():
                saved = _saved_registrations.pop(kind, _MISSING)
                if saved is _MISSING:
                    interface._global_mapping.pop(CAPTURE_IMPLEMENTATION, None)
                else:
                    interface.register(CAPTURE_IMPLEMENTATION, saved)


# --------------------------------------------------------------------------------------------
# Public API


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """The attention modules of a decoder, by ``layer_idx`` (modules with ``layer_idx``, ``q_proj``, ``k_proj``)."""
    found = {}
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            found[int(module.layer_idx)] = module
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules with layer_idx, q_proj and k_proj")
    return found


def _parse_ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _selection(requested: Iterable[int] | int | None, available: int, what: str) -> list[int]:
    if requested is None:
        return list(range(available))
    if isinstance(requested, int):
        requested = [requested]
    chosen = [int(i) for i in requested]
    if not chosen:
        raise ValueError(f"{what} selection is empty")
    bad = [i for i in chosen if not 0 <= i < available]
    if bad:
        raise ValueError(f"{what} {bad} out of range: the model has {available} {what} (0..{available - 1})")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{what} selection {chosen} has duplicates")
    return sorted(chosen)


def _model_name(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "name_or_path", "") or getattr(model, "name_or_path", "") or type(model).__name__)


@contextlib.contextmanager
def capturing(
    model,
    *,
    layers: Iterable[int] | int | None = None,
    heads: Iterable[int] | int | None = None,
    pre_rope: bool = False,
    dtype: torch.dtype = torch.float32,
    text: str | None = None,
) -> Iterator[Capture]:
    """Within the block, record q/k/v of one forward pass of ``model`` into the yielded :class:`Capture`.

    ``layers`` and ``heads`` select layer indices and query-head indices (default all). The model
    runs exact SDPA attention inside the block; its previous ``attn_implementation`` is restored
    on exit, also on error. Run a single forward pass without a cache (``use_cache=False``);
    :func:`capture_activations` does this for you.
    """
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in ALLOWED_DTYPES]}, got {dtype}")
    modules = attention_modules(model)
    config = model.config
    n_layers = int(getattr(config, "num_hidden_layers", len(modules)))
    layer_list = _selection(layers, n_layers, "layers")
    missing = [i for i in layer_list if i not in modules]
    if missing:
        raise ValueError(f"no attention module with layer_idx {missing}")
    head_list = _selection(heads, int(config.num_attention_heads), "heads")
    first = modules[layer_list[0]]
    head_dim = int(first.head_dim)
    sliding_window = getattr(config, "sliding_window", None)
    meta = {
        "format": FORMAT,
        "model": _model_name(model),
        "tokens": "",
        "batch": "",
        "layers": ",".join(map(str, layer_list)),
        "heads": ",".join(map(str, head_list)),
        "scale": repr(float(first.scaling)),
        "sliding_window": "none" if sliding_window is None else str(int(sliding_window)),
        "num_key_value_groups": str(int(getattr(first, "num_key_value_groups", 1))),
        "num_attention_heads": str(int(config.num_attention_heads)),
        "num_key_value_heads": str(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)),
        "head_dim": str(head_dim),
        "pre_rope": "1" if pre_rope else "0",
        "dtype": str(dtype).removeprefix("torch."),
    }
    if text is not None:
        meta["text"] = str(text)
    capture = Capture(meta=meta)
    recorder = _Recorder(capture, layer_list, head_list, dtype, modules)

    hooks = []
    previous = config._attn_implementation
    with _registered():
        try:
            if pre_rope:
                for i in layer_list:
                    for proj, name in (("q_proj", "q_pre_rope"), ("k_proj", "k_pre_rope")):
                        hook = _projection_hook(recorder, i, name, head_dim)
                        hooks.append(getattr(modules[i], proj).register_forward_hook(hook))
            _recorders.append(recorder)
            model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
            if model.config._attn_implementation != CAPTURE_IMPLEMENTATION:
                raise RuntimeError(
                    f"{type(model).__name__} did not switch to the capture attention implementation "
                    "(it does not support set_attn_implementation)"
                )
            yield capture
        finally:
            if recorder in _recorders:
                _recorders.remove(recorder)
            for hook in hooks:
                hook.remove()
            if model.config._attn_implementation != previous:
                model.set_attn_implementation(previous)
    _finish_meta(capture)


def _projection_hook(recorder: _Recorder, layer: int, name: str, head_dim: int):
    def hook(module, inputs, output):
        recorder.record_projection(layer, name, output, head_dim)

    return hook


def _finish_meta(capture: Capture) -> None:
    for tensors in capture.layers.values():
        if "q" in tensors:
            capture.meta["batch"] = str(tensors["q"].shape[0])
            capture.meta["tokens"] = str(tensors["q"].shape[2])
            return


def capture_activations(
    model,
    input_ids: torch.Tensor,
    *,
    layers: Iterable[int] | int | None = None,
    heads: Iterable[int] | int | None = None,
    pre_rope: bool = False,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    text: str | None = None,
) -> Capture:
    """One forward pass of ``model`` on ``input_ids`` ``(batch, seq)``, returning post-RoPE q/k/v of
    the selected layers and query heads (see the module docstring for the layout).

    ``attention_mask`` (``(batch, seq)``, 1 for tokens, 0 for padding) is passed to the model and
    stored in the capture, so that the analysis can skip padded rows; with left padding pass
    ``position_ids`` that count real tokens, as ``generate`` does. ``text`` is stored as metadata.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (batch, seq) with seq > 0, got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": False}
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
        kwargs["attention_mask"] = attention_mask.to(device)
    if position_ids is not None:
        kwargs["position_ids"] = position_ids.to(device)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the full (seq, vocab) logits are not needed
    with capturing(model, layers=layers, heads=heads, pre_rope=pre_rope, dtype=dtype, text=text) as capture:
        with torch.no_grad():
            model(**kwargs)
    expected = set(_parse_ints(capture.meta["layers"]))
    names = TENSORS + (PRE_ROPE_TENSORS if pre_rope else ())
    incomplete = sorted(i for i in expected if not all(n in capture.layers.get(i, {}) for n in names))
    if incomplete:
        raise RuntimeError(
            f"layers {incomplete} were not captured: the model's attention does not go through "
            "transformers' AttentionInterface"
        )
    if attention_mask is not None:
        capture.attention_mask = attention_mask.detach().to("cpu").bool()
    return capture


def capture_text(
    model,
    tokenizer,
    text: str,
    *,
    tokens: int,
    layers: Iterable[int] | int | None = None,
    heads: Iterable[int] | int | None = None,
    pre_rope: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Capture:
    """Capture the first ``tokens`` tokens of ``text`` (batch 1); the decoded tokens are stored as ``meta["text"]``.

    Raises ValueError when the text has fewer than ``tokens`` tokens.
    """
    if int(tokens) < 1:
        raise ValueError(f"tokens must be at least 1, got {tokens}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < tokens:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than tokens={tokens}; lower tokens or give a longer text")
    ids = ids[: int(tokens)][None]
    return capture_activations(
        model, ids, layers=layers, heads=heads, pre_rope=pre_rope, dtype=dtype, text=tokenizer.decode(ids[0])
    )


def save_capture(capture: Capture, path: str | Path) -> Path:
    """Write ``capture`` as one safetensors file (tensors ``layers.{i}.{name}``, string metadata); returns the path."""
    from safetensors.torch import save_file

    bad = {k: type(v).__name__ for k, v in capture.meta.items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"capture metadata must be strings; not strings: {bad}")
    tensors = {f"layers.{i}.{name}": t.contiguous() for i, named in sorted(capture.layers.items()) for name, t in named.items()}
    if capture.attention_mask is not None:
        tensors["attention_mask"] = capture.attention_mask.contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=dict(capture.meta))
    return path


def load_capture(path: str | Path) -> Capture:
    """Read a file written by :func:`save_capture`."""
    from safetensors import safe_open

    capture = Capture()
    with safe_open(str(path), framework="pt") as handle:
        capture.meta = dict(handle.metadata() or {})
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            if key == "attention_mask":
                capture.attention_mask = tensor
                continue
            prefix, layer, name = key.split(".", 2)
            if prefix != "layers":
                raise ValueError(f"{path}: unexpected tensor {key!r} (not a capture file?)")
            capture.layers.setdefault(int(layer), {})[name] = tensor
    return capture
