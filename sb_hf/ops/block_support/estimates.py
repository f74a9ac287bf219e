"""Each row's estimated attention mass on every key block, as the fast op computes them (:data:`.settings.ESTIMATES`
defines them; the twin computes them densely), and what they cost."""

from __future__ import annotations

import math

import torch

FAST_ESTIMATES = ("bound", "centroid", "sampled", "oracle")  # "oracle" scores every key: for measuring only


def estimate_pairs(estimate: str, blocks: int, scored_keys: int, stride: int) -> float:
    """The estimate's work per row, in exact pairs (a pair: a score and a weighted value, 4 d flops; a score alone is
    half a pair): ``blocks`` key blocks, ``scored_keys`` the keys before the row's query block's candidates end,
    ``stride`` the sampled estimate's."""
    per_block = {"bound": 1.0, "centroid": 0.5, "sampled": 0.5}.get(estimate, 0.0)  # (sampled: the centroid fallback)
    per_key = {"sampled": 0.5 / stride, "oracle": 0.5}.get(estimate, 0.0)
    return per_block * blocks + per_key * scored_keys


def centroid_log_mass(rows, summary, scale) -> torch.Tensor:
    """The "centroid" estimate of every block for ``rows (B, Hk, nc, r, d)``: ``(B, Hk, nc, r, nb)`` (the far field's
    scores too)."""
    return scale * rows @ summary["centroid"][:, :, None].transpose(-1, -2) + summary["log_count"][:, :, None]


def estimated_log_mass(estimate, rows, first_pos, kp, member, summary, scale, scored_keys, stride, centroid=None,
                       leading_sinks=None) -> torch.Tensor:
    """Each row's estimated log mass of every block, ``(B, Hk, nc, G * size, nb)``, for ``rows (B, Hk, nc, G * size,
    d)`` at key positions ``first_pos + c * size + t``; the keys ``kp (B, Hk, nb, size, d)``, their ``member`` flags
    ``(B, nb, size)`` and block ``summary``; ``scored_keys``: the keys that hold every candidate of these rows;
    ``stride``: the sampled estimate's; ``centroid``: :func:`centroid_log_mass` when the caller has it;
    ``leading_sinks``: when the keys that are not members are the first ``leading_sinks`` keys and no other (no
    padding), their number (the sampled estimate then masks a few columns, not every score)."""
    b_, hk, nc, r, d = rows.shape
    if estimate == "bound":  # sum_c max(q_c high_c, q_c low_c) = q+ . high + q- . low
        flat = rows.reshape(b_, hk, nc * r, d)
        top = flat.clamp_min(0) @ summary["high"].transpose(-1, -2) + flat.clamp_max(0) @ summary["low"].transpose(-1, -2)
        return (scale * top + summary["log_count"]).view(b_, hk, nc, r, -1)
    centroid = centroid_log_mass(rows, summary, scale) if centroid is None and estimate != "oracle" else centroid
    if estimate == "centroid":
        return centroid
    nb, size = kp.shape[2], kp.shape[3]
    if estimate == "oracle":  # every key scored, its block's members summed
        scores = scale * rows.reshape(b_, hk, nc * r, d) @ kp.flatten(2, 3).transpose(-1, -2)  # (B, Hk, nc * r, nb * size)
        scores = torch.where(member.view(b_, 1, 1, nb * size), scores, float("-inf"))
        return scores.view(b_, hk, nc, r, nb, size).logsumexp(dim=-1)
    return sampled_log_mass(rows, first_pos, kp, member, scale, scored_keys, stride, centroid, leading_sinks)


def sampled_log_mass(rows, first_pos, kp, member, scale, scored_keys, stride, fallback, leading_sinks) -> torch.Tensor:
    """The "sampled" estimate: row ``p`` scores the keys ``j`` with ``(p + j) % stride == 0`` (so the rows of one
    residue, every stride-th row, share their keys: one matmul per residue, 1/stride of the scores), sums their
    weights per block and scales by ``stride``; a block with no sampled member takes ``fallback`` (the centroid's).
    ``leading_sinks``: as :func:`estimated_log_mass`."""
    b_, hk, nc, r, d = rows.shape
    nb, size = kp.shape[2], kp.shape[3]
    g = r // size
    heads = (scale * rows).view(b_, hk, nc, g, size, d).transpose(2, 3).reshape(b_, hk, g, nc * size, d)
    keys, valid = kp.flatten(2, 3)[:, :, :scored_keys], member.view(b_, -1)[:, :scored_keys]
    out = fallback.new_empty(b_, hk, g, nc * size, nb)  # (a copy: the caller's fallback stays as it is)
    out.view(b_, hk, g, nc, size, nb).copy_(fallback.view(b_, hk, nc, g, size, nb).transpose(2, 3))
    for residue in range(stride):
        first_row, start = (residue - first_pos) % stride, (-residue) % stride  # these rows, the keys they sample
        if first_row >= nc * size or start >= scored_keys:
            continue
        q_r = heads[:, :, :, first_row::stride]  # (B, Hk, G, R, d)
        scores = q_r.reshape(b_, hk, -1, d) @ keys[:, :, start::stride].transpose(-1, -2)  # (B, Hk, G * R, Ks)
        sampled = valid[:, None, None, start::stride]  # (B, 1, 1, Ks)
        if leading_sinks is None:
            scores.masked_fill_(~sampled, float("-inf"))
        else:  # the sampled sinks are the first columns
            scores[..., : max(0, -(-(leading_sinks - start) // stride))] = float("-inf")
        top = scores.amax(dim=-1, keepdim=True)
        top.masked_fill_(top == float("-inf"), 0.0)
        weights = scores.sub_(top).exp_()
        if size % stride == 0:  # each block's sampled keys side by side: a reshape and a sum (not a scatter)
            per = size // stride
            sums = weights.view(*weights.shape[:-1], -1, per).sum(dim=-1)
            counts = sampled[:, 0, 0].view(b_, -1, per).sum(dim=-1)
            blocks = sums.shape[-1]
        else:  # the block of each sampled key
            index = torch.arange(start, scored_keys, stride, device=rows.device) // size
            blocks = nb
            sums = torch.zeros(*scores.shape[:-1], nb, dtype=scores.dtype, device=scores.device).index_add_(-1, index, weights)
            counts = torch.zeros(b_, nb, dtype=torch.long, device=scores.device).index_add_(
                -1, index, sampled[:, 0, 0].long())
        estimate = sums.log_().add_(top + math.log(stride)).view(b_, hk, g, -1, blocks)
        target = out[:, :, :, first_row::stride, :blocks]
        target.copy_(torch.where(counts[:, None, None, None, :] > 0, estimate, target))
    return out.view(b_, hk, g, nc, size, nb).transpose(2, 3).reshape(b_, hk, nc, r, nb)
