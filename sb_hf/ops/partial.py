"""Partial attentions: exact attention over a part of the keys, kept so that parts can be summed later.

A :class:`Partial` holds, per query row, ``num = sum_j w_j v_j`` and ``den = sum_j w_j`` with
``w_j = exp(s_j - shift)`` over the row's keys of that part (``shift = -inf``: the row has none). Parts over
disjoint keys :func:`merge` exactly, log-sum-exp style, whatever their shifts; :func:`normalized` is the
attention output. Query rows are ``(B, Hk, G, Lq)``: a KV head's ``G`` query heads side by side (GQA).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Partial(NamedTuple):
    num: torch.Tensor  # (B, Hk, G, Lq, dv)
    den: torch.Tensor  # (B, Hk, G, Lq)
    shift: torch.Tensor  # (B, Hk, G, Lq), -inf for a row without keys


def merge(a: Partial, b: Partial) -> Partial:
    """The sum of two partial attentions over disjoint keys, relative to the larger shift."""
    top = torch.maximum(a.shift, b.shift)
    finite = top.clamp_min(torch.finfo(top.dtype).min)  # -inf - finite stays -inf: an empty part weighs 0
    scale_a, scale_b = torch.exp(a.shift - finite), torch.exp(b.shift - finite)
    return Partial(a.num * scale_a[..., None] + b.num * scale_b[..., None], a.den * scale_a + b.den * scale_b, top)


def concat(parts: list[Partial]) -> Partial:
    """Partial attentions of consecutive blocks of query rows, joined along the rows."""
    num, den, shift = zip(*parts)
    return Partial(torch.cat(num, dim=3), torch.cat(den, dim=3), torch.cat(shift, dim=3))


def normalized(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """The attention output ``num / den``; a row of mass 0 (no key) gives zeros."""
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]


def group_matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x (B, Hk, G, c, m) @ y (B, Hk, m, n) -> (B, Hk, G, c, n)``: the rows of a KV head's G query heads stacked
    into one matmul (broadcasting ``y`` over G instead copies it G times: 20x slower for a decoding step)."""
    b, h, g, c, m = x.shape
    return (x.reshape(b, h, g * c, m) @ y).view(b, h, g, c, y.shape[-1])


def masked_exp(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(score - row max)`` over the last dim where ``mask``, 0 elsewhere, and the row max the weights
    are relative to (``-inf`` for a row with no visible entry, whose weights are all 0)."""
    scores = torch.where(mask, scores, torch.full_like(scores, float("-inf")))
    row_max = scores.amax(dim=-1)
    safe = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    return torch.exp(scores - safe[..., None]), row_max


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``mask``; a row with no visible entry gives zeros."""
    weights, _ = masked_exp(scores, mask)
    den = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(den > 0, den, torch.ones_like(den))


def exact_part(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> Partial:
    """Exact attention of ``qg (B, Hk, G, c, d)`` to the keys ``k``, ``v`` ``(B, Hk, n, d)`` that ``mask`` shows
    (plain matmuls, any device)."""
    weights, row_max = masked_exp(scale * group_matmul(qg, k.transpose(-1, -2)), mask)  # (B, Hk, G, c, n)
    return Partial(group_matmul(weights, v), weights.sum(dim=-1), row_max)
