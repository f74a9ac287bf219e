"""Per-layer calibration: the cheapest support-basis settings that meet an error budget on real activations.

For every captured layer, each candidate setting is run on the layer's q/k/v (the fast op, as the
model would run it) and scored by the relative Frobenius error of the attention output against
exact attention and by its modelled FLOPs (:func:`sb_hf.analysis.sweep.modelled_flops`). The layer
gets the cheapest candidate within the budget that saves at least ``min_saving`` of exact attention's
FLOPs, or exact attention (``threshold=0``) when none does.
Layers that were not captured stay exact. The result is a :class:`~sb_hf.config.SupportBasisConfig`
with per-layer entries, so a model saved with it loads calibrated through
``from_pretrained(..., attn_implementation="support_basis")``.

Each chosen setting also gets a run-time guard, ``radius_limit``: ``guard_margin`` times the widest
interval ``R_i`` its small query rows had on the calibration data (at most 150). A later input whose
rows need a wider interval, outside the calibrated range, has those rows computed exactly (they are
counted among the exact rows of ``attention_stats``).

Candidates may carry the structural exact part (``sinks``, ``local_window``) and a ``column_share``: the
calibration then measures each head's mean query on the capture and the score threshold the top share
of keys exceed (:func:`column_settings`), and a chosen candidate stores them per layer as
``column_queries``/``column_threshold`` (per head).

Settings are per layer (the column thresholds per head), or with ``per_kv_head`` per KV head, or with
``per_head`` per query head: each head of a layer takes a candidate or exact attention so that the layer's
error stays within the budget at the least mean FLOPs, stored as the layer's ``kv_heads`` or ``heads`` (the
model then runs one op call per group of heads that share settings, :mod:`sb_hf.ops.heads`). The capture
holds keys per query head, so each head's candidates are measured as a per-query-head run computes them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .analysis.capture import Capture
from .analysis.sweep import sweep_capture
from .config import SupportBasisConfig
from .ops import large_rows
from .ops.masking import visible_key_max
from .ops.support_basis import RADIUS_FLOOR, RADIUS_LIMIT

DEFAULT_THRESHOLDS = (12.0, 8.0, 6.0, 4.0, 3.0, 2.5)
EXACT = {"threshold": 0.0}


def default_candidates(thresholds=DEFAULT_THRESHOLDS, degree: int | list[int] = 2, kernel: str = "taylor", *,
                       sinks: int = 0, local_windows=(0,), column_shares=(0.0,)) -> list[dict[str, Any]]:
    """Support-basis settings to try: every threshold x degree x local window x column share (the taylor
    kernel: non-negative, so a negative row mass cannot occur, and centred on each query's scores).
    ``sinks``/``local_windows``: the exact structure (0: none); ``column_shares``: the share of keys each head's
    mean query makes exact columns (:func:`column_settings`; 0: no columns)."""
    degrees = degree if isinstance(degree, (list, tuple)) else [degree]
    out = []
    for t in thresholds:
        for g in degrees:
            for w in local_windows:
                for share in column_shares:
                    c = {"threshold": float(t), "degree": g, "kernel": kernel}
                    c |= ({"sinks": sinks} if sinks else {}) | ({"local_window": w} if w else {})
                    out.append(c | ({"column_share": float(share)} if share else {}))
    return out


def column_settings(q: torch.Tensor, k: torch.Tensor, scale: float, share: float) -> dict[str, torch.Tensor]:
    """The key columns of a captured layer (``q``, ``k``: ``(B, H, n, d)``, heads expanded): each head's mean
    query ``qbar_h`` over the calibration tokens, and the threshold on ``scale * qbar_h . k_j`` that the
    largest ``share`` of the head's keys exceed. A key-only rule, so it applies to any later text."""
    if not 0 < share < 1:
        raise ValueError(f"column_share must be in (0, 1), got {share!r}")
    mean_queries = q.double().mean(dim=(0, 2))  # (H, d)
    scores = scale * torch.einsum("bhnd,hd->hbn", k.double(), mean_queries).flatten(1)  # (H, B n)
    thresholds = torch.quantile(scores, 1 - share, dim=1)
    return {"column_queries": mean_queries.float(), "column_threshold": thresholds.float()}


@dataclass
class LayerChoice:
    layer: int
    settings: dict[str, Any]  # the chosen per-layer settings (EXACT when nothing met the budget)
    output_error: float  # of the chosen settings on the calibration data (0 for exact)
    exact_pair_share: float
    flops_ratio: float
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every candidate's measurements


@dataclass
class Calibration:
    budget: float
    layers: list[LayerChoice]
    meta: dict[str, Any]

    def config(self, **base: Any) -> SupportBasisConfig:
        """The settings to store on the model: exact by default (uncaptured layers), each calibrated
        layer's choice as a per-layer entry."""
        return SupportBasisConfig(**{"threshold": 0.0, **base}, layers={c.layer: dict(c.settings) for c in self.layers})

    def flops_ratio(self) -> float:
        """Mean modelled FLOPs vs exact over the calibrated layers (each layer weighs the same)."""
        return sum(c.flops_ratio for c in self.layers) / len(self.layers)

    def as_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "meta": self.meta, "flops_ratio": self.flops_ratio(),
                "layers": [asdict(c) for c in self.layers]}


