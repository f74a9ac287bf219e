"""Per-token attention cost of decoding vs context length: SDPA against support basis's decoding step, over
every layer of a model's settings (summed), one query token against n cached keys.

    python benchmarks/decode_step.py --settings runs/calibrate_q_8k/budget_0.05/support_basis.json \
        --capture runs/capture8k_all.safetensors --lengths 2048,4096,8000 --output runs/decode_step

Support basis runs each layer as the model does when decoding (:func:`sb_hf.integrations.plan.layer_plan`: one
call for the layer with per-head structure, or one call per group of heads), with its decoding state
(:mod:`sb_hf.ops.support_basis.decoding`) filled by a first step at position n - 1 (its time is reported apart: the
prompt's keys folded at once), then --steps steps at positions n, n + 1, ... each adding a key; the median
step is reported. SDPA runs the same steps, and SDPA over the local bands alone, per KV head the widest
window of its query heads (the keys the step must read exactly, a floor at long contexts). One more step is profiled for its count of
top-level ATen calls per layer. Keys and queries: the capture's (real activations; n + steps + 1 up to its length) or random ones
(any n). Prints the machine, a table, and writes JSON and a PNG to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def layer_inputs(capture, layer: int, n: int, seed: int):
    """q ``(1, 9, n, 64)`` and k/v ``(1, 3, n, 64)`` of a captured layer, or random ones; and the score scale."""
    import torch

    if capture is not None:
        q, k, v = (capture.layers[layer][name].float()[:, :, :n] for name in ("q", "k", "v"))
        if q.shape[2] < n:
            raise SystemExit(f"the capture holds {q.shape[2]} tokens, fewer than the n + steps + 1 = {n} needed")
        groups = capture.num_key_value_groups  # the capture stores k/v once per query head
        return q.contiguous(), k[:, ::groups].contiguous(), v[:, ::groups].contiguous(), float(capture.meta["scale"])
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, 64, generator=g) for heads in (9, 3, 3))
    return q, k, v, 64**-0.5


def layer_step(settings, layer: int, q_heads: int, kv_heads: int, scale: float, stats: dict | None):
    """A decoding step of one layer as the model runs it, with fresh decoding state(s)."""
    from sb_hf.config import SupportBasisConfig
    from sb_hf.integrations.plan import attention_groups, layer_plan
    from sb_hf.ops import support_basis_attention
    from sb_hf.ops.decoding import DecodingState, decoding_attention
    from sb_hf.ops.heads import grouped_attention

    layer_settings = SupportBasisConfig.from_dict(settings).for_layer(layer)
    groups, per_query_head = attention_groups(layer_settings, "support_basis", "cpu", q_heads, kv_heads)
    plan = layer_plan("support_basis", groups, per_query_head, q_heads, kv_heads)
    if plan is not None:
        state = DecodingState()
        return lambda q, k, v: decoding_attention(q, k, v, state, polynomial=plan[0], units=plan[1], scale=scale, stats=stats)
    states = [DecodingState() for _ in groups]
    return lambda q, k, v: grouped_attention(support_basis_attention, q, k, v, groups, per_query_head=per_query_head,
                                             decoding_states=states, scale=scale, stats=stats)


def widest_bands(settings, layer: int, q_heads: int, kv_heads: int) -> list[int]:
    """Per KV head, the longest local window of its query heads (a head computed exactly reaches every key):
    the last keys of that KV head a decoding step must read exactly for its band, whatever else it does."""
    from sb_hf.config import SupportBasisConfig
    from sb_hf.integrations.plan import attention_groups, polynomial_of
    from sb_hf.ops.decoding import EVERY_KEY

    layer_settings = SupportBasisConfig.from_dict(settings).for_layer(layer)
    groups, per_query_head = attention_groups(layer_settings, "support_basis", "cpu", q_heads, kv_heads)
    rep = q_heads // kv_heads
    widest = [0] * kv_heads
    for heads, kwargs in groups:
        window = EVERY_KEY if polynomial_of("support_basis", kwargs).threshold == 0 else kwargs.get("local_window", 0)
        for head in heads:
            kv_head = head // rep if per_query_head else head
            widest[kv_head] = max(widest[kv_head], window)
    return widest


def measure(settings, capture, layers, n: int, steps: int, cpu_kernel: bool = False) -> dict:
    """Timed steps at positions n .. n + steps - 1 (after a first step at n - 1), summed over the layers; the
    share of the visible pairs the step at position n computes exactly (counted in an untimed step); and the
    top-level ATen calls of the step at position n + steps per layer (profiled, untimed): in eager PyTorch each
    costs microseconds whatever its size, the floor of a step's time at short contexts. Also SDPA over the
    local bands alone, one call per KV head over the widest window of its query heads (the last keys every step
    must read exactly at these settings): a floor of a step's time at long contexts, however fused. ``cpu_kernel``:
    also the step with :mod:`sb_hf.ops.cpu_kernel` (its own state), timed in the same loop."""
    import torch

    from sb_hf.ops.cpu_kernel import use_cpu_kernel

    sdpa_times, sb_times, band_times, first, stats, calls = [0.0] * steps, [0.0] * steps, [0.0] * steps, 0.0, {}, 0
    kernel_times, kernel_first = [0.0] * steps, 0.0
    for layer in layers:
        q, k, v, scale = layer_inputs(capture, layer, n + steps + 1, seed=layer)
        sdpa = lambda t: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], scale=scale, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        bands = [(h, w) for h, w in enumerate(widest_bands(settings, layer, q.shape[1], k.shape[1])) if w]

        def sdpa_bands(t):  # one call per KV head: its query heads over its widest band
            for h, w in bands:
                lo = max(t + 1 - w, 0)
                torch.nn.functional.scaled_dot_product_attention(
                    q[:, h * rep : (h + 1) * rep, t : t + 1], k[:, h : h + 1, lo : t + 1], v[:, h : h + 1, lo : t + 1],
                    scale=scale, enable_gqa=True)
        step = layer_step(settings, layer, q.shape[1], k.shape[1], scale, None)  # no pair counts in the timed steps
        kernel_step = layer_step(settings, layer, q.shape[1], k.shape[1], scale, None) if cpu_kernel else None

        def timed_kernel_step(t):
            use_cpu_kernel(True)
            start = time.perf_counter()
            kernel_step(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])
            elapsed = time.perf_counter() - start
            use_cpu_kernel(False)
            return elapsed

        with torch.no_grad():
            start = time.perf_counter()
            step(q[:, :, n - 1 : n], k[:, :, :n], v[:, :, :n])
            first += time.perf_counter() - start
            if cpu_kernel:
                kernel_first += timed_kernel_step(n - 1)
            for i in range(steps):
                t = n + i
                start = time.perf_counter()
                sdpa(t)
                sdpa_times[i] += time.perf_counter() - start
                start = time.perf_counter()
                sdpa_bands(t)
                band_times[i] += time.perf_counter() - start
                start = time.perf_counter()
                step(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])
                sb_times[i] += time.perf_counter() - start
                if cpu_kernel:
                    kernel_times[i] += timed_kernel_step(t)
            t = n + steps
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                step(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1])
            calls += sum(1 for e in profile.events() if e.cpu_parent is None and e.name.startswith("aten::"))
            counted = layer_step(settings, layer, q.shape[1], k.shape[1], scale, stats)
            counted(q[:, :, n : n + 1], k[:, :, : n + 1], v[:, :, : n + 1])
    return {"n": n, "sdpa_ms": 1000 * statistics.median(sdpa_times), "support_basis_ms": 1000 * statistics.median(sb_times),
            "band_sdpa_ms": 1000 * statistics.median(band_times), "first_step_ms": 1000 * first, "exact_pair_share": float(stats["exact_pairs"] / stats["pairs"]),
            "aten_calls_per_layer": calls / len(layers),
            **({"cpu_kernel_ms": 1000 * statistics.median(kernel_times), "cpu_kernel_first_step_ms": 1000 * kernel_first}
               if cpu_kernel else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, help="support-basis settings file (sb-hf calibrate's support_basis.json)")
    parser.add_argument("--capture", default=None, help="capture file (sb-hf capture): real queries and keys (default: random)")
    parser.add_argument("--layers", default=None, help="comma list of layers (default: every layer of the settings, or 0-29)")
    parser.add_argument("--lengths", default="2048,4096,8000")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per length (default 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-kernel", action="store_true",
                        help="also time the step with sb_hf's C++ CPU kernel (sb_hf.ops.use_cpu_kernel; built on first use)")
    parser.add_argument("--output", default="runs/decode_step")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")

    import torch

    from sb_hf.config import load_settings

    torch.set_num_threads(args.threads)
    settings = load_settings(args.settings)
    capture = None
    if args.capture:
        from sb_hf.analysis.capture import load_capture

        capture = load_capture(args.capture)
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    else:
        layers = sorted(int(x) for x in settings.get("layers", {})) or list(range(30))
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        rows.append(measure(settings, capture, layers, n, args.steps, args.cpu_kernel))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads; settings: {args.settings}; "
          f"layers: {len(layers)}; inputs: {args.capture or 'random'}; 9 q heads / 3 kv heads, head dim 64; median of "
          f"{args.steps} steps, summed over the layers")
    print(f"{'n':>6} {'sdpa ms':>9} {'support basis ms':>17} {'vs sdpa':>8} {'band sdpa ms':>13} {'first step ms':>14} "
          f"{'pairs exact':>12} {'ATen calls/layer':>17}" + (f" {'cpu kernel ms':>14} {'vs sdpa':>8}" if args.cpu_kernel else ""))
    for r in rows:
        print(f"{r['n']:>6} {r['sdpa_ms']:>9.2f} {r['support_basis_ms']:>17.2f} {r['support_basis_ms'] / r['sdpa_ms']:>7.2f}x "
              f"{r['band_sdpa_ms']:>13.2f} {r['first_step_ms']:>14.1f} {100 * r['exact_pair_share']:>11.1f}% "
              f"{r['aten_calls_per_layer']:>17.0f}"
              + (f" {r['cpu_kernel_ms']:>14.2f} {r['cpu_kernel_ms'] / r['sdpa_ms']:>7.2f}x" if args.cpu_kernel else ""))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_step.json").write_text(json.dumps({"args": vars(args), "layers": layers, "rows": rows}, indent=2))
    from plotting import loglog_panels

    methods = ("sdpa", "support_basis") + (("cpu_kernel",) if args.cpu_kernel else ())
    points = [{"method": method, "n": r["n"], "ms": r[f"{method}_ms"]} for r in rows for method in methods]
    try:
        loglog_panels(points, methods, [(lambda r: r["ms"], "ms per token", "decoding step, all layers")],
                      "cached tokens", out / "decode_step.png")
    except ImportError:  # no matplotlib: the table and JSON only
        pass


if __name__ == "__main__":
    main()
