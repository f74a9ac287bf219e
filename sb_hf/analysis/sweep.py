"""Error and cost of every attention method over its settings, on captured real activations.

For each layer of a capture (post-RoPE q, k, v, one head count for all three) and each method
setting this measures, against exact causal attention on the same tensors:
- the relative Frobenius error of the attention output (per layer also per head, with each head's
  exact output norm, so that per-head errors pool back into the layer's),
- the relative Frobenius error of the attention matrix on a sample of query rows (dense
  weights from the naive twins in ``sb_hf.ops.reference``),
- the share of visible (query, key) pairs computed exactly,
- the modelled FLOPs relative to exact attention (:func:`modelled_flops`),
- the measured time relative to SDPA in the same run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import ops
from ..ops import large_rows, reference
from ..ops.polynomial import FeatureMap, check_kernel
from ..ops.support_basis import DEFAULT_CHUNK_SIZE
from .capture import Capture

OPS = {
    "support_basis": ("support_basis_attention", ("threshold", "degree")),
    "support_basis_multi": ("multi_threshold_attention", ("thresholds", "degrees")),
    "as23": ("as23_attention", ("degree",)),
    "sink_window": ("sink_window_attention", ("sinks", "local_window")),
}


@dataclass
class SweepResult:
    method: str
    settings: dict
    output_error: float  # relative Frobenius error of the output, all layers pooled
    matrix_error: float  # relative Frobenius error of the attention rows sampled, all layers pooled
    exact_pair_share: float
    flops_ratio: float
    time_ratio: float
    feature_dim: int
    per_layer: list[dict] = field(default_factory=list)


def bucket_thresholds(threshold: float, buckets: int = 3) -> list[float]:
    """``support_basis_multi``'s default buckets below ``threshold``: evenly spaced in magnitude."""
    return [round(threshold * (buckets - i) / buckets, 4) for i in range(buckets)]


def quantile_buckets(row_maxima: torch.Tensor, threshold: float, buckets: int = 3) -> list[float]:
    """Buckets below ``threshold`` evenly spaced in quantiles of the data: ``threshold``, then the
    ``(m-1)/m, ..., 1/m`` quantiles of the largest entry of the rows that are not large (so each
    bucket holds about the same number of rows). ``row_maxima``: ``max |entry|`` of sample rows."""
    small = row_maxima[row_maxima <= threshold].double()
    if small.numel() < buckets:
        raise ValueError(f"only {small.numel()} rows lie below threshold {threshold}; need at least {buckets}")
    levels = torch.tensor([(buckets - b) / buckets for b in range(1, buckets)], dtype=torch.float64)
    lower = [round(float(x), 4) for x in torch.quantile(small, levels)]
    out = [threshold]
    for t in lower:
        if t < out[-1]:  # ties between quantiles merge buckets
            out.append(t)
    return out


