"""Time and peak memory of the fast support-basis op vs sequence length, with a fixed number (or
share) of large rows, next to causal SDPA and eager attention, forward or forward+backward.
Each point runs in two fresh subprocesses: one for the time (the default allocator, after a warm-up call
on a 512-token prefix; the median of up to 5 calls while they take under 2 s in all), one for the memory
(one call, no warm-up, whose peak would raise the baseline), with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``
so freed blocks go back to the system and peak RSS follows the live tensors (with the default, glibc
keeps freed blocks of growing sizes, and peak RSS measures the allocator's retention as much as the op).

    python benchmarks/op_scaling.py                 # forward, n = 512..4096
    python benchmarks/op_scaling.py --lengths 1024,2048,4096,8192 --large-rows 64
    python benchmarks/op_scaling.py --backward --large-share 0.05 --methods support_basis,sdpa,eager \
        --lengths 1024,2048,4096,8192 --output runs/train_memory   # training: forward+backward

With ``--settings FILE`` support basis runs a calibrated layer's settings (``--layer``; per KV head or
per query head, one op call per group of heads as in the model) instead of ``--degree``/planted rows,
and with ``--capture FILE`` every method runs on that layer's captured activations (n up to the
capture's length) instead of random ones. ``block_support`` runs the block-support op with the settings of
``--block`` (JSON; its pair counts include the tiles' and the estimate's work, reported as the kernel's share), and
``block_support_flex`` the same op through compiled FlexAttention (the CUDA path; compiled on the first full-size
call, before timing; its kernel share: the blocks the kernel reads over dense causal attention's, no pair counts):

    python benchmarks/op_scaling.py --settings runs/calibrate_q_8k/budget_0.05/support_basis.json \
        --capture runs/capture8k_all.safetensors --layer 12 --lengths 2048,4096,8192 --methods sdpa,support_basis

Prints a table and writes JSON (and a PNG when matplotlib is installed) to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def eager_attention(q, k, v, scale):
    """Causal softmax attention with the full score matrix, as transformers' eager backend."""
    import torch

    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * scale
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v


def inputs(n: int, large_rows: int, capture: str | None, layer: int):
    """q ``(1, 9, n, 64)``, k/v ``(1, 3, n, 64)`` and the scale: a captured layer's first ``n`` positions, or
    random entries with ``large_rows`` planted large rows (the exact part of a threshold-3 support basis)."""
    import torch

    if capture:
        from sb_hf.analysis.capture import load_capture

        captured = load_capture(capture)
        if layer not in captured.layers:
            raise SystemExit(f"layer {layer} is not in {capture} (layers {captured.layer_indices})")
        q, k, v = (captured.layers[layer][name].float()[:, :, :n].contiguous() for name in ("q", "k", "v"))
        if q.shape[2] < n:
            raise SystemExit(f"{capture} holds {q.shape[2]} tokens, fewer than n = {n}")
        groups = captured.num_key_value_groups  # the capture stores k/v once per query head
        return q, k[:, ::groups].contiguous(), v[:, ::groups].contiguous(), float(captured.meta["scale"])
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d = 9, 3, 64
    q = (torch.randn(1, heads, n, d, generator=g) * 0.5).clamp(-2.5, 2.5)
    k = (torch.randn(1, kv_heads, n, d, generator=g) * 0.5).clamp(-2.5, 2.5)
    v = torch.randn(1, kv_heads, n, d, generator=g)
    rows = torch.randperm(n, generator=g)[:large_rows]
    q[:, :, rows, 0] = 6.0  # planted large rows: the exact part
    k[:, :, rows, 1] = 6.0
    return q, k, v, d**-0.5


def support_basis_call(q, k, v, scale, stats, *, settings: str | None, layer: int, degree: int, chunk_size: int | None):
    """The support-basis call: a calibrated layer's settings (grouped per head as the model runs them), or
    threshold 3 with ``degree`` and the op's default kernel (taylor)."""
    from sb_hf.ops import support_basis_attention
    from sb_hf.ops.heads import grouped_attention

    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}
    if settings is None:
        return lambda: support_basis_attention(q, k, v, threshold=3.0, degree=degree, scale=scale, stats=stats, **chunk)
    from sb_hf.config import SupportBasisConfig, load_settings
    from sb_hf.integrations.plan import attention_groups

    layer_settings = SupportBasisConfig.from_dict(load_settings(settings)).for_layer(layer)
    groups, per_query_head = attention_groups(layer_settings, "support_basis", q.device, q.shape[1], k.shape[1])
    groups = [(heads, kwargs | chunk) for heads, kwargs in groups]
    return lambda: grouped_attention(support_basis_attention, q, k, v, groups, per_query_head=per_query_head,
                                     scale=scale, stats=stats)


