"""Time and peak memory of the fast support-basis op vs sequence length, with a fixed number (or
share) of large rows, next to causal SDPA and eager attention, forward or forward+backward.
Each point runs in two fresh subprocesses: one for the time (the default allocator), one for
the memory, with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` so freed blocks go back to the system and
peak RSS follows the live tensors (with the default, glibc keeps freed blocks of growing sizes, and
peak RSS measures the allocator's retention as much as the op).

    python benchmarks/op_scaling.py                 # forward, n = 512..4096
    python benchmarks/op_scaling.py --lengths 1024,2048,4096,8192 --large-rows 64
    python benchmarks/op_scaling.py --backward --large-share 0.05 --methods support_basis,sdpa,eager \
        --lengths 1024,2048,4096,8192 --output runs/train_memory   # training: forward+backward

Prints a table and writes JSON (and a PNG when matplotlib is installed) to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path


def eager_attention(q, k, v):
    """Causal softmax attention with the full score matrix, as transformers' eager backend."""
    import torch

    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    n = q.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v


def measure(method: str, n: int, large_rows: int, degree: int, threads: int, backward: bool) -> dict:
    import torch

    from sb_hf.ops import support_basis_attention

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, d, threshold = 9, 3, 64, 3.0
    q = (torch.randn(1, heads, n, d, generator=g) * 0.5).clamp(-2.5, 2.5)
    k = (torch.randn(1, kv_heads, n, d, generator=g) * 0.5).clamp(-2.5, 2.5)
    v = torch.randn(1, kv_heads, n, d, generator=g)
    rows = torch.randperm(n, generator=g)[:large_rows]
    q[:, :, rows, 0] = 6.0  # planted large rows: the exact part
    k[:, :, rows, 1] = 6.0
    ops = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "eager": lambda: eager_attention(q, k, v),
        "support_basis": lambda: support_basis_attention(q, k, v, threshold=threshold, degree=degree),
    }
    small = (q[:, :, :16].detach(), k[:, :, :16].detach(), v[:, :, :16].detach())
    support_basis_attention(*small, threshold=threshold, degree=degree, evaluation="features")  # warm caches
    support_basis_attention(*small, threshold=threshold, degree=degree, evaluation="scores")
    for x in (q, k, v):
        x.requires_grad_(backward)
    grad_out = torch.randn(1, heads, n, d, generator=g) if backward else None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = ops[method]()
        if backward:
            out.backward(grad_out)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    return {"method": method, "n": n, "large_rows": large_rows, "backward": backward, "seconds": seconds,
            "peak_extra_mib": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="512,1024,2048,4096")
    parser.add_argument("--methods", default="sdpa,support_basis", help="comma list of sdpa, eager, support_basis")
    parser.add_argument("--large-rows", type=int, default=64, help="planted large rows (fixed count)")
    parser.add_argument("--large-share", type=float, default=None, help="planted large rows as a share of n (overrides --large-rows)")
    parser.add_argument("--backward", action="store_true", help="time forward+backward (training) instead of forward")
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="runs/op_scaling")
    parser.add_argument("--point", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        method, n = args.point.split(":")
        print(json.dumps(measure(method, int(n), args.large_rows, args.degree, args.threads, args.backward)))
        return

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - {"sdpa", "eager", "support_basis"}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        large = round(args.large_share * n) if args.large_share is not None else args.large_rows
        for method in methods:
            cmd = [sys.executable, __file__, "--point", f"{method}:{n}", "--large-rows", str(large),
                   "--degree", str(args.degree), "--threads", str(args.threads)] + (["--backward"] if args.backward else [])
            timed = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
            sized = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
            rows.append({**timed, "peak_extra_mib": sized["peak_extra_mib"]})
    planted = f"{args.large_share:.0%} of rows" if args.large_share is not None else f"{args.large_rows} rows"
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads; causal "
          f"{'forward+backward' if args.backward else 'forward'}; 9 q heads / 3 kv heads, head dim 64; "
          f"planted large: {planted}; degree {args.degree}")
    print(f"{'n':>6} {'method':>14} {'seconds':>9} {'peak extra MiB':>15}")
    for r in rows:
        print(f"{r['n']:>6} {r['method']:>14} {r['seconds']:>9.3f} {r['peak_extra_mib']:>15.1f}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "op_scaling.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in methods:
        pts = [r for r in rows if r["method"] == method]
        axes[0].loglog([r["n"] for r in pts], [r["seconds"] for r in pts], "o-", label=method)
        axes[1].loglog([r["n"] for r in pts], [max(r["peak_extra_mib"], 1e-1) for r in pts], "o-", label=method)
    axes[0].set(xlabel="sequence length", ylabel="seconds",
                title=f"causal {'forward+backward' if args.backward else 'forward'} time")
    axes[1].set(xlabel="sequence length", ylabel="peak extra MiB", title="peak memory")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "op_scaling.png", dpi=100)


if __name__ == "__main__":
    main()
