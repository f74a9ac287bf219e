"""Are post-RoPE query/key entries sub-Gaussian? Per-head entry statistics, tables and the
paper's entry-histogram figure, on activations captured from real text (:mod:`sb_hf.analysis.capture`).

The paper (arXiv 2510.01643) assumes sub-Gaussian query/key entries, so that only a few rows
(tokens' per-head vectors) have an entry above a threshold ``T ~ sqrt(log n)`` and are computed
exactly. This module measures, per (layer, head, q or k):

- ``mean``, ``std`` (population), ``kurtosis`` (non-excess: 3 for a Gaussian), ``max_abs``;
- for ``k`` in 3, 4, 5: the tail mass ``P(|x - mean| > k std)`` (``tail_{k}std``), the Gaussian
  prediction ``2 (1 - Phi(k))`` (``gauss_tail_{k}std``) and their ratio (``tail_ratio_{k}std``);
- ``sqrt_log_n`` (``n`` = sequence length, natural log);
- the fraction of **rows** that would be large (any ``|entry| > T``, the method's rule, on raw
  entries) for every absolute threshold given (``large_rows_T{T}``), for ``T = c std`` with ``c``
  in 3, 4, 5 (``large_rows_{c}std``, with the prediction for centred Gaussian entries
  ``1 - (1 - 2(1 - Phi(c)))^d`` as ``gauss_large_rows_{c}std``), and for ``T = sqrt(log n)`` and
  ``T = sqrt(log n) std``; thresholds apply to the raw entries, not centred ones, as in the method;
- ``entry_tail_budget = 1 / head_dim``: for rows of ``d`` entries to be rarely large, the
  per-entry tail probability at ``T`` must be well below ``1/d`` (a row is large with probability
  about ``d`` times the per-entry tail); ``threshold_for_budget`` is the smallest ``T`` whose
  empirical per-entry tail ``P(|x| > T)`` is at most ``1/d`` (also in std units).

Verdict per head (``VERDICT_RULE`` holds this as README-ready text): "sub-Gaussian plausible"
when the kurtosis is below 4 and the mass beyond 4 std is at most 3x the Gaussian prediction,
otherwise "heavy-tailed" ("degenerate" for a zero standard deviation).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from statistics import median
from typing import Iterable, Sequence

import torch

from .capture import Capture

DEFAULT_THRESHOLDS = (2.5, 4.0, 6.0, 8.0)
STD_MULTIPLES = (3, 4, 5)
VERDICT_RULE = (
    "Verdict per head: **sub-Gaussian plausible** when the kurtosis of its entries is below 4 "
    "(Gaussian: 3) and the empirical mass beyond 4 standard deviations from the mean is at most 3 "
    "times the Gaussian prediction 2(1 - Phi(4)) = 6.3e-5; otherwise **heavy-tailed** "
    "(\"degenerate\" for a zero standard deviation). The 4-std test needs enough entries to mean "
    "something: a Gaussian gives one exceedance per 16k entries, so one head of 2048 tokens x 64 "
    "dims (131k entries) expects 8."
)
SUB_GAUSSIAN = "sub-Gaussian plausible"
HEAVY_TAILED = "heavy-tailed"
DEGENERATE = "degenerate"
KURTOSIS_LIMIT = 4.0
TAIL_RATIO_LIMIT = 3.0


def gaussian_tail(k: float) -> float:
    """``P(|Z| > k)`` for a standard Gaussian: ``2 (1 - Phi(k))``."""
    return math.erfc(k / math.sqrt(2.0))


def threshold_key(t: float) -> str:
    return f"large_rows_T{float(t):g}"


def entry_statistics(
    x: torch.Tensor,
    *,
    n: int | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    std_multiples: Sequence[int] = STD_MULTIPLES,
) -> dict:
    """Statistics of one head's entries ``x``: ``(seq, head_dim)``, or ``(..., seq, head_dim)``
    (leading axes are flattened into rows). ``n`` is the sequence length used for ``sqrt(log n)``
    (default ``x.shape[-2]``). See the module docstring for the keys; the verdict rule:

    "sub-Gaussian plausible" when ``kurtosis < 4`` and ``tail_4std <= 3 * gauss_tail_4std``,
    otherwise "heavy-tailed" ("degenerate" when the standard deviation is 0).
    """
    x = torch.as_tensor(x)
    if x.dim() < 2 or x.shape[-1] == 0 or x.numel() == 0:
        raise ValueError(f"x must be (seq, head_dim) with entries, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    n = int(x.shape[-2] if n is None else n)
    if n < 2:
        raise ValueError(f"n (sequence length) must be at least 2 for sqrt(log n), got {n}")
    rows = x.detach().reshape(-1, d).to(torch.float64)
    if not torch.isfinite(rows).all():
        raise ValueError("x has non-finite entries")
    flat = rows.reshape(-1)
    entries = flat.numel()
    mean = flat.mean()
    centered = flat - mean
    var = centered.square().mean()
    std = var.sqrt()
    degenerate = bool(std == 0)
    kurtosis = float("nan") if degenerate else float(centered.pow(4).mean() / var.square())
    abs_flat = flat.abs()
    row_max = rows.abs().amax(dim=-1)
    std_f, mean_f = float(std), float(mean)
    sqrt_log_n = math.sqrt(math.log(n))

    stats: dict = {
        "entries": entries,
        "rows": rows.shape[0],
        "head_dim": d,
        "n": n,
        "mean": mean_f,
        "std": std_f,
        "kurtosis": kurtosis,
        "max_abs": float(abs_flat.max()),
        "max_abs_std": float("nan") if degenerate else float(abs_flat.max()) / std_f,
    }
    for k in std_multiples:
        gauss = gaussian_tail(k)
        tail = float("nan") if degenerate else float((centered.abs() > k * std).double().mean())
        stats[f"tail_{k}std"] = tail
        stats[f"gauss_tail_{k}std"] = gauss
        stats[f"tail_ratio_{k}std"] = tail / gauss
    stats["sqrt_log_n"] = sqrt_log_n
    for t in thresholds:
        stats[threshold_key(t)] = _row_fraction(row_max, float(t))
    for c in std_multiples:
        stats[f"large_rows_{c}std"] = float("nan") if degenerate else _row_fraction(row_max, c * std_f)
        stats[f"gauss_large_rows_{c}std"] = -math.expm1(d * math.log1p(-gaussian_tail(c)))
    stats["large_rows_sqrt_log_n"] = _row_fraction(row_max, sqrt_log_n)
    stats["large_rows_sqrt_log_n_std"] = float("nan") if degenerate else _row_fraction(row_max, sqrt_log_n * std_f)
    stats["entry_tail_budget"] = 1.0 / d
    allowed = entries // d  # entries that may exceed T for a per-entry tail of at most 1/d
    budget_t = float(abs_flat.max()) if allowed == 0 else float(abs_flat.kthvalue(entries - allowed).values)
    stats["threshold_for_budget"] = budget_t
    stats["threshold_for_budget_std"] = float("nan") if degenerate else budget_t / std_f
    stats["verdict"] = verdict(stats)
    return stats


def _row_fraction(row_max: torch.Tensor, t: float) -> float:
    return float((row_max > t).double().mean())


def verdict(stats: dict) -> str:
    """The rule of :data:`VERDICT_RULE` applied to a statistics dict."""
    kurtosis, tail, gauss = stats["kurtosis"], stats["tail_4std"], stats["gauss_tail_4std"]
    if not (math.isfinite(kurtosis) and math.isfinite(tail)):
        return DEGENERATE
    if kurtosis < KURTOSIS_LIMIT and tail <= TAIL_RATIO_LIMIT * gauss:
        return SUB_GAUSSIAN
    return HEAVY_TAILED


def _head_rows(tensor: torch.Tensor, index: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Entries of head ``index`` of a ``(batch, heads, seq, d)`` tensor as ``(rows, d)``, real tokens only."""
    x = tensor[:, index]
    return x[mask] if mask is not None else x.reshape(-1, x.shape[-1])


