"""What the blocks left out should be, and which blocks to leave out: a study on captured activations.

For every head of the chosen layers of a capture (``sb-hf capture``), the last ``--rows`` query rows attend to the
keys behind them; the candidates are the key blocks of 64 behind a band of 2 blocks (the first 4 keys are sinks,
always exact), a query block's 64 rows share one selection pooled from their shares of mass (the op's ``pooled``),
and each rule reports the mean relative error of the rows' attention outputs against exact attention and the share
of the visible keys computed exactly.

- ``--part ranking``: the blocks ranked by their true mass (``mass``, the op's rule with the oracle estimate), by
  the mass their centroid misses (``gap``: true mass minus ``n_b exp(q . c_b)``, Jensen's gap), or by the norm of
  the output error the centroid would leave (``err``, which needs the exact output: an oracle); the left-out blocks
  by their centroids. ``gap`` and ``err``: blocks taken until what is left is below ``1 - gamma`` of the mass.
- ``--part far``: the blocks ranked by the true mass (``oracle``) or by the sampled estimate (one key in 8, the
  residue moving with the row: the op's), and the left-out blocks dropped (``none``), by their centroids
  (``centroid``) or by the keys the row sampled, each counted 8 times (``sampled``).

    python benchmarks/far_field_study.py --capture runs/cap8k.safetensors --part far --output runs/far_field_study

Prints a table and writes ``far_field_study.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sb_hf.analysis.capture import load_capture

SIZE, SINKS, BAND, STRIDE = 64, 4, 2, 8


def head_parts(q, k, v, scale, rows):
    """The exact attention of the last ``rows`` rows and, per (row, candidate block), what the rules need."""
    n, d = k.shape
    nb, pos = n // SIZE, torch.arange(n)
    qpos = pos[n - rows:]
    scores = scale * q[n - rows:] @ k.T
    scores.masked_fill_(pos[None] > qpos[:, None], float("-inf"))
    top = scores.amax(-1, keepdim=True)
    w = (scores - top).exp()
    total = w.sum(-1)
    out = w @ v / total[:, None]
    member = torch.ones(nb, SIZE)
    member[0, :SINKS] = 0
    count = member.sum(-1)
    kb, vb = k[: nb * SIZE].view(nb, SIZE, d), v[: nb * SIZE].view(nb, SIZE, -1)
    centroid, mean_value = (kb * member[..., None]).sum(1) / count[:, None], (vb * member[..., None]).sum(1) / count[:, None]
    wm = w[:, : nb * SIZE].view(rows, nb, SIZE) * member
    picked = ((qpos[:, None] + pos[None, : nb * SIZE]) % STRIDE == 0).view(rows, nb, SIZE) * member
    ws = STRIDE * wm * picked
    candidate = torch.arange(nb)[None] < (qpos // SIZE - BAND)[:, None]
    mass, cmass = wm.sum(-1), count * (scale * q[n - rows:] @ centroid.T - top).exp()
    num = torch.einsum("rbs,bsd->rbd", wm, vb)
    return dict(total=total, out=out, count=count, candidate=candidate, mass=mass, num=num,
                centroid=(cmass, cmass[..., None] * mean_value), sampled=(ws.sum(-1), torch.einsum("rbs,bsd->rbd", ws, vb)),
                qpos=qpos)


def select(score, exact_share, mass_share, candidate, gamma, by_mass):
    """One selection per query block from the rows' pooled shares ``score`` (rows, nb)."""
    groups = score.shape[0] // SIZE
    pooled = lambda x: x.view(groups, SIZE, *x.shape[1:]).sum(1)
    ps, pe, pm, pc = pooled(score), pooled(exact_share), pooled(mass_share), candidate.view(groups, SIZE, -1)[:, 0]
    order = torch.sort(-torch.where(pc, ps, -1.0), dim=-1, stable=True).indices
    ok = pc.gather(-1, order)
    ranked = torch.where(ok, ps.gather(-1, order), 0.0)
    before = ranked.cumsum(-1) - ranked
    if by_mass:
        keep = (pe[:, None] + before < gamma * (pe[:, None] + ranked.sum(-1, keepdim=True))) & ok
    else:  # until what is left of the score is below (1 - gamma) of the mass
        left = ranked.sum(-1, keepdim=True) - before
        keep = (left > (1 - gamma) * (pe + pm.sum(-1))[:, None]) & ok & (ranked > 0)
    return torch.zeros_like(keep).scatter(-1, order, keep).repeat_interleave(SIZE, 0)


