"""Block-support attention (issue 24, first step): the dense twin against a loop over rows and blocks written from
the definition, the selection rule against a loop, its two ends (gamma 0 and 1), the two causality properties, the
weights, and bad settings. The fast path and the decoding step will be compared to this twin."""

from __future__ import annotations

import math

import pytest
import torch

from sb_hf.ops import reference
from sb_hf.ops.block_support import ESTIMATES, FAR_FIELDS, SELECTIONS, select_blocks
from sb_hf.ops.reference import block_support_attention

F64 = torch.float64
SETTINGS = dict(gamma=0.7, block_size=7, sinks=3, local_window=10)


def qkv(batch=2, q_heads=4, kv_heads=2, q_len=37, kv_len=90, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(batch, q_heads, q_len, d, generator=g, dtype=F64),
            2 * torch.randn(batch, kv_heads, kv_len, d, generator=g, dtype=F64),
            torch.randn(batch, kv_heads, kv_len, d, generator=g, dtype=F64))


def left_padded(batch, kv_len, pad=23):
    mask = torch.ones(batch, kv_len, dtype=torch.bool)
    mask[-1, :pad] = False
    return mask


def by_loops(q, k, v, *, gamma, block_size, sinks, local_window, selection, estimate, far, key_padding_mask=None,
             sliding_window=None, sample_stride=8):
    """The definition, one row and one block at a time in Python floats."""
    batch, heads, q_len, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    scale, offset = d**-0.5, kv_len - q_len
    valid = torch.ones(batch, kv_len, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    blocks, band = -(-kv_len // block_size), -(-local_window // block_size)
    out = torch.zeros(batch, heads, q_len, v.shape[-1], dtype=F64)
    for b in range(batch):
        real = [j for j in range(kv_len) if valid[b, j]]
        sink = set(real[:sinks])
        members = {n: [j for j in range(n * block_size, min((n + 1) * block_size, kv_len)) if valid[b, j] and j not in sink]
                   for n in range(blocks)}
        sees = lambda pos, j: valid[b, j] and j <= pos and (sliding_window is None or j > pos - sliding_window)
        for h in range(heads):
            kh, vh = k[b, h // (heads // kv_heads)], v[b, h // (heads // kv_heads)]
            score = lambda x, j: scale * float(x @ kh[j])

            def candidates_of(p):
                block = p // block_size
                last = (block + 1) * block_size - 1
                return [n for n in range(blocks) if n < block - band and members[n]
                        and (sliding_window is None or n * block_size > last - sliding_window)]

            def estimate_of(p):
                candidates, last = candidates_of(p), (p // block_size + 1) * block_size - 1
                sel = min(last, kv_len - 1) if selection == "last" else p
                q_sel = q[b, h, sel - offset]
                structural = [j for j in range(kv_len) if j in sink or j // block_size not in candidates]
                exact_mass = sum(math.exp(score(q_sel, j)) for j in structural if sees(sel, j))
                mass = {}
                for n in candidates:
                    keys = kh[members[n]]
                    if estimate == "centroid":
                        mass[n] = len(members[n]) * math.exp(scale * float(q_sel @ keys.mean(0)))
                    elif estimate == "oracle":
                        mass[n] = sum(math.exp(score(q_sel, j)) for j in members[n])
                    elif estimate == "sampled":  # every 8th position, the residue moving with the row
                        picked = [j for j in members[n] if (sel + j) % sample_stride == 0]
                        mass[n] = (sample_stride * sum(math.exp(score(q_sel, j)) for j in picked) if picked
                                   else len(members[n]) * math.exp(scale * float(q_sel @ keys.mean(0))))
                    else:
                        top = sum(max(float(q_sel[c] * keys[:, c].max()), float(q_sel[c] * keys[:, c].min())) for c in range(d))
                        mass[n] = len(members[n]) * math.exp(scale * top)
                return exact_mass, mass

            def rule(exact_mass, mass):
                total, taken, chosen = exact_mass + sum(mass.values()), exact_mass, set()
                for n in sorted(mass, key=lambda n: (-mass[n], n)):
                    if gamma >= 1 or (gamma > 0 and taken < gamma * total):
                        chosen.add(n)
                        taken += mass[n]
                return chosen

            estimates = [estimate_of(offset + i) for i in range(q_len)]
            own = [rule(*estimates[i]) for i in range(q_len)]
            for i in range(q_len):
                p = offset + i
                candidates, chosen = candidates_of(p), own[i]
                block_rows = [r for r in range(q_len) if (offset + r) // block_size == p // block_size]
                if selection == "union":  # the blocks any row of the block in the call chose
                    chosen = set().union(*(own[r] for r in block_rows))
                if selection in ("pooled", "prefix"):  # the block's rows' shares of their estimated totals, summed
                    pooled_rows = block_rows if selection == "pooled" else [r for r in block_rows if r <= i]
                    shares = [(e, m, e + sum(m.values())) for e, m in (estimates[r] for r in pooled_rows)]
                    chosen = rule(sum(e / t for e, _, t in shares if t), {n: sum(m[n] / t for _, m, t in shares if t)
                                                                            for n in candidates})
                terms = [(score(q[b, h, i], j), vh[j]) for j in range(kv_len)
                         if sees(p, j) and (j in sink or j // block_size not in candidates or j // block_size in chosen)]
                if far == "centroid":
                    terms += [(math.log(len(members[n])) + scale * float(q[b, h, i] @ kh[members[n]].mean(0)),
                               vh[members[n]].mean(0)) for n in candidates if n not in chosen]
                if terms:
                    top = max(t for t, _ in terms)
                    w = torch.tensor([math.exp(t - top) for t, _ in terms], dtype=F64)
                    out[b, h, i] = (w[:, None] * torch.stack([x for _, x in terms])).sum(0) / w.sum()
    return out


@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("estimate", list(ESTIMATES))
@pytest.mark.parametrize("sliding_window,padded", [(None, False), (None, True), (40, True)], ids=["plain", "padded", "window"])
@pytest.mark.parametrize("block_size,far", [(7, "centroid"), (16, "none")])  # (every far field: FAR_FIELDS)
def test_twin_follows_the_definition(selection, estimate, far, sliding_window, padded, block_size):
    """37 queries over 90 keys (the last 37 positions), GQA 4/2, blocks of 7 or 16 (a shorter last block), a band of
    10 keys (2 or 1 blocks), 3 sinks, each far field."""
    assert set(FAR_FIELDS) == {"centroid", "none"}
    q, k, v = qkv()
    mask = left_padded(2, 90) if padded else None
    kw = dict(SETTINGS, block_size=block_size, selection=selection, estimate=estimate, far=far, key_padding_mask=mask,
              sliding_window=sliding_window)
    torch.testing.assert_close(block_support_attention(q, k, v, **kw), by_loops(q, k, v, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("selection", ["row", "pooled"])
@pytest.mark.parametrize("sample_stride", [1, 3, 16])
def test_twin_follows_the_definition_at_other_sample_strides(selection, sample_stride):
    q, k, v = qkv()
    kw = dict(SETTINGS, block_size=16, selection=selection, estimate="sampled", far="centroid", sample_stride=sample_stride,
              key_padding_mask=left_padded(2, 90))
    torch.testing.assert_close(block_support_attention(q, k, v, **kw), by_loops(q, k, v, **kw), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9, 1.0])
def test_selection_rule(gamma):
    """Candidates by decreasing mass (ties: lower block first) while the mass taken before is below gamma of the total."""
    g = torch.Generator().manual_seed(2)
    masses = torch.randn(5, 9, generator=g, dtype=F64)
    masses[:, ::4] = float("-inf")  # not candidates
    masses[0, 1] = masses[0, 2]  # a tie
    exact = torch.randn(5, generator=g, dtype=F64)
    exact[1] = float("-inf")  # no exact key
    got = select_blocks(exact, masses, gamma)
    for row in range(5):
        total = math.exp(exact[row]) + sum(math.exp(m) for m in masses[row].tolist())
        taken, expected = math.exp(exact[row]), set()
        for n in sorted(range(9), key=lambda n: (-masses[row, n].item(), n)):
            if masses[row, n] > float("-inf") and (gamma >= 1 or (gamma > 0 and taken < gamma * total)):
                expected.add(n)
                taken += math.exp(masses[row, n])
        assert set(torch.nonzero(got[row]).flatten().tolist()) == expected


def test_ties_go_to_the_lower_block():
    masses = torch.tensor([[float("-inf"), 0.0, 0.0, 0.0, float("-inf")]], dtype=F64)
    got = select_blocks(torch.tensor([float("-inf")], dtype=F64), masses, 0.5)  # two of three equal blocks reach 1/2
    assert got.tolist() == [[False, True, True, False, False]]


@pytest.mark.parametrize("selection", list(SELECTIONS))
def test_gamma_one_is_exact_attention_and_gamma_zero_keeps_only_the_structure(selection):
    q, k, v = qkv(q_len=90)
    for kw in (dict(), dict(key_padding_mask=left_padded(2, 90)), dict(sliding_window=33)):
        exact = reference.exact_attention(q, k, v, **kw)
        full = block_support_attention(q, k, v, **{**SETTINGS, "gamma": 1.0, "selection": selection}, **kw)
        torch.testing.assert_close(full, exact, rtol=1e-10, atol=1e-10)
    stats = {}
    block_support_attention(q, k, v, **{**SETTINGS, "gamma": 0.0, "selection": selection}, stats=stats)
    assert int(stats["selected_blocks"]) == 0 and int(stats["candidate_blocks"]) > 0
    assert int(stats["centroid_pairs"]) == int(stats["candidate_blocks"]) and int(stats["exact_pairs"]) < int(stats["pairs"])


def perturbed(x, positions, seed):
    """``x`` with the entries at ``positions`` (along dim 2) replaced by other random values."""
    y = x.clone()
    y[:, :, positions] = 3 * torch.randn(y[:, :, positions].shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return y


@pytest.mark.parametrize("selection", ["row", "prefix"])
def test_causal_selections_depend_on_no_later_token(selection):
    """"row": a row depends on its own query and earlier keys only; "prefix" on its own and earlier queries too."""
    q, k, v = qkv(q_len=90)
    kw = dict(SETTINGS, gamma=0.6, selection=selection)
    out = block_support_attention(q, k, v, **kw)
    for p in (20, 41, 62, 88):
        later = list(range(p + 1, 90))
        changed = block_support_attention(perturbed(q, later, 3), perturbed(k, later, 4), perturbed(v, later, 5), **kw)
        torch.testing.assert_close(changed[:, :, : p + 1], out[:, :, : p + 1], rtol=0, atol=0)
        assert not torch.equal(changed[:, :, p + 1 :], out[:, :, p + 1 :])


@pytest.mark.parametrize("selection", ["union", "pooled", "last"])
def test_shared_selections_depend_on_nothing_after_their_block_but_may_on_their_block(selection):
    q, k, v = qkv(q_len=90)
    kw = dict(SETTINGS, gamma=0.9, selection=selection)
    stats = {}
    out = block_support_attention(q, k, v, stats=stats, **kw)
    assert 0 < int(stats["selected_blocks"]) < int(stats["candidate_blocks"])
    size = SETTINGS["block_size"]
    for block in (3, 6, 9):
        end = (block + 1) * size  # the first position after the block
        later = list(range(end, 90))
        changed = block_support_attention(perturbed(q, later, 3), perturbed(k, later, 4), perturbed(v, later, 5), **kw)
        torch.testing.assert_close(changed[:, :, :end], out[:, :, :end], rtol=0, atol=0)
    # A later query of the block moves the support of the block's earlier rows (the leak the mode allows).
    last = lambda p: min((p // size + 1) * size - 1, 89)
    moved = [p for p in range(7, 90) if last(p) != p and not torch.equal(
        block_support_attention(perturbed(q, [last(p)], p), k, v, **kw)[:, :, p], out[:, :, p])]
    assert moved


def test_weights_are_the_output():
    q, k, v = qkv()
    kw = dict(SETTINGS, key_padding_mask=left_padded(2, 90))
    weights = block_support_attention(q, k, v, return_weights=True, **kw)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(weights.shape[:3], dtype=F64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights @ v.repeat_interleave(2, dim=1), block_support_attention(q, k, v, **kw))


@pytest.mark.parametrize("bad,message", [
    (dict(gamma=1.5), "gamma must be"), (dict(gamma=True), "gamma must be"), (dict(block_size=0), "block_size must be"),
    (dict(sinks=-1), "sinks must be"), (dict(local_window=2.5), "local_window must be"), (dict(selection="strict"), "selection must be one of"),
    (dict(sample_stride=0), "sample_stride must be"),
    (dict(estimate="max"), "estimate must be one of"), (dict(far="mean"), "far must be one of"),
    (dict(causal=False), "causal only"),
])
def test_bad_settings_say_what_to_change(bad, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message):
        block_support_attention(q, k, v, **{**SETTINGS, **bad})