def widest_interval(q: torch.Tensor, k: torch.Tensor, threshold: float, scale: float, window: int | None) -> float:
    """The widest interval ``R_i = scale |q_i| max |k_j|`` (over the small keys a causal query sees) of
    the small query rows of a captured layer (``q``, ``k``: ``(B, H, n, d)``, heads expanded), as the op computes it."""
    norms = torch.where(large_rows(k, threshold), torch.zeros(()), k.norm(dim=-1))
    radius = scale * q.norm(dim=-1) * visible_key_max(norms, window)
    radius = torch.where(large_rows(q, threshold), torch.zeros(()), radius)
    return max(float(radius.max()), RADIUS_FLOOR)


def calibrate(capture: Capture, *, budget: float, candidates: list[dict[str, Any]] | None = None,
              min_saving: float = 0.05, guard_margin: float = 1.25, per_kv_head: bool = False,
              per_head: bool = False, progress: bool = False) -> Calibration:
    """Choose per layer the candidate with the lowest modelled FLOPs whose output error is at most
    ``budget`` and whose FLOPs are at most ``1 - min_saving`` of exact attention's; guard it with
    ``radius_limit = guard_margin x`` the widest interval seen on the calibration data.
    ``per_kv_head``/``per_head``: a candidate (or exact attention) per KV head / per query head, the least
    mean FLOPs that keeps the layer's output error within ``budget`` (stored as the layer's ``kv_heads`` /
    ``heads``)."""
    return calibrate_budgets(capture, budgets=[budget], candidates=candidates, min_saving=min_saving,
                             guard_margin=guard_margin, per_kv_head=per_kv_head, per_head=per_head,
                             progress=progress)[0]


