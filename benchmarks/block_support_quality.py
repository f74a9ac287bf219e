"""Quality of block-support attention inside a real model, against exact attention and sinks + window.

Issue 24's measuring tool until the method has its backend: the dense twin (``block_support``, quadratic, every mode)
or the fast op (``block_support_fast``: selections "row" and "union", estimates bound, centroid, oracle) runs as the
model's attention through transformers' attention interface; every point reports perplexity, KL(exact || method),
top-1 agreement, the share of visible pairs computed exactly, the cost share ((exact pairs + centroid pairs) /
visible pairs), the share of candidate blocks selected, and for the fast op the kernel cost share (the pairs its
tiles score, masked ones included, plus the estimate's and the centroids', over visible pairs). One unpadded
sequence per block of text (no mask is read).

    python benchmarks/block_support_quality.py --tokens 2048 --sequences 1 --points '[
        ["block_support", {"gamma": 0.9, "local_window": 128, "selection": "row", "estimate": "oracle"}],
        ["sink_window", {"sinks": 4, "local_window": 256}]]' --output runs/block_quality

Kinds: ``block_support`` and ``block_support_fast`` (the op's settings), ``sink_window`` and ``support_basis`` (the fast ops' settings).
Text: the packaged news text's second half (``--text news``) or Wikipedia prose (``--text wiki``). Prints a table and
writes ``block_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from sb_hf.assets import load_model, news_text_path, wiki_text
from sb_hf.integrations.masks import support_basis_mask
from sb_hf.ops import reference, sink_window_attention, support_basis_attention
from sb_hf.ops.block_support import block_support_attention
from sb_hf.quality import next_token_metrics, token_blocks

OPS = {"block_support": reference.block_support_attention, "block_support_fast": block_support_attention, "sink_window": sink_window_attention,
       "support_basis": support_basis_attention}
NAME = "sb_hf_block_support_twin"
_point: dict = {}


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    """The attention of the point being measured, with its pair counts (transformers' attention signature)."""
    op = OPS[_point["kind"]]
    out = op(query.float(), key.float(), value.float(), scale=scaling, sliding_window=sliding_window,
             stats=_point["stats"], **_point["settings"])
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def pooled(model, blocks, exact_logits) -> dict:
    totals: dict = {}
    for ids, exact in zip(blocks, exact_logits):
        logits = exact if model is None else model(input_ids=ids).logits.float()
        for key, value in next_token_metrics(logits, exact, ids).items():
            totals[key] = totals.get(key, 0) + value
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--sequences", type=int, default=1)
    parser.add_argument("--text", choices=("news", "wiki"), default="news")
    parser.add_argument("--model", default=None, help="a local model folder (default: the packaged SmolLM2-135M)")
    parser.add_argument("--points", required=True, help="JSON list of [kind, settings] pairs")
    parser.add_argument("--output", default="runs/block_quality")
    args = parser.parse_args(argv)
    points = json.loads(args.points)
    for kind, _ in points:
        if kind not in OPS:
            parser.error(f"unknown kind {kind!r}; choose from {sorted(OPS)}")
    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, support_basis_mask)
    model, tokenizer = load_model(args.model)
    text = news_text_path().read_text(encoding="utf-8") if args.text == "news" else wiki_text()
    text = text[len(text) // 2 :] if args.text == "news" else text
    blocks = token_blocks(tokenizer, text, args.tokens, args.sequences)
    torch.set_grad_enabled(False)
    model.set_attn_implementation("sdpa")
    exact_logits = [model(input_ids=ids).logits.float() for ids in blocks]
    exact = pooled(None, blocks, exact_logits)
    rows = [dict(kind="exact", settings={}, perplexity=math.exp(exact["nll"] / exact["count"]), kl=0.0, top1=1.0,
                 exact_share=1.0, cost_share=1.0, selected_share=None, kernel_share=1.0, seconds=None)]
    model.set_attn_implementation(NAME)
    for kind, settings in points:
        _point.update(kind=kind, settings=settings, stats={})
        start = time.perf_counter()
        totals = pooled(model, blocks, exact_logits)
        stats = {key: float(value) for key, value in _point["stats"].items()}
        count = totals["count"]
        rows.append(dict(
            kind=kind, settings=settings, perplexity=math.exp(totals["nll"] / count), kl=totals["kl"] / count,
            top1=totals["agree"] / count, exact_share=stats["exact_pairs"] / stats["pairs"],
            cost_share=(stats["exact_pairs"] + stats.get("centroid_pairs", 0.0)) / stats["pairs"],
            selected_share=stats["selected_blocks"] / max(stats["candidate_blocks"], 1.0) if "selected_blocks" in stats else None,
            kernel_share=(stats["computed_pairs"] + stats["estimate_pairs"] + stats.get("centroid_pairs", 0.0)) / stats["pairs"]
            if "computed_pairs" in stats else None,
            seconds=time.perf_counter() - start))
        print(json.dumps(rows[-1]), flush=True)
    model.set_attn_implementation("sdpa")
    base = rows[0]["perplexity"]
    print(f"text: {args.text}; {args.sequences} x {args.tokens} tokens")
    print("| kind | settings | perplexity | change | mean KL | top-1 | exact pairs | cost | blocks selected | kernel cost |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        share = lambda x: "" if x is None else f"{x:.1%}"
        print(f"| {r['kind']} | {json.dumps(r['settings'])} | {r['perplexity']:.3f} | {r['perplexity'] / base - 1:+.2%} | "
              f"{r['kl']:.4f} | {r['top1']:.1%} | {r['exact_share']:.1%} | {r['cost_share']:.1%} | "
              f"{share(r['selected_share'])} | {share(r['kernel_share'])} |")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "block_quality.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out / 'block_quality.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