def capture_row_maxima(capture: Capture, max_rows: int = 200_000) -> torch.Tensor:
    """``max |entry|`` of every q and k row of a capture (a strided sample beyond ``max_rows``)."""
    parts = [capture.layers[i][name].abs().amax(dim=-1).flatten() for i in sorted(capture.layers) for name in ("q", "k")]
    maxima = torch.cat(parts).float()
    return maxima[:: max(1, maxima.numel() // max_rows)]


def grid(methods, thresholds, degrees, sinks, windows, sketch_dims=(None,), buckets=bucket_thresholds,
         kernels=("chebyshev",), sb_sinks=0, sb_windows=(0,)) -> list[tuple[str, dict]]:
    """The (method, settings) pairs of a sweep (``sketch_dims``: None for exact features;
    ``buckets``: threshold -> the thresholds of ``support_basis_multi``; ``kernels``: polynomial kernels,
    the squared and taylor ones only at even degrees; ``sb_sinks``, ``sb_windows``: the exact sinks and
    local windows of the support-basis points, 0 for none; ``sinks``, ``windows``: sink_window's)."""
    points = []
    structures = [({} if not sb_sinks else {"sinks": sb_sinks}) | ({} if not w else {"local_window": w}) for w in sb_windows]
    # the kernel always explicit: a model's settings without one take the method's default (taylor for support basis)
    plain = [({} if r is None else {"sketch_dim": r}) | {"kernel": kernel} for kernel in kernels for r in sketch_dims]
    sketches = [p | x for p in plain for x in structures]
    for kernel in kernels:  # before any point runs, with the ops' own rule
        check_kernel(kernel, degrees if any(m != "sink_window" for m in methods) else [])
    for method in methods:
        if method == "support_basis":
            points += [(method, {"threshold": t, "degree": g, **x}) for x in sketches for g in degrees for t in thresholds]
        elif method == "support_basis_multi":
            points += [(method, {"thresholds": buckets(t), "degrees": g, **x})
                       for x in sketches for g in degrees for t in thresholds]
        elif method == "as23":
            points += [(method, {"degree": g, **x}) for x in plain for g in degrees]  # the baseline as published
        elif method == "sink_window":
            points += [(method, {"sinks": sinks, "local_window": w}) for w in windows]
        else:
            raise ValueError(f"unknown method {method!r}; choose from {sorted(OPS)}")
    return points


def modelled_flops(method: str, settings: dict, *, q: torch.Tensor, k: torch.Tensor, stats: dict) -> tuple[float, float]:
    """(method FLOPs, exact FLOPs) for one layer, multiply-adds counted as 2.

    exact: ``4 d`` per visible pair (``q.k`` and ``p v``).
    sink_window: ``4 d`` per pair kept.
    support_basis / support_basis_multi / as23: ``4 d`` per exact pair, plus for the polynomial part
    with ``r`` features (summed over the buckets; a sketch of ``m`` projections costs ``m d`` per feature
    to build, not counted apart):
    building features (``r`` per small row), the key state update and the query readout
    (``2 r (d + 1)`` per small key and per small query), and the explicit in-chunk block
    (``2 C (r + d + 1)`` per small query, C = chunk size).
    """
    d = q.shape[-1]
    exact = 4.0 * d * float(stats["pairs"])
    cost = 4.0 * d * float(stats["exact_pairs"])
    if method in ("support_basis", "support_basis_multi", "as23"):
        threshold = settings["thresholds"][0] if "thresholds" in settings else settings.get("threshold", math.inf)
        r = features(d, settings)
        small_q = float(stats["rows"] - stats["exact_rows"])
        small_k = float((~large_rows(k, threshold)).sum())
        chunk = settings.get("chunk_size") or DEFAULT_CHUNK_SIZE
        cost += (small_q + small_k) * r + (small_q + small_k) * 2 * r * (d + 1) + small_q * 2 * chunk * (r + d + 1)
    return cost, exact


def features(d: int, settings: dict) -> int:
    """Feature dimension of the polynomial part (all buckets) for a method's settings; 0 without one."""
    if "thresholds" in settings:
        buckets = len(settings["thresholds"])
        degrees = settings["degrees"] if isinstance(settings["degrees"], list) else [settings["degrees"]] * buckets
        return sum(FeatureMap(d, g, settings.get("sketch_dim"), kernel=settings.get("kernel", "chebyshev")).dim
                   for g in degrees)
    if "degree" in settings:
        return FeatureMap(d, settings["degree"], settings.get("sketch_dim"), kernel=settings.get("kernel", "chebyshev")).dim
    return 0


def _exact_output(q, k, v, scale, sliding_window):
    n = q.shape[2]
    if sliding_window is None or sliding_window >= n:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    pos = torch.arange(n)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - sliding_window)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _sample_rows(n: int, count: int) -> list[int]:
    """Evenly spread query positions, always including the last (it sees every key)."""
    if count >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})


def _matrix_error_terms(method, settings, q, k, v, scale, sliding_window, rows) -> tuple[float, float]:
    """Squared Frobenius norms of (approx - exact) and of exact over the sampled query rows."""
    twin = getattr(reference, OPS[method][0])
    diff = ref = 0.0
    for p in rows:
        args = (q[:, :, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1])
        common = dict(scale=scale, sliding_window=sliding_window, return_weights=True)
        approx = twin(*args, **settings, **common)
        exact = reference.exact_attention(*args, **common)
        diff += float((approx.double() - exact.double()).pow(2).sum())
        ref += float(exact.double().pow(2).sum())
    return diff, ref


def layer_op_settings(settings: dict, layer: int) -> dict:
    """A point's op settings for one layer: ``settings`` with ``settings["layers"][layer]`` merged in
    (per-layer values such as the key columns' mean queries)."""
    out = {key: value for key, value in settings.items() if key != "layers"}
    return out | settings.get("layers", {}).get(layer, {})


