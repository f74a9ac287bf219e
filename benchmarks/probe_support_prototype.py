"""Prototype (issue 24): the exact support of each chunk of queries chosen from a probe of the chunk before.

Per query head and chunk of ``chunk`` query rows (the first chunk exact), the ``probe`` rows before the chunk
attend exactly to their keys; from their attention the chunk takes the structure a calibration would give a head,
online: a window of one of ``WINDOWS`` keys behind the chunk's start and the key columns (single keys) of largest
probe mass, the pair that covers ``gamma`` of the probe rows' mass (sinks and window counted) with the fewest keys.
The chunk's rows attend exactly to the sinks, the columns and every key from the window's edge on (causally), and
to the other earlier keys through their 64-key blocks' centroids (mean key, mean value, log-count bias) in the same
softmax: one SDPA call per query head and chunk with an additive mask. A row depends on earlier tokens only.

    python benchmarks/probe_support_prototype.py quality --tokens 8192 --points '[["probe_support", {}]]'
    python benchmarks/probe_support_prototype.py speed --capture runs/cap8k.safetensors --layers 3,9,15,21,27

``quality`` runs ``block_support_quality.py`` with this op as the kind ``probe_support`` (its arguments after the
word); ``speed`` times one causal call against SDPA on captured layers (the fastest of 3 calls each, one process).
"""

from __future__ import annotations

import math
import sys
import time

import torch