def calibrate_budgets(capture: Capture, *, budgets: list[float], candidates: list[dict[str, Any]] | None = None,
                      min_saving: float = 0.05, guard_margin: float = 1.25, per_kv_head: bool = False,
                      per_head: bool = False, progress: bool = False) -> list[Calibration]:
    """:func:`calibrate` for several budgets, measuring the candidates once: one calibration per budget."""
    if not budgets:
        raise ValueError("give at least one budget")
    for budget in budgets:
        if isinstance(budget, bool) or not (isinstance(budget, (int, float)) and budget >= 0):
            raise ValueError(f"budget must be a relative output error >= 0 (e.g. 0.05 for 5%), got {budget!r}")
    if isinstance(min_saving, bool) or not (isinstance(min_saving, (int, float)) and 0 <= min_saving < 1):
        raise ValueError(f"min_saving must be a share of exact FLOPs in [0, 1), got {min_saving!r}")
    if isinstance(guard_margin, bool) or not (isinstance(guard_margin, (int, float)) and guard_margin >= 1):
        raise ValueError(f"guard_margin must be a number >= 1 (1.25: 25% wider intervals than calibrated), got {guard_margin!r}")
    if per_kv_head and per_head:
        raise ValueError("choose settings per KV head (per_kv_head) or per query head (per_head), not both")
    candidates = default_candidates() if candidates is None else [dict(c) for c in candidates]
    if not candidates:
        raise ValueError("give at least one candidate setting")
    for c in candidates:
        SupportBasisConfig(**{key: value for key, value in c.items() if key != "column_share"})  # the config's messages
    scale = float(capture.meta["scale"])
    shares = sorted({c["column_share"] for c in candidates if c.get("column_share")})
    if shares or per_kv_head or per_head:
        _check_all_heads(capture, "key columns need a mean query for every head" if shares else
                         "per-head calibration needs every query head of the layer")
    units = 0  # heads that choose their own settings (0: the layer chooses one)
    if per_kv_head or per_head:
        units = int(capture.meta.get("num_key_value_heads" if per_kv_head else "num_attention_heads", 0) or 0)
        if units < 1:
            raise ValueError("per-head calibration needs the capture's head counts; capture again with this version")
    columns = {(share, i): column_settings(layer["q"].float(), layer["k"].float(), scale, share)
               for share in shares for i, layer in capture.layers.items()}  # (share, layer) -> column settings
    points = []
    for c in candidates:
        settings = {key: value for key, value in c.items() if key != "column_share"}
        if c.get("column_share"):
            settings["layers"] = {i: columns[c["column_share"], i] for i in capture.layers}
        points.append(("support_basis", settings))
    results = sweep_capture(capture, points, matrix_rows=1, progress=progress)
    window = None if capture.meta.get("sliding_window", "none") == "none" else int(capture.meta["sliding_window"])
    measured = {}  # layer -> every candidate's measurements
    for i in sorted(capture.layers):
        measured[i] = []
        for c, result in zip(candidates, results):
            layer = next(p for p in result.per_layer if p["layer"] == i)
            measured[i].append({"settings": c, **{key: layer[key] for key in (
                "output_error", "exact_pair_share", "flops_ratio", "head_output_error", "head_output_norm")}})
    calibrations = []
    for budget in budgets:
        choices = []
        for i in sorted(capture.layers):
            q, k = capture.layers[i]["q"].float(), capture.layers[i]["k"].float()
            picks = _per_head_choice(measured[i], budget, units) if units else [_layer_choice(measured[i], budget)]
            if sum(m["flops_ratio"] for m in picks if m) / len(picks) > 1 - min_saving or not any(picks):
                choices.append(LayerChoice(i, dict(EXACT), 0.0, 1.0, 1.0, measured[i]))
                continue
            rep = q.shape[1] // len(picks)
            guarded = [None if m is None else _guarded_settings(
                m["settings"], q[:, g * rep:(g + 1) * rep], k[:, g * rep:(g + 1) * rep], scale, window, guard_margin,
                None if not m["settings"].get("column_share") else
                {key: value[g * rep:(g + 1) * rep] for key, value in columns[m["settings"]["column_share"], i].items()})
                for g, m in enumerate(picks)]
            settings = guarded[0] if not units else {
                "threshold": 0.0, "kv_heads" if per_kv_head else "heads": {g: s for g, s in enumerate(guarded) if s is not None}}
            chosen = [m or {"flops_ratio": 1.0, "exact_pair_share": 1.0} for m in picks]
            choices.append(LayerChoice(
                i, settings, _pooled_error(picks),
                sum(m["exact_pair_share"] for m in chosen) / len(chosen), sum(m["flops_ratio"] for m in chosen) / len(chosen),
                measured[i]))
        calibrations.append(Calibration(budget=float(budget), layers=choices, meta=dict(capture.meta)))
    return calibrations


def _layer_choice(measured: list[dict], budget: float) -> dict | None:
    """The cheapest candidate whose layer output error is within ``budget`` (None: none is)."""
    within = [m for m in measured if m["output_error"] <= budget]
    return min(within, key=lambda m: (m["flops_ratio"], m["output_error"])) if within else None


def _per_head_choice(measured: list[dict], budget: float, units: int) -> list[dict | None]:
    """One candidate (None: exact) per unit (``units`` KV heads or query heads) such that the layer's output
    error stays within ``budget`` at low mean FLOPs. A Lagrangian choice: each unit takes the candidate that
    minimises ``flops + lam x its squared error share`` (its query heads' squared output error over the layer's
    squared output norm), with the smallest ``lam`` (bisection) whose pooled error meets the budget; then
    single units move to cheaper candidates while the budget holds; the result is never dearer than the best
    one-candidate choice for the whole layer. A unit's cost is the candidate's cost on the whole layer (the
    measurement runs every head with the same settings)."""
    options = [[(1.0, 0.0, None)] for _ in range(units)]  # per unit: (flops, squared error share, candidate)
    for m in measured:
        for g, share in enumerate(_squared_error_shares(m, units)):
            options[g].append((m["flops_ratio"], share, m))
    limit = budget ** 2

    def pick(lam: float) -> list[tuple]:
        return [min(opts, key=lambda o: (o[0] + lam * o[1], o[1])) for opts in options]

    def error(picked: list[tuple]) -> float:
        return sum(o[1] for o in picked)

    low, high = 0.0, 1.0
    if error(pick(low)) > limit:
        while error(pick(high)) > limit:
            high *= 10
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (low, middle) if error(pick(middle)) <= limit else (middle, high)
        low = high
    picked = pick(low)
    improved = True
    while improved:  # the Lagrangian choice can leave slack: spend it where it saves most
        improved, total = False, error(picked)
        moves = [(o[0] - picked[g][0], g, o) for g, opts in enumerate(options) for o in opts
                 if o[0] < picked[g][0] and total - picked[g][1] + o[1] <= limit]
        if moves:
            _, g, o = min(moves, key=lambda move: move[0])
            picked[g], improved = o, True
    uniform = _layer_choice(measured, budget)
    if uniform is not None and uniform["flops_ratio"] < sum(o[0] for o in picked) / units:
        return [uniform] * units
    return [o[2] for o in picked]


