"""The dense twin of block-support attention: it defines, pair by pair, what :mod:`.chunk` computes.

Key block ``b`` holds the key positions ``[b B, (b + 1) B)`` (``B = block_size``); query ``p`` is in query block
``P = p // B``. For every query row ``p``:

- **exact keys**: the first ``sinks`` real keys; every visible key of the *band*, the blocks
  ``P - band_blocks .. P`` (``band_blocks = ceil(local_window / B)``); every visible key of a block that is not a
  *candidate*; and every key of the *selected* candidates.
- **candidates**: the blocks ``b < P - band_blocks`` all of whose keys every row of block ``P`` sees (under a
  sliding window the blocks that straddle its edge are exact instead), with at least one real key that is not a sink.
  A candidate stands for its keys by its *centroid*: the mean of its real non-sink keys ``c_b``, their mean value
  ``u_b`` and their count ``n_b``, the pseudo-key of weight ``n_b exp(scale q . c_b)`` (the degree-0 taylor term of
  the block around its mean); with ``far="none"`` the unselected candidates are dropped instead.
- **selection** by a *selection query* ``q_sel``: ``q_p`` itself (``selection="row"``: a row's support depends on
  its own query and earlier keys only; ``"union"``: then the rows of block ``P`` present in the call share the union
  of their selections; ``"pooled"``: they share one selection by the sum of their masses, each row's as shares of
  its estimated total; ``"prefix"``: each row by the sum over the rows of its block up to itself, causal), or the last
  query of block ``P`` present in the call (``"last"``). With ``"union"``,
  ``"pooled"`` and ``"last"`` a row may depend on the other queries of its block, never on later blocks. Each
  candidate's mass is estimated (``estimate``: :data:`.settings.ESTIMATES`), the exact keys' mass is exact; the candidates are
  taken in order of estimated mass (ties: the lower block first) until the exact mass plus theirs reaches ``gamma``
  of the estimated total. Selected candidates are exact; the others keep their centroid.

The output of row ``p`` is one softmax over its exact keys and the centroids of its unselected candidates.
"""

from __future__ import annotations

import math

import torch

from ..checks import check_dropped, check_inputs
from ..masking import add_stats, sink_keys, visible
from ..naive import dense_inputs
from .settings import BlockSettings, select_blocks