def error(p, far, field):
    """Mean relative output error and exact share with the blocks ``far`` (rows, nb) left to ``field``."""
    total, out = p["total"], p["out"]
    den = total - torch.where(far, p["mass"], 0.0).sum(-1)
    num = out * total[:, None] - torch.where(far[..., None], p["num"], 0.0).sum(1)
    if field is not None:
        den = den + torch.where(far, field[0], 0.0).sum(-1)
        num = num + torch.where(far[..., None], field[1], 0.0).sum(1)
    approx = num / den[:, None]
    visible = (p["qpos"] + 1).float()
    share = (visible - torch.where(far, p["count"], 0.0).sum(-1)) / visible
    return ((approx - out).norm(dim=-1) / out.norm(dim=-1)).mean().item(), share.mean().item()


def study(p, part, gammas):
    cand, total = p["candidate"], p["total"]
    exact_mass = total - torch.where(cand, p["mass"], 0.0).sum(-1)
    results = {}
    if part == "ranking":
        cmass = p["centroid"][0]
        err = (p["num"] - p["centroid"][1] - p["out"][:, None] * (p["mass"] - cmass)[..., None]).norm(dim=-1)
        rules = {"mass": p["mass"], "gap": (p["mass"] - cmass).clamp_min(0), "err": err}
        for name, score in rules.items():
            score = torch.where(cand, score, 0.0)
            for gamma in gammas:
                chosen = select(score / total[:, None], exact_mass / total, torch.where(cand, p["mass"], 0.0) / total[:, None],
                                cand, gamma, by_mass=name == "mass")
                results[(name, "centroid", gamma)] = error(p, cand & ~chosen, p["centroid"])
        return results
    sampled = torch.where(p["sampled"][0] > 0, p["sampled"][0], p["centroid"][0])  # (no sampled member: the centroid)
    for name, estimate in (("oracle", p["mass"]), ("sampled", sampled)):
        estimate = torch.where(cand, estimate, 0.0)
        estimated_total = exact_mass + estimate.sum(-1)
        for gamma in gammas:
            chosen = select(estimate / estimated_total[:, None], exact_mass / estimated_total,
                            estimate / estimated_total[:, None], cand, gamma, by_mass=True)
            for field in ("none", "centroid", "sampled"):
                results[(name, field, gamma)] = error(p, cand & ~chosen, None if field == "none" else p[field])
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capture", required=True)
    parser.add_argument("--part", choices=("ranking", "far"), default="far")
    parser.add_argument("--layers", default=None, help="comma-separated layers (default: every captured layer)")
    parser.add_argument("--rows", type=int, default=1024, help="the last query rows studied (a multiple of 64)")
    parser.add_argument("--gammas", default="0.8,0.9,0.95,0.97")
    parser.add_argument("--output", default="runs/far_field_study")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    capture = load_capture(args.capture)
    layers = sorted(capture.layers) if args.layers is None else [int(x) for x in args.layers.split(",")]
    gammas = [float(x) for x in args.gammas.split(",")]
    sums: dict = {}
    for layer in layers:
        q, k, v = (capture.layers[layer][name][0].float() for name in "qkv")
        for h in range(q.shape[0]):
            for key, (err, share) in study(head_parts(q[h], k[h], v[h], q.shape[-1] ** -0.5, args.rows), args.part, gammas).items():
                acc = sums.setdefault((layer, *key), [0.0, 0.0, 0])
                acc[0], acc[1], acc[2] = acc[0] + err, acc[1] + share, acc[2] + 1
    rows = [dict(layer=layer, rule=rule, far=far, gamma=gamma, error=e / c, exact_share=s / c)
            for (layer, rule, far, gamma), (e, s, c) in sorted(sums.items())]
    print("| layer | ranking / estimate | far field | gamma | mean relative error | keys exact |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['rule']} | {r['far']} | {r['gamma']} | {r['error']:.4f} | {r['exact_share']:.1%} |")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "far_field_study.json").write_text(json.dumps(dict(vars(args), rows=rows), indent=1))
    print(f"wrote {out / 'far_field_study.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