def _squared_error_shares(measured: dict, units: int) -> list[float]:
    """Per unit (``units`` KV heads or query heads), the squared output error of its query heads under one
    measured candidate, over the layer's squared exact output norm (the shares sum to the layer's squared
    relative error)."""
    errors = torch.tensor(measured["head_output_error"], dtype=torch.float64)
    norms = torch.tensor(measured["head_output_norm"], dtype=torch.float64)
    return ((errors * norms).pow(2) / norms.pow(2).sum()).view(units, -1).sum(dim=1).tolist()


def _pooled_error(picks: list[dict | None]) -> float:
    """The layer's relative output error with each unit's pick (None: exact, no error)."""
    return math.sqrt(sum(_squared_error_shares(m, len(picks))[g] for g, m in enumerate(picks) if m is not None))


def _guarded_settings(candidate: dict, q: torch.Tensor, k: torch.Tensor, scale: float, window: int | None,
                      guard_margin: float, columns: dict[str, torch.Tensor] | None) -> dict:
    """A chosen candidate as settings to store: its radius guard from the heads it serves, its key columns."""
    settings = {key: value for key, value in candidate.items() if key != "column_share"}
    widest = widest_interval(q, k, candidate["threshold"], scale, window)
    settings["radius_limit"] = min(RADIUS_LIMIT, math.ceil(guard_margin * widest * 1e4) / 1e4)  # covers `widest`
    if columns is not None:
        settings |= {key: value.tolist() for key, value in columns.items()}
    return settings


def _check_all_heads(capture: Capture, why: str) -> None:
    heads = capture.meta.get("heads", "")
    total = int(capture.meta.get("num_attention_heads", 0) or 0)
    if heads and total and heads != ",".join(map(str, range(total))):
        raise ValueError(f"{why}; the capture holds heads {heads} of {total}. Capture all heads (no --heads), "
                         "or drop column_share from the candidates and --per-kv-head/--per-head")


def write_report(calibration: Calibration, out_dir: str | Path) -> tuple[Path, Path]:
    """``calibration.json`` (every layer's candidates and choice) and ``support_basis.json`` (the
    settings, usable as ``--config`` or ``SupportBasisConfig.from_dict``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "calibration.json"
    report.write_text(json.dumps(calibration.as_dict(), indent=2))
    settings = out / "support_basis.json"
    settings.write_text(json.dumps(calibration.config().to_dict(), indent=2))
    return report, settings


def markdown_table(calibration: Calibration) -> str:
    lines = ["| layer | settings | output error | pairs exact | modelled FLOPs vs exact |", "|---|---|---|---|---|"]
    kv_heads = int(calibration.meta.get("num_key_value_heads", 0) or 0)
    query_heads = int(calibration.meta.get("num_attention_heads", 0) or 0)
    for c in calibration.layers:
        if "kv_heads" in c.settings or "heads" in c.settings:
            unit, count = ("KV head", kv_heads) if "kv_heads" in c.settings else ("head", query_heads)
            heads = c.settings.get("kv_heads") or c.settings["heads"]
            settings = "; ".join(f"{unit} {g}: " + (_describe(heads[g]) if g in heads else "exact")
                                 for g in range(max(count, max(heads) + 1)))
        else:
            settings = _describe(c.settings)
        lines.append(f"| {c.layer} | {settings} | {100 * c.output_error:.1f}% | {100 * c.exact_pair_share:.1f}% "
                     f"| {100 * c.flops_ratio:.1f}% |")
    return "\n".join(lines)


def _describe(settings: dict) -> str:
    if settings == EXACT:
        return "exact"
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if not k.startswith("column_"))
    return shown + (", key columns" if "column_queries" in settings else "")