def block_support_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    gamma: float = BlockSettings.gamma,
    block_size: int = BlockSettings.block_size,
    sinks: int = BlockSettings.sinks,
    local_window: int = BlockSettings.local_window,
    selection: str = BlockSettings.selection,
    estimate: str = BlockSettings.estimate,
    far: str = BlockSettings.far,
    sample_stride: int = BlockSettings.sample_stride,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    dropped_real_keys: torch.Tensor | None = None,
    stats: dict | None = None,
    return_weights: bool = False,
) -> torch.Tensor:
    """Block-support attention computed densely (the module docstring defines it). ``stats`` receives the counts
    ``exact_pairs``, ``pairs``, ``exact_rows``, ``rows``, ``centroid_pairs`` (row, pseudo-key pairs),
    ``selected_blocks`` and ``candidate_blocks`` (over rows); with ``return_weights``, the weight of every key
    ``(B, Hq, Lq, Lk)`` (a centroid's weight shared equally by the keys it stands for) instead of the output."""
    settings = BlockSettings(gamma, block_size, sinks, local_window, selection, estimate, far, sample_stride)
    shapes = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, sliding_window=sliding_window,
                          scale=scale)
    settings.check(causal)
    check_dropped(dropped_real_keys, shapes.batch)
    out_dtype = q.dtype
    q, k, v, scale, mask, key_valid = dense_inputs(q, k, v, shapes, scale, key_padding_mask, causal, sliding_window)
    q_len, kv_len, size = shapes.q_len, shapes.kv_len, settings.block_size
    offset, blocks, device = kv_len - q_len, -(-kv_len // size), q.device
    q_pos, k_pos = torch.arange(q_len, device=device) + offset, torch.arange(kv_len, device=device)
    q_block, k_block, block = q_pos // size, k_pos // size, torch.arange(blocks, device=device)

    # Each block's centroid: the mean key and value of its real keys that are not sinks, and their count.
    sink = sink_keys(key_valid, settings.sinks, dropped_real_keys)  # (B, Lk)
    member = ((key_valid & ~sink)[:, :, None] & (k_block[:, None] == block)).to(q.dtype)  # (B, Lk, nb)
    count = member.sum(dim=1)  # (B, nb)
    log_count = count.clamp_min(1).log()[:, None, None, :]
    centroid = torch.einsum("bhjd,bjn->bhnd", k, member) / count.clamp_min(1)[:, None, :, None]  # (B, H, nb, d)
    mean_value = torch.einsum("bhjd,bjn->bhnd", v, member) / count.clamp_min(1)[:, None, :, None]

    # Candidates of each row's block: behind the band, every key seen by every row of the block, a member.
    last_row = (q_block + 1) * size - 1  # (Lq,)
    candidate = block[None, :] < (q_block - settings.band_blocks)[:, None]  # (Lq, nb)
    if sliding_window is not None:
        candidate = candidate & (block[None, :] * size > last_row[:, None] - sliding_window)
    candidate = candidate[None, None] & (count > 0)[:, None, None, :]  # (B, 1, Lq, nb)
    structural = sink[:, None, None, :] | ~candidate[..., k_block]  # (B, 1, Lq, Lk): exact whatever is selected

    # The selection query of each row, its estimated masses, and the selected candidates.
    sel_pos = torch.clamp(last_row, max=kv_len - 1) if settings.selection == "last" else q_pos
    q_sel = q[:, :, sel_pos - offset]  # (B, H, Lq, d)
    sel_scores = scale * q_sel @ k.transpose(-1, -2)  # (B, H, Lq, Lk)
    sel_sees = visible(sel_pos, k_pos, causal=True, sliding_window=sliding_window) & key_valid[:, None, None, :]
    exact_log_mass = torch.where(sel_sees & structural, sel_scores, float("-inf")).logsumexp(dim=-1)
    block_log_mass = estimated_log_mass(settings.estimate, q_sel, sel_pos, k, sel_scores, member, log_count, centroid,
                                        scale, size, settings.sample_stride)
    block_log_mass = torch.where(candidate, block_log_mass, float("-inf"))
    same_block = (q_block[:, None] == q_block[None, :]).to(q.dtype)  # (Lq, Lq)
    if settings.selection in ("pooled", "prefix"):  # each row's shares of its estimated total, summed over its block's
        # rows (up to the row itself for "prefix")
        total = torch.logaddexp(exact_log_mass, block_log_mass.logsumexp(dim=-1))
        total = torch.where(total > float("-inf"), total, torch.zeros_like(total))[..., None]  # (a row without keys: 0)
        pool = same_block if settings.selection == "pooled" else torch.tril(same_block)
        pooled = lambda log_mass: (pool @ (log_mass - total).exp()).log()
        selected = select_blocks(pooled(exact_log_mass[..., None])[..., 0], pooled(block_log_mass), settings.gamma)
    else:
        selected = select_blocks(exact_log_mass, block_log_mass, settings.gamma)
    if settings.selection == "union":  # each row takes the blocks any row of its block selected
        selected = (same_block @ selected.to(q.dtype)) > 0

    # One softmax over the exact keys and the centroids of the candidates not selected.
    exact = mask & (structural | selected[..., k_block])  # (B, H, Lq, Lk)
    pseudo = candidate & ~selected if settings.far == "centroid" else torch.zeros_like(selected)
    scores = torch.where(exact, scale * q @ k.transpose(-1, -2), float("-inf"))
    pseudo_scores = torch.where(pseudo, scale * q @ centroid.transpose(-1, -2) + log_count, float("-inf"))
    top = torch.maximum(scores.amax(dim=-1), pseudo_scores.amax(dim=-1))
    top = torch.where(top > float("-inf"), top, torch.zeros_like(top))[..., None]
    key_weights, block_weights = torch.exp(scores - top), torch.exp(pseudo_scores - top)
    den = key_weights.sum(dim=-1) + block_weights.sum(dim=-1)
    den = torch.where(den > 0, den, torch.ones_like(den))[..., None]  # a row that sees no key: zeros
    if stats is not None:
        pairs = mask.expand_as(exact)
        add_stats(stats, exact_pairs=exact.sum(), pairs=pairs.sum(), exact_rows=(exact == pairs).all(dim=-1).sum(),
                  rows=torch.tensor(exact.shape[:3].numel(), device=device))
        for key, value in (("centroid_pairs", pseudo.expand_as(block_weights).sum()), ("selected_blocks", selected.sum()),
                           ("candidate_blocks", candidate.expand_as(selected).sum())):
            stats[key] = stats.get(key, 0) + value
    if return_weights:
        return (key_weights + (block_weights / count.clamp_min(1)[:, None, None, :]) @ member.transpose(1, 2)[:, None]) / den
    return ((key_weights @ v + block_weights @ mean_value) / den).to(out_dtype)


def estimated_log_mass(estimate, q_sel, sel_pos, k, sel_scores, member, log_count, centroid, scale,
                       size, stride) -> torch.Tensor:
    """Each block's estimated log mass for each selection query (at key positions ``sel_pos``), ``(B, H, Lq, nb)``
    (see ``ESTIMATES``); ``member (B, Lk, nb)`` weights 1 for the keys a block's centroid stands for (``log_count``
    of them), ``size`` keys per block, ``stride`` the sampled estimate's."""
    centroid_mass = lambda: scale * q_sel @ centroid.transpose(-1, -2) + log_count
    if estimate == "centroid":
        return centroid_mass()
    spans = [slice(n * size, (n + 1) * size) for n in range(member.shape[2])]
    belongs = [member[:, span, n] > 0 for n, span in enumerate(spans)]  # (B, keys of block n)
    if estimate == "sampled":  # every stride-th key, the residue set by the selection query's position
        picked = (sel_pos[:, None] + torch.arange(sel_scores.shape[3], device=k.device)) % stride == 0
        sampled = torch.stack([
            torch.where(own[:, None, None] & picked[:, span], sel_scores[..., span], float("-inf")).logsumexp(dim=-1)
            for span, own in zip(spans, belongs)], dim=-1) + math.log(stride)
        return torch.where(sampled > float("-inf"), sampled, centroid_mass())  # (no member sampled: the centroid)
    if estimate == "oracle":
        return torch.stack([torch.where(own[:, None, None], sel_scores[..., span], float("-inf")).logsumexp(dim=-1)
                            for span, own in zip(spans, belongs)], dim=-1)
    big = torch.finfo(k.dtype).max  # "bound": per channel, the members' extremes
    high = torch.stack([torch.where(own[:, None, :, None], k[:, :, span], -big).amax(dim=2) for span, own in zip(spans, belongs)], 2)
    low = torch.stack([torch.where(own[:, None, :, None], k[:, :, span], big).amin(dim=2) for span, own in zip(spans, belongs)], 2)
    q_ = q_sel[:, :, :, None, :]  # (B, H, Lq, 1, d) against (B, H, 1, nb, d)
    return scale * torch.maximum(q_ * high[:, :, None], q_ * low[:, :, None]).sum(dim=-1) + log_count