def analyze_capture(
    capture: Capture,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    tensors: Iterable[str] = ("q", "k"),
) -> list[dict]:
    """One row per (layer, captured query head, tensor): ``layer``, ``head``, ``kv_head``, ``tensor``
    and :func:`entry_statistics` of that head's entries (padded positions excluded, ``n`` = the
    captured sequence length). ``k`` rows of query heads sharing a KV head are identical.
    ``tensors`` may also name ``q_pre_rope``/``k_pre_rope`` when they were captured."""
    rows = []
    mask = capture.attention_mask.bool() if capture.attention_mask is not None else None
    for layer in capture.layer_indices:
        named = capture.layers[layer]
        for name in tensors:
            if name not in named:
                raise KeyError(f"layer {layer} has no {name!r} tensor (captured: {sorted(named)})")
            tensor = named[name]
            heads, kv_heads = _heads(capture, tensor.shape[1])
            for index, (head, kv_head) in enumerate(zip(heads, kv_heads)):
                x = _head_rows(tensor, index, mask)
                stats = entry_statistics(x, n=tensor.shape[2], thresholds=thresholds)
                rows.append({"layer": layer, "head": head, "kv_head": kv_head, "tensor": name, **stats})
    return rows


def _heads(capture: Capture, count: int) -> tuple[list[int], list[int]]:
    heads = capture.heads or list(range(count))
    if len(heads) != count:
        raise ValueError(f"metadata lists {len(heads)} heads but the tensors have {count}")
    return heads, [h // capture.num_key_value_groups for h in heads]


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_tables(rows: list[dict], out_dir: str | Path, *, meta: dict | None = None) -> tuple[Path, Path]:
    """Write ``distributions.json`` (``{"meta", "verdict_rule", "rows"}``; non-finite numbers as null)
    and ``distributions.csv`` (one line per row, the union of the keys as columns) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / "distributions.json", out / "distributions.csv"
    clean = [{k: _jsonable(v) for k, v in row.items()} for row in rows]
    payload = {"meta": dict(meta or {}), "verdict_rule": VERDICT_RULE, "rows": clean}
    json_path.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in clean:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    return json_path, csv_path


# --------------------------------------------------------------------------------------------
# Summary table


def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return median(values) if values else float("nan")


def _unique_k(rows: list[dict]) -> list[dict]:
    """k rows once per (layer, KV head): query heads of one group share their key head."""
    seen, unique = set(), []
    for row in rows:
        key = (row["layer"], row.get("kv_head", row["head"]))
        if key not in seen:
            seen.add(key)
            unique.append(row)
    return unique


def _pair(rows_q, rows_k, fn, fmt) -> str:
    parts = []
    for rows in (rows_q, rows_k):
        value = fn(rows) if rows else float("nan")
        parts.append("-" if not math.isfinite(value) else fmt.format(value))
    return " / ".join(parts)


def summarize(rows: list[dict]) -> str:
    """A markdown table, one line per layer and one for all layers: median kurtosis of q and k
    entries over heads, the share of heads judged sub-Gaussian, and the median share of large
    rows at every absolute threshold in the rows and at 4 std. Cells read "q / k"; key heads
    shared by a GQA group are counted once."""
    thresholds = sorted({float(k.removeprefix("large_rows_T")) for row in rows for k in row if k.startswith("large_rows_T")})
    columns = [(f"large rows T={t:g}", threshold_key(t)) for t in thresholds] + [("large rows T=4 std", "large_rows_4std")]
    header = ["layer", "kurtosis (median)", "max abs (median)", "sub-Gaussian heads"] + [c for c, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def line(label, group):
        q = [r for r in group if r["tensor"] == "q"]
        k = _unique_k([r for r in group if r["tensor"] == "k"])
        cells = [
            label,
            _pair(q, k, lambda rs: _median([r["kurtosis"] for r in rs]), "{:.1f}"),
            _pair(q, k, lambda rs: _median([r["max_abs"] for r in rs]), "{:.1f}"),
            _pair(q, k, lambda rs: 100 * sum(r["verdict"] == SUB_GAUSSIAN for r in rs) / len(rs), "{:.0f}%"),
        ]
        for _, key in columns:
            cells.append(_pair(q, k, lambda rs, key=key: 100 * _median([r.get(key, float("nan")) for r in rs]), "{:.1f}%"))
        return "| " + " | ".join(cells) + " |"

    layers = sorted({r["layer"] for r in rows})
    for layer in layers:
        lines.append(line(str(layer), [r for r in rows if r["layer"] == layer]))
    if len(layers) > 1:
        lines.append(line("all", rows))
    n_values = sorted({r["n"] for r in rows})
    note = (
        "Cells: q / k. Kurtosis is non-excess (Gaussian 3). A row is large when any |entry| > T. "
        f"sqrt(log n) = {', '.join(f'{math.sqrt(math.log(n)):.2f} (n={n})' for n in n_values)}. "
        + VERDICT_RULE
    )
    return "\n".join(lines) + "\n\n" + note


# --------------------------------------------------------------------------------------------
# Figure


def _pooled(capture: Capture, layer: int, name: str) -> torch.Tensor:
    """All entries of one layer's tensor over the captured heads (key heads once), real tokens only."""
    tensor = capture.layers[layer][name]
    heads, kv_heads = _heads(capture, tensor.shape[1])
    if name.startswith("k") or name.startswith("v"):
        first = {}
        for index, kv in enumerate(kv_heads):
            first.setdefault(kv, index)
        tensor = tensor[:, sorted(first.values())]
    if capture.attention_mask is not None:
        tensor = tensor.transpose(1, 2)[capture.attention_mask.bool()]  # (rows, heads, d)
    return tensor.reshape(-1).to(torch.float64)


def plot_grid(capture: Capture, rows: list[dict], path: str | Path, *, bins: int = 121, dpi: int = 100) -> Path:
    """One-page PNG: one panel per captured layer with the log-density histograms of the q and k
    entries of all captured heads (pooled; key heads once), Gaussian curves with the same mean and
    std (dashed), and vertical lines at ``±sqrt(log n)`` (black) and ``±sqrt(log n) std`` (dotted,
    q and k colours). Panel titles give the median kurtosis over heads from ``rows``."""
    import numpy as np

    from ..figures import require_matplotlib

    require_matplotlib()  # (an ImportError that says what to install; this figure needs no pyplot)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    layers = capture.layer_indices
    if not layers:
        raise ValueError("the capture has no layers")
    count = len(layers)
    ncols = min(count, math.ceil(math.sqrt(count)))
    nrows = math.ceil(count / ncols)
    width = max(3.4 * ncols, 7.5)
    fig = Figure(figsize=(width, 2.7 * nrows + 1.4 + (1.6 if count == 1 else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    colors = {"q": "tab:blue", "k": "tab:orange"}
    n = int(capture.meta.get("tokens") or next(iter(capture.layers[layers[0]].values())).shape[2])
    sqrt_log_n = math.sqrt(math.log(n))

    for ax, layer in zip(axes.flat, layers):
        pooled = {name: _pooled(capture, layer, name).numpy() for name in ("q", "k")}
        lim = max(float(np.abs(v).max()) for v in pooled.values()) * 1.02 or 1.0
        edges = np.linspace(-lim, lim, bins + 1)
        grid = np.linspace(-lim, lim, 400)
        lowest, highest = math.inf, 0.0
        for name, values in pooled.items():
            density, _ = np.histogram(values, bins=edges, density=True)
            positive = density[density > 0]
            if positive.size:
                lowest, highest = min(lowest, positive.min()), max(highest, positive.max())
            ax.stairs(density, edges, color=colors[name], linewidth=1.0)
            mean, std = float(values.mean()), float(values.std())
            if std > 0:
                pdf = np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
                ax.plot(grid, pdf, color=colors[name], linestyle="--", linewidth=0.8)
                for sign in (-1, 1):
                    ax.axvline(sign * sqrt_log_n * std, color=colors[name], linestyle=":", linewidth=0.9)
        for sign in (-1, 1):
            ax.axvline(sign * sqrt_log_n, color="black", linewidth=0.8)
        ax.set_yscale("log")
        if math.isfinite(lowest):
            ax.set_ylim(lowest / 2, highest * 2)
        ax.set_xlim(-lim, lim)
        ax.tick_params(labelsize=7)
        kurt = {
            name: _median([r["kurtosis"] for r in rows if r["layer"] == layer and r["tensor"] == name])
            for name in ("q", "k")
        }
        ax.set_title(f"layer {layer}: kurtosis q {kurt['q']:.1f}, k {kurt['k']:.1f}", fontsize=8)
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)

    handles = [
        Line2D([], [], color=colors["q"], label="q entries"),
        Line2D([], [], color=colors["k"], label="k entries"),
        Line2D([], [], color="gray", linestyle="--", label="Gaussian, same mean and std"),
        Line2D([], [], color="black", label=f"±sqrt(log n) = ±{sqrt_log_n:.2f}"),
        Line2D([], [], color="gray", linestyle=":", label="±sqrt(log n)·std (q, k colours)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=5 if width >= 12 else 3, fontsize=8, frameon=False)
    heads = capture.meta.get("heads", "")
    model = Path(capture.meta.get("model", "")).name or "?"
    fig.suptitle(
        f"Post-RoPE q/k entries of {model}, n = {n} tokens, heads {heads or 'all'} pooled\n"
        "density on a log scale; panel titles: median kurtosis over heads (Gaussian: 3)",
        fontsize=9,
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