WARMUP_TOKENS = 512
REPEATS, REPEAT_SECONDS = 5, 2.0  # a timed point repeats (up to 5 calls, while under 2 s in all) and reports the median


def measure(method: str, n: int, large_rows: int, degree: int, threads: int, backward: bool, *, settings: str | None = None,
            capture: str | None = None, layer: int = 0, window: int = 1024, chunk_size: int | None = None,
            warmup: bool = True, block: str = "{}") -> dict:
    import torch

    from sb_hf.ops import sink_window_attention
    from sb_hf.ops.block_support import block_support_attention, block_support_flex

    torch.set_num_threads(threads)
    q, k, v, scale = inputs(n, large_rows, capture, layer)

    def call(q, k, v, stats):  # the timed operation on these inputs
        ops = {
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=scale),
            "eager": lambda: eager_attention(q, k, v, scale),
            "support_basis": support_basis_call(q, k, v, scale, stats, settings=settings, layer=layer, degree=degree,
                                                chunk_size=chunk_size),
            "sink_window": lambda: sink_window_attention(q, k, v, sinks=4, local_window=window, scale=scale, stats=stats,
                                                         **({} if chunk_size is None else {"chunk_size": chunk_size})),
            "block_support": lambda: block_support_attention(q, k, v, scale=scale, stats=stats, **json.loads(block)),
            "block_support_flex": lambda: block_support_flex(q, k, v, scale=scale, compiled=True, info=stats,
                                                             **json.loads(block)),
        }
        return ops[method]

    # Timing warms up on a prefix: the first call of each kernel in a process pays one-time costs, which a running
    # model has paid (measured: the calibrated settings at 2048 tokens took 0.25 s cold, 0.10 s warm). Memory
    # does not: the warm-up's own peak would raise the baseline the peak is measured from.
    small = [x[:, :, :WARMUP_TOKENS].clone().requires_grad_(backward) for x in (q, k, v)]
    if warmup:
        with torch.set_grad_enabled(backward):
            out = call(*small, {})()
            if backward:
                out.sum().backward()
    if settings is None:
        from sb_hf.ops import support_basis_attention

        with torch.no_grad():  # both evaluation forms' feature maps
            support_basis_attention(*small, threshold=3.0, degree=degree, evaluation="features")
            support_basis_attention(*small, threshold=3.0, degree=degree, evaluation="scores")
    stats: dict = {}
    timed = call(q, k, v, stats)
    if method == "block_support_flex":  # compiled per shape class: compile this one before timing
        with torch.no_grad():
            timed()
    for x in (q, k, v):
        x.requires_grad_(backward)
    grad_out = torch.randn(*q.shape[:-1], v.shape[-1], generator=torch.Generator().manual_seed(1)) if backward else None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    while not times or (warmup and len(times) < REPEATS and sum(times) < REPEAT_SECONDS):  # short calls: the median
        for x in (q, k, v):
            x.grad = None
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            out = timed()
            if backward:
                out.backward(grad_out)
        times.append(time.perf_counter() - start)
        del out
    seconds = statistics.median(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    share = float(stats["exact_pairs"] / stats["pairs"]) if "pairs" in stats else 1.0
    kernel = (float((stats["computed_pairs"] + stats["estimate_pairs"] + stats["centroid_pairs"]) / stats["pairs"])
              if "computed_pairs" in stats else share)
    if "listed_blocks" in stats:  # FlexAttention's: no pair counts; the blocks its kernel reads (the selection not counted)
        share, kernel = float("nan"), float(stats["listed_blocks"] / stats["causal_blocks"])
    return {"method": method, "n": n, "large_rows": large_rows, "backward": backward, "seconds": seconds,
            "peak_extra_mib": peak / 1024, "exact_pair_share": share, "kernel_share": kernel}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--methods", default="sdpa,support_basis",
                        help="comma list of sdpa, eager, support_basis, sink_window, block_support, block_support_flex "
                             "(the same op through compiled FlexAttention, the CUDA path)")
    parser.add_argument("--large-rows", type=int, default=64, help="planted large rows (fixed count)")
    parser.add_argument("--large-share", type=float, default=None, help="planted large rows as a share of n (overrides --large-rows)")
    parser.add_argument("--backward", action="store_true", help="time forward+backward (training) instead of forward")
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", help="support_basis.json of sb-hf calibrate: support basis runs --layer's settings")
    parser.add_argument("--capture", help="capture file (sb-hf capture): every method runs on --layer's activations")
    parser.add_argument("--layer", type=int, default=12, help="the layer of --settings/--capture (default 12)")
    parser.add_argument("--window", type=int, default=1024, help="local window of sink_window (4 sinks; default 1024)")
    parser.add_argument("--chunk-size", type=int, default=None, help="chunk_size of support_basis/sink_window (default: theirs)")
    parser.add_argument("--block", default="{}", help="JSON settings of block_support (default: the op's defaults)")
    parser.add_argument("--output", default="runs/op_scaling")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)  # the memory run: no warm-up
    args = parser.parse_args()
    if args.point:
        method, n = args.point.split(":")
        print(json.dumps(measure(method, int(n), args.large_rows, args.degree, args.threads, args.backward,
                                 settings=args.settings, capture=args.capture, layer=args.layer, window=args.window,
                                 chunk_size=args.chunk_size, warmup=not args.cold, block=args.block)))
        return

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - {"sdpa", "eager", "support_basis", "sink_window", "block_support", "block_support_flex"}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        large = round(args.large_share * n) if args.large_share is not None else args.large_rows
        for method in methods:
            cmd = [sys.executable, __file__, "--point", f"{method}:{n}", "--large-rows", str(large),
                   "--degree", str(args.degree), "--threads", str(args.threads), "--layer", str(args.layer),
                   "--window", str(args.window), "--block", args.block] + (["--backward"] if args.backward else [])
            for flag, value in (("--settings", args.settings), ("--capture", args.capture), ("--chunk-size", args.chunk_size)):
                cmd += [] if value is None else [flag, str(value)]
            timed = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            sized = json.loads(subprocess.run(cmd + ["--cold"], check=True, capture_output=True, text=True, env=env).stdout)
            rows.append({**timed, "peak_extra_mib": sized["peak_extra_mib"]})
    planted = f"{args.large_share:.0%} of rows" if args.large_share is not None else f"{args.large_rows} rows"
    data = f"layer {args.layer} of {args.capture}" if args.capture else f"random, planted large: {planted}"
    sb = f"layer {args.layer} of {args.settings}" if args.settings else f"threshold 3, degree {args.degree}"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads; causal "
          f"{'forward+backward' if args.backward else 'forward'}; 9 q heads / 3 kv heads, head dim 64; inputs: {data}; "
          f"support basis: {sb}; sink_window: 4 sinks, window {args.window}; block_support: {args.block}; "
          f"chunk size {args.chunk_size or 'default'}")
    sdpa = {r["n"]: r["seconds"] for r in rows if r["method"] == "sdpa"}
    print(f"{'n':>6} {'method':>14} {'seconds':>9} {'vs sdpa':>8} {'pairs exact':>12} {'kernel work':>12} {'peak extra MiB':>15}")
    for r in rows:
        ratio = f"{r['seconds'] / sdpa[r['n']]:.2f}x" if r["n"] in sdpa else "-"
        print(f"{r['n']:>6} {r['method']:>14} {r['seconds']:>9.3f} {ratio:>8} {100 * r['exact_pair_share']:>11.1f}% "
              f"{100 * r['kernel_share']:>11.1f}% {r['peak_extra_mib']:>15.1f}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "op_scaling.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    from plotting import loglog_panels

    try:
        loglog_panels(rows, methods, [
            (lambda r: r["seconds"], "seconds", f"causal {'forward+backward' if args.backward else 'forward'} time"),
            (lambda r: max(r["peak_extra_mib"], 1e-1), "peak extra MiB", "peak memory"),
        ], "sequence length", out / "op_scaling.png")
    except ImportError:  # no matplotlib: the table and JSON only
        pass


if __name__ == "__main__":
    main()
