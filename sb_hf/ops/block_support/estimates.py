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


def estimated_log_mass(estimate, rows, first_pos, kp, member, summary, scale, scored_keys, stride) -> torch.Tensor:
    """Each row's estimated log mass of every block, ``(B, Hk, nc, G * size, nb)``, for ``rows (B, Hk, nc, G * size,
    d)`` at key positions ``first_pos + c * size + t``; the keys ``kp (B, Hk, nb, size, d)``, their ``member`` flags
    ``(B, nb, size)`` and block ``summary``; ``scored_keys``: the keys that hold every candidate of these rows;
    ``stride``: the sampled estimate's."""
    b_, hk, nc, r, d = rows.shape
    flat = rows.reshape(b_, hk, nc * r, d)
    centroid = lambda: (scale * flat @ summary["centroid"].transpose(-1, -2) + summary["log_count"]).view(b_, hk, nc, r, -1)
    if estimate == "bound":  # sum_c max(q_c high_c, q_c low_c) = q+ . high + q- . low
        top = flat.clamp_min(0) @ summary["high"].transpose(-1, -2) + flat.clamp_max(0) @ summary["low"].transpose(-1, -2)
        return (scale * top + summary["log_count"]).view(b_, hk, nc, r, -1)
    if estimate == "centroid":
        return centroid()
    nb, size = kp.shape[2], kp.shape[3]
    if estimate == "oracle":  # every key scored, its block's members summed
        scores = scale * flat @ kp.flatten(2, 3).transpose(-1, -2)  # (B, Hk, nc * r, nb * size)
        scores = torch.where(member.view(b_, 1, 1, nb * size), scores, float("-inf"))
        return scores.view(b_, hk, nc, r, nb, size).logsumexp(dim=-1)
    return sampled_log_mass(rows, first_pos, kp, member, scale, scored_keys, stride, centroid())


def sampled_log_mass(rows, first_pos, kp, member, scale, scored_keys, stride, fallback) -> torch.Tensor:
    """The "sampled" estimate: row ``p`` scores the keys ``j`` with ``(p + j) % stride == 0`` (so the rows of one
    residue share their keys: one matmul per residue, 1/stride of the scores), sums their weights per block and
    scales by ``stride``; a block with no sampled member takes ``fallback`` (the centroid's)."""
    b_, hk, nc, r, d = rows.shape
    nb, size = kp.shape[2], kp.shape[3]
    g = r // size
    heads = rows.view(b_, hk, nc, g, size, d).transpose(2, 3).reshape(b_, hk, g, nc * size, d)
    keys, valid = kp.flatten(2, 3)[:, :, :scored_keys], member.view(b_, -1)[:, :scored_keys]
    fallback = fallback.view(b_, hk, nc, g, size, nb).transpose(2, 3).reshape(b_, hk, g, nc * size, nb)
    out = fallback.clone()
    for residue in range(stride):
        index = torch.arange((residue - first_pos) % stride, nc * size, stride, device=rows.device)
        start = (-residue) % stride  # the keys these rows sample
        if not len(index) or start >= scored_keys:
            continue
        q_r = heads[:, :, :, index]  # (B, Hk, G, R, d)
        scores = scale * (q_r.reshape(b_, hk, -1, d) @ keys[:, :, start::stride].transpose(-1, -2))
        sampled = valid[:, None, None, start::stride]  # (B, 1, 1, Ks)
        scores = torch.where(sampled, scores, float("-inf"))
        top = scores.amax(dim=-1, keepdim=True)
        top = torch.where(top > float("-inf"), top, torch.zeros_like(top))
        weights = torch.exp(scores - top)
        if size % stride == 0:  # each block's sampled keys side by side: a reshape and a sum (not a scatter)
            per = size // stride
            sums = weights.view(*weights.shape[:-1], -1, per).sum(dim=-1)
            counts = sampled[:, 0, 0].view(b_, -1, per).sum(dim=-1).to(scores.dtype)
            sums = torch.nn.functional.pad(sums, (0, nb - sums.shape[-1]))
            counts = torch.nn.functional.pad(counts, (0, nb - counts.shape[-1]))
        else:  # the block of each sampled key
            blocks = torch.arange(start, scored_keys, stride, device=rows.device) // size
            sums = torch.zeros(*scores.shape[:-1], nb, dtype=scores.dtype, device=scores.device).index_add_(-1, blocks, weights)
            counts = torch.zeros(b_, nb, dtype=scores.dtype, device=scores.device).index_add_(
                -1, blocks, sampled[:, 0, 0].to(scores.dtype))
        estimate = (sums.log() + top + math.log(stride)).view(b_, hk, g, len(index), nb)
        out[:, :, :, index] = torch.where(counts[:, None, None, None, :] > 0, estimate, fallback[:, :, :, index])
    return out.view(b_, hk, g, nc, size, nb).transpose(2, 3).reshape(b_, hk, nc, r, nb)