@torch.no_grad()
def sweep_capture(
    capture: Capture, points: list[tuple[str, dict]], *, matrix_rows: int = 32, progress: bool = True
) -> list[SweepResult]:
    """Run every (method, settings) point on every layer of ``capture``."""
    from tqdm.auto import tqdm

    scale = float(capture.meta["scale"])
    window = None if capture.meta.get("sliding_window", "none") == "none" else int(capture.meta["sliding_window"])
    layers = sorted(capture.layers)
    exact_out, exact_time = {}, {}
    for i in layers:
        q, k, v = (capture.layers[i][name].float() for name in ("q", "k", "v"))
        start = time.perf_counter()
        exact_out[i] = _exact_output(q, k, v, scale, window)
        exact_time[i] = time.perf_counter() - start

    results = []
    for method, settings in tqdm(points, desc="sweep", disable=not progress):
        op = getattr(ops, OPS[method][0])
        totals = dict(err=0.0, ref=0.0, mdiff=0.0, mref=0.0, exact_pairs=0.0, pairs=0.0, flops=0.0, exact_flops=0.0,
                      time=0.0, exact_time=0.0)
        per_layer = []
        for i in layers:
            q, k, v = (capture.layers[i][name].float() for name in ("q", "k", "v"))
            stats: dict = {}
            layer_settings = layer_op_settings(settings, i)
            start = time.perf_counter()
            out = op(q, k, v, scale=scale, sliding_window=window, stats=stats, **layer_settings)
            seconds = time.perf_counter() - start
            head_err = (out - exact_out[i]).double().pow(2).sum(dim=(0, 2, 3))  # (heads,)
            head_ref = exact_out[i].double().pow(2).sum(dim=(0, 2, 3))
            err, ref = float(head_err.sum()), float(head_ref.sum())
            mdiff, mref = _matrix_error_terms(method, layer_settings, q, k, v, scale, window,
                                              _sample_rows(q.shape[2], matrix_rows))
            flops, exact_flops = modelled_flops(method, layer_settings, q=q, k=k, stats=stats)
            layer = dict(
                layer=i, output_error=math.sqrt(err / ref), matrix_error=math.sqrt(mdiff / mref),
                exact_pair_share=float(stats["exact_pairs"]) / float(stats["pairs"]),
                flops_ratio=flops / exact_flops, time_ratio=seconds / exact_time[i],
                head_output_error=(head_err / head_ref).sqrt().tolist(), head_output_norm=head_ref.sqrt().tolist(),
            )
            per_layer.append(layer)
            for key, value in (("err", err), ("ref", ref), ("mdiff", mdiff), ("mref", mref),
                               ("exact_pairs", float(stats["exact_pairs"])), ("pairs", float(stats["pairs"])),
                               ("flops", flops), ("exact_flops", exact_flops), ("time", seconds),
                               ("exact_time", exact_time[i])):
                totals[key] += value
        d = capture.layers[layers[0]]["q"].shape[-1]
        results.append(SweepResult(
            method=method, settings=settings,
            output_error=math.sqrt(totals["err"] / totals["ref"]),
            matrix_error=math.sqrt(totals["mdiff"] / totals["mref"]),
            exact_pair_share=totals["exact_pairs"] / totals["pairs"],
            flops_ratio=totals["flops"] / totals["exact_flops"],
            time_ratio=totals["time"] / totals["exact_time"],
            feature_dim=features(d, settings),
            per_layer=per_layer,
        ))
    return results


def label(result: SweepResult) -> str:
    return result.method + "(" + ", ".join(f"{k}={v}" for k, v in result.settings.items()) + ")"


def markdown_table(results: list[SweepResult]) -> str:
    lines = [
        "| method | settings | output error | matrix error | pairs exact | modelled FLOPs vs exact | time vs SDPA |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        settings = ", ".join(f"{k}={v}" for k, v in r.settings.items())
        lines.append(
            f"| {r.method} | {settings} | {100 * r.output_error:.1f}% | {100 * r.matrix_error:.1f}% "
            f"| {100 * r.exact_pair_share:.1f}% | {100 * r.flops_ratio:.1f}% | {r.time_ratio:.1f}x |"
        )
    return "\n".join(lines)


def write_results(results: list[SweepResult], meta: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"capture": meta, "results": [asdict(r) for r in results]}, indent=2))
    (out / "sweep.md").write_text(markdown_table(results) + "\n")
    plot(results, out / "sweep.png")


def plot(results: list[SweepResult], path: str | Path) -> None:
    """Left: output error vs threshold (support basis, one line per degree; AS23a as dashed levels).
    Right: output error vs modelled FLOPs share, every method (the Pareto view)."""
    from ..figures import pyplot

    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    lines: dict = {}
    for r in results:
        if r.method in ("support_basis", "support_basis_multi"):
            threshold = r.settings["thresholds"][0] if "thresholds" in r.settings else r.settings["threshold"]
            degree = r.settings.get("degree", r.settings.get("degrees"))
            key = (r.method, str(degree), r.settings.get("sketch_dim"), r.settings.get("kernel", "chebyshev"))
            lines.setdefault(key, []).append((threshold, r.output_error))
    for (method, degree, sketch, kernel), pts in sorted(lines.items(), key=str):
        pts.sort()
        name = "support basis" if method == "support_basis" else "multi-threshold"
        sketched = ("" if sketch is None else f", sketch {sketch}") + ("" if kernel == "chebyshev" else f", {kernel}")
        left.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{name}, degree {degree}{sketched}")
    for r in results:
        if r.method == "as23":
            variant = "".join(f", {key} {r.settings[key]}" for key in ("sketch_dim", "kernel") if key in r.settings)
            left.axhline(r.output_error, linestyle="--", color="gray", label=f"AS23a, degree {r.settings['degree']}{variant}")
    left.set(xlabel="threshold (absolute, post-RoPE entries)", ylabel="relative output error", yscale="log",
             title="error vs threshold")
    left.legend(fontsize=8)
    markers = {"support_basis": "o", "support_basis_multi": "D", "as23": "s", "sink_window": "^"}
    for method in markers:
        pts = [r for r in results if r.method == method]
        if pts:
            right.scatter([r.flops_ratio for r in pts], [r.output_error for r in pts], marker=markers[method], label=method)
    right.set(xlabel="modelled FLOPs / exact", ylabel="relative output error", yscale="log", xscale="log",
              title="error vs cost")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
