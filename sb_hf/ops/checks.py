"""Input checks shared by every op and its naive twin: the tensors, the mask, the scale, the compute dtype.

Conventions (the same as ``torch.nn.functional.scaled_dot_product_attention`` plus GQA):
``q`` is ``(batch, q_heads, q_len, head_dim)``, ``k``/``v`` are ``(batch, kv_heads, kv_len, head_dim)``,
``q_heads`` a multiple of ``kv_heads``. The queries are the *last* ``q_len`` positions of the key
sequence (bottom-right alignment, as with a KV cache): query ``i`` sits at key position
``kv_len - q_len + i``. ``key_padding_mask`` is ``(batch, kv_len)``, True for real tokens.
Windows are named as :mod:`sb_hf.ops.masking` writes down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shapes:
    batch: int
    q_heads: int
    kv_heads: int
    groups: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None,
    sliding_window: int | None,
    scale: float | None,
    check_finite: bool = True,
) -> Shapes:
    """Validate the tensors, the mask and the scale of an attention op (each op checks its own settings); raise
    ``ValueError`` saying what to change."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, head_dim), got {getattr(x, 'shape', type(x))}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one (as SDPA, "
                         "the op takes no mixed dtypes; the transformers backend casts them under torch.autocast)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    batch, q_heads, q_len, head_dim = q.shape
    _, kv_heads, kv_len, _ = k.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k head_dim differ: {head_dim} vs {k.shape[-1]}")
    if v.shape[1] != kv_heads or v.shape[2] != kv_len:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q heads ({q_heads}) must be a positive multiple of k/v heads ({kv_heads})")
    if q_len == 0 or kv_len == 0 or batch == 0 or head_dim == 0:
        raise ValueError(f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}; every dimension must be >= 1")
    if causal and q_len > kv_len:
        raise ValueError(
            f"causal attention needs q_len <= kv_len (queries are the last q_len key positions), got {q_len} > {kv_len}"
        )
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, kv_len):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (batch, kv_len) = {(batch, kv_len)}, "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, q on {q.device}")
    if sliding_window is not None:
        if not causal:
            raise ValueError("sliding_window is only supported with causal=True")
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window!r}")
    if scale is not None and not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale must be a positive finite number or None, got {scale}")
    if check_finite:
        check_finite_inputs(q, k, v)
    return Shapes(batch, q_heads, kv_heads, q_heads // kv_heads, q_len, kv_len, head_dim, v.shape[-1])


def all_finite(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Whether every entry of ``x`` (or of each row along ``dim``) is finite: NaN and +-inf reach the min or
    the max, so one ``aminmax`` pass answers (measured 18x faster than ``isfinite(x).all()`` on CPU)."""
    if x.numel() == 0:
        return torch.ones(() if dim is None else x.shape[:dim] + x.shape[dim:][1:], dtype=torch.bool, device=x.device)
    low, high = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim)
    return (low > float("-inf")) & (high < float("inf"))


def check_finite_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ``ValueError`` on NaN or inf in ``q``, ``k`` or ``v`` (one host sync each)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not all_finite(x):
            raise ValueError(f"{name} contains NaN or inf; attention of non-finite inputs is undefined")


def check_sink_window(
    sinks: int, local_window: int, causal: bool, dropped_real_keys: torch.Tensor | None, batch: int
) -> None:
    """Validate the settings of sink + local window attention; raise ``ValueError`` naming the field."""
    if not causal:
        raise ValueError("sink_window attention is causal only (sinks and a local window of past keys); pass causal=True")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks must be an integer >= 0 (the first real keys every query attends to), got {sinks!r}")
    if isinstance(local_window, bool) or not isinstance(local_window, int) or local_window < 1:
        raise ValueError(
            f"local_window must be an integer >= 1 (query p attends to keys p - local_window < j <= p), got {local_window!r}"
        )
    check_dropped(dropped_real_keys, batch)


def check_dropped(dropped_real_keys: torch.Tensor | None, batch: int) -> None:
    """``dropped_real_keys``: None or ``(batch,)`` integers >= 0 (real keys a sliding-window cache dropped)."""
    if dropped_real_keys is None:
        return
    integer = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    if not isinstance(dropped_real_keys, torch.Tensor) or dropped_real_keys.dtype not in integer or (
        tuple(dropped_real_keys.shape) != (batch,)
    ):
        raise ValueError(
            f"dropped_real_keys must be an integer tensor of shape (batch,) = ({batch},), got "
            f"{getattr(dropped_real_keys, 'dtype', type(dropped_real_keys))} {tuple(getattr(dropped_real_keys, 'shape', ()))}"
        )
    if bool((dropped_real_keys < 0).any()):
        raise ValueError("dropped_real_keys must be >= 0")


def check_chunk_size(chunk_size, name: str = "chunk_size", default: str = "the measured defaults") -> None:
    """``chunk_size`` (the setting called ``name``): a positive integer, or None for the ``default``."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{name} must be a positive integer or None ({default}), got {chunk_size!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Attention is computed in fp32 (fp64 for fp64 inputs), whatever the input precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32
