"""How well block selections cover a real model's attention, per unit of cost: a study on captured activations.

For every head of the chosen layers of a capture (``sb-hf capture``), exact causal attention gives each row's true
mass on each key block of 64; a selection rule picks candidate blocks (those behind the band of ``--local-window``
keys and the row's own block; the first 4 keys are sinks, always exact) and this reports, over rows, the mean mass
it misses (1 - the exact support's share of the row's attention) and its cost: the pairs it computes exactly (sinks,
band, selected blocks; a shared selection counts for every row that shares it) plus its estimate's work, over the
visible pairs. Rules:

- ``oracle-row``: each row its own true masses (what a perfect per-row estimate reaches);
- ``oracle-union``: the same, and the rows of a query block share the union of their selections;
- ``bound-row`` / ``bound-union``: Quest's bound (per-channel extremes of the block) as each row's estimate;
- ``rows-R``: R rows of each query block (evenly spaced, the last included) attend to every key exactly (their
  output is then exact too) and the block takes the union of their true selections;
- ``pooled``: the block's rows' true masses summed, blocks taken until gamma of the pooled mass (the best a
  pooled estimate such as XAttention's can do);
- ``antidiagonal``: the pooled mass estimated from one (row, key) pair in 8 (``(i + j) % 8 == 0``), XAttention-like,
  rows normalized by their true log-sum-exp (an optimistic version: cost counts the sampled scores only).

    sb-hf capture --tokens 8192 --second-half --layers 3,9,15,21,27 --dtype float16 --output runs/cap8k.safetensors
    python benchmarks/block_selection_study.py --capture runs/cap8k.safetensors --output runs/selection_study

Prints a table and writes ``selection_study.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sb_hf.analysis.capture import load_capture
from sb_hf.ops.block_support import select_blocks

SIZE, SINKS, STRIDE = 64, 4, 8


def head_masses(q, k, scale, local_window):
    """Per row: true mass per key block ``(n, nb)``, the structural mass ``(n,)`` and key count, candidates."""
    n = q.shape[0]
    nb, band = -(-n // SIZE), -(-local_window // SIZE)
    scores = scale * q @ k.T
    pos = torch.arange(n)
    scores.masked_fill_(pos[None, :] > pos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    del scores
    padded = torch.nn.functional.pad(probs, (0, nb * SIZE - n))
    sink_mass = probs[:, :SINKS].sum(-1)
    blocks = padded.view(n, nb, SIZE).sum(-1)
    blocks[:, 0] -= sink_mass  # block 0's members are its non-sink keys
    q_block = pos // SIZE
    candidate = torch.arange(nb)[None, :] < (q_block - band)[:, None]
    structural = sink_mass + torch.where(candidate, 0.0, blocks).sum(-1)
    visible = pos + 1
    structural_keys = torch.minimum(visible, torch.full_like(visible, SINKS)) + (
        visible - torch.clamp((q_block - band) * SIZE, min=SINKS)).clamp_min(0)
    return probs, blocks, candidate, structural, structural_keys, visible


def union(selected):
    """Each row takes the union of its query block's rows' selections."""
    n, nb = selected.shape
    pad = -(-n // SIZE) * SIZE - n
    grouped = torch.nn.functional.pad(selected, (0, 0, 0, pad)).view(-1, SIZE, nb).any(dim=1, keepdim=True)
    return grouped.expand(-1, SIZE, -1).reshape(-1, nb)[:n]


def evaluate(selected, blocks, structural, structural_keys, visible, extra_pairs=0.0, exact_rows=None):
    covered = structural + (blocks * selected).sum(-1)
    keys = structural_keys + SIZE * selected.sum(-1)
    if exact_rows is not None:  # rows computed exactly in full
        covered = torch.where(exact_rows, torch.ones_like(covered), covered)
        keys = torch.where(exact_rows, visible, keys)
    keys = torch.minimum(keys, visible)
    return float((1 - covered).clamp_min(0).mean()), float((keys.sum() + extra_pairs) / visible.sum())


def study(q, k, scale, local_window, gammas):
    probs, blocks, candidate, structural, structural_keys, visible = head_masses(q, k, scale, local_window)
    n, nb = blocks.shape
    log_blocks = torch.where(candidate, blocks.clamp_min(1e-30).log(), float("-inf"))
    log_structural = structural.clamp_min(1e-30).log()
    rows = {}
    # Quest's bound per row (true rows normalization not needed: the rule compares within a row).
    kp = torch.nn.functional.pad(k, (0, 0, 0, nb * SIZE - n)).view(nb, SIZE, -1)
    member = torch.ones(nb * SIZE, dtype=torch.bool)
    member[:SINKS] = False
    member[n:] = False
    member = member.view(nb, SIZE, 1)
    big = torch.finfo(k.dtype).max
    high = torch.where(member, kp, -big).amax(1)
    low = torch.where(member, kp, big).amin(1)
    bound = scale * (q.clamp_min(0) @ high.T + q.clamp_max(0) @ low.T) + member.sum((1, 2)).clamp_min(1).log()
    lse = torch.logsumexp(torch.where(torch.arange(n)[None, :] <= torch.arange(n)[:, None], scale * q @ k.T, float("-inf")), -1)
    bound = torch.where(candidate, bound - lse[:, None], float("-inf"))
    exact_log = log_structural
    for g in gammas:
        own = select_blocks(exact_log, log_blocks, g)
        rows[f"oracle-row g{g}"] = evaluate(own, blocks, structural, structural_keys, visible)
        rows[f"oracle-union g{g}"] = evaluate(union(own), blocks, structural, structural_keys, visible)
        b_own = select_blocks(exact_log, bound, g)
        rows[f"bound-row g{g}"] = evaluate(b_own, blocks, structural, structural_keys, visible, nb * n / 2)
        rows[f"bound-union g{g}"] = evaluate(union(b_own), blocks, structural, structural_keys, visible, nb * n / 2)
        for r in (1, 4, 8):
            pick = torch.zeros(n, dtype=torch.bool)
            for start in range(0, n, SIZE):
                end = min(start + SIZE, n)
                pick[torch.linspace(start, end - 1, min(r, end - start)).round().long()] = True
            chosen = union(torch.where(pick[:, None], own, False))
            rows[f"rows-{r} g{g}"] = evaluate(chosen, blocks, structural, structural_keys, visible, exact_rows=pick)
        pooled = torch.nn.functional.pad(blocks, (0, 0, 0, -(-n // SIZE) * SIZE - n)).view(-1, SIZE, nb).sum(1)
        pooled_structural = torch.nn.functional.pad(structural, (0, -(-n // SIZE) * SIZE - n)).view(-1, SIZE).sum(1)
        block_candidates = candidate[SIZE - 1 :: SIZE] if n % SIZE == 0 else candidate[torch.arange(0, n, SIZE)]
        sel = select_blocks(pooled_structural.log(), torch.where(block_candidates, pooled.clamp_min(1e-30).log(), float("-inf")), g)
        rows[f"pooled g{g}"] = evaluate(sel.repeat_interleave(SIZE, 0)[:n], blocks, structural, structural_keys, visible)
        pos = torch.arange(n)
        sampled = torch.where((pos[:, None] + pos[None, :]) % STRIDE == 0, probs, 0.0) * STRIDE
        sampled = torch.nn.functional.pad(sampled, (0, nb * SIZE - n, 0, -(-n // SIZE) * SIZE - n))
        est = sampled.view(-1, SIZE, nb, SIZE).sum((1, 3))
        sel = select_blocks(pooled_structural.log(), torch.where(block_candidates, est.clamp_min(1e-30).log(), float("-inf")), g)
        rows[f"antidiagonal g{g}"] = evaluate(sel.repeat_interleave(SIZE, 0)[:n], blocks, structural, structural_keys,
                                                 visible, n * n / 2 / STRIDE / 2)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capture", required=True)
    parser.add_argument("--layers", default=None, help="comma list (default: every captured layer)")
    parser.add_argument("--heads", default=None, help="comma list of query heads (default: all)")
    parser.add_argument("--local-window", type=int, default=128)
    parser.add_argument("--gammas", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--output", default="runs/selection_study")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    capture = load_capture(args.capture)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else capture.layer_indices
    gammas = [float(x) for x in args.gammas.split(",")]
    totals: dict = {}
    count = 0
    for layer in layers:
        q_all, k_all = (capture.layers[layer][name][0].float() for name in ("q", "k"))
        heads = [int(x) for x in args.heads.split(",")] if args.heads else range(q_all.shape[0])
        for h in heads:
            for key, (missed, cost) in study(q_all[h], k_all[h], float(capture.meta["scale"]), args.local_window, gammas).items():
                m, c = totals.get(key, (0.0, 0.0))
                totals[key] = (m + missed, c + cost)
            count += 1
            print(f"layer {layer} head {h} done", flush=True)
    rows = [dict(rule=key, missed=m / count, cost=c / count) for key, (m, c) in totals.items()]
    rows.sort(key=lambda r: r["cost"])
    print(f"{capture.meta.get('tokens', '')} tokens; layers {layers}; {count} heads; local window {args.local_window}")
    print("| rule | mean missed mass | cost (share of visible pairs) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['rule']} | {r['missed']:.4f} | {r['cost']:.1%} |")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection_study.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