WINDOWS = (64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
SIZE = 64  # keys per far-field block


def choose(probs, start, sinks, gamma):
    """From the probe rows' attention ``probs (P, start)`` (rows at positions start - P .. start - 1): the window
    and the columns (key indices) that cover ``gamma`` of their mass with the fewest keys."""
    p = probs.shape[0]
    cum = torch.nn.functional.pad(probs.cumsum(-1), (1, 0))
    rows = torch.arange(start - p, start)
    best = None
    for w in WINDOWS:
        edge = max(sinks, start - w)
        lo = (rows - w + 1).clamp_min(sinks)
        inside = probs[:, :sinks].sum(-1) + cum[torch.arange(p), rows + 1] - cum[torch.arange(p), lo]
        need = gamma - float(inside.mean())
        mass = probs[:, sinks:edge].mean(0)
        order = torch.sort(mass, descending=True)
        count = 0 if need <= 0 else min(int((order.values.cumsum(0) < need).sum()) + 1, mass.numel())
        if best is None or w + count < best[0]:
            best = (w + count, edge, order.indices[:count] + sinks)
        if start - w <= sinks:
            break
    return best[1], best[2]


def probe_support_attention(q, k, v, *, scale=None, gamma=0.97, chunk=1024, probe=64, sinks=4, far=True,
                            sliding_window=None, stats=None):
    """``q (B, Hq, n, d)``, ``k``, ``v (B, Hk, n, d)``: causal self-attention (no padding, no window)."""
    if sliding_window is not None or q.shape[2] != k.shape[2]:
        raise ValueError("the prototype covers causal self-attention without a sliding window")
    b_, hq, n, d = q.shape
    hk = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    first = min(chunk, n)
    out[:, :, :first] = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, :first], k[:, :, :first], v[:, :, :first], is_causal=True, scale=scale, enable_gqa=True)
    exact_pairs, pairs = first * (first + 1) / 2 * b_ * hq, n * (n + 1) / 2 * b_ * hq
    computed, probed, centroids = first * first * b_ * hq, 0, 0  # the tiles' pairs, masked ones included
    for b in range(b_):
        for h in range(hq):
            kh, vh = k[b, h * hk // hq], v[b, h * hk // hq]
            for start in range(chunk, n, chunk):
                end = min(start + chunk, n)
                qp = q[b, h, start - probe : start]
                scores = scale * qp @ kh[:start].T
                scores.masked_fill_(torch.arange(start)[None, :] > torch.arange(start - probe, start)[:, None], float("-inf"))
                edge, columns = choose(torch.softmax(scores, -1), start, sinks, gamma)
                keys, values = [kh[:sinks], kh[columns]], [vh[:sinks], vh[columns]]
                bias = [torch.zeros(sinks + len(columns))]
                rows = end - start
                causal = torch.arange(edge, end)[None, :] <= torch.arange(start, end)[:, None]
                if far and edge > sinks:  # the centroids of the other earlier keys, by blocks of SIZE
                    member = torch.ones(edge, dtype=torch.bool)
                    member[:sinks] = False
                    member[columns] = False
                    nb = -(-edge // SIZE)
                    weight = torch.nn.functional.pad(member, (0, nb * SIZE - edge)).view(nb, SIZE, 1).to(kh.dtype)
                    pad = lambda x: torch.nn.functional.pad(x[:edge], (0, 0, 0, nb * SIZE - edge)).view(nb, SIZE, -1)
                    count = weight.sum((1, 2))
                    some = count > 0
                    keys.append(((pad(kh) * weight).sum(1) / count.clamp_min(1)[:, None])[some])
                    values.append(((pad(vh) * weight).sum(1) / count.clamp_min(1)[:, None])[some])
                    bias.append(count[some].log())
                keys, values = torch.cat(keys + [kh[edge:end]]), torch.cat(values + [vh[edge:end]])
                front = torch.cat(bias)
                mask = torch.cat([front[None, :].expand(rows, -1),
                                  torch.zeros(rows, end - edge).masked_fill_(~causal, float("-inf"))], dim=1)
                out[b, h, start:end] = torch.nn.functional.scaled_dot_product_attention(
                    q[b, h, start:end][None], keys[None], values[None], attn_mask=mask[None].to(q.dtype), scale=scale)[0]
                exact_pairs += rows * (sinks + len(columns)) + int(causal.sum())
                computed += rows * (keys.shape[0] - (len(bias[-1]) if len(bias) > 1 else 0))
                centroids += rows * (len(bias[-1]) if len(bias) > 1 else 0)
                probed += probe * start
    if stats is not None:
        for key, value in (("exact_pairs", exact_pairs), ("pairs", pairs), ("computed_pairs", computed),
                           ("estimate_pairs", probed), ("centroid_pairs", centroids)):
            stats[key] = stats.get(key, 0) + torch.tensor(float(value))
    return out


def speed(argv):
    import argparse

    from sb_hf.analysis.capture import load_capture

    parser = argparse.ArgumentParser()
    parser.add_argument("--capture", required=True)
    parser.add_argument("--layers", required=True)
    parser.add_argument("--settings", default="{}")
    args = parser.parse_args(argv)
    import json

    settings = json.loads(args.settings)
    torch.set_grad_enabled(False)
    torch.set_num_threads(2)
    capture = load_capture(args.capture)
    print("| layer | SDPA s | probe support s | vs SDPA | pairs exact |")
    print("|---|---|---|---|---|")
    for layer in (int(x) for x in args.layers.split(",")):
        q, k, v = (capture.layers[layer][name].float() for name in ("q", "k", "v"))
        q, k, v = q[None], k[None], v[None]
        scale = float(capture.meta["scale"])
        times = {}
        stats = {}
        for name, fn in (("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)),
                         ("probe", lambda: probe_support_attention(q, k, v, scale=scale, **settings))):
            best = math.inf
            for _ in range(3):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            times[name] = best
        probe_support_attention(q, k, v, scale=scale, stats=stats, **settings)
        print(f"| {layer} | {times['sdpa']:.3f} | {times['probe']:.3f} | {times['probe'] / times['sdpa']:.2f}x | "
              f"{float(stats['exact_pairs'] / stats['pairs']):.1%} |", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "speed":
        speed(sys.argv[2:])
    else:
        import block_support_quality as quality

        quality.OPS["probe_support"] = probe_support_attention
        raise SystemExit(quality.main(sys.argv[2:]))
