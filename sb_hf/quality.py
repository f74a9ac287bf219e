"""End-to-end quality of an attention method against exact attention on the same tokens:
perplexity, mean next-token KL divergence from exact, top-1 agreement, share of pairs computed exactly."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .integrations.hf import attention_stats
from .patches import apply_support_basis
from .integrations.plan import IMPLEMENTATIONS

EXACT = "exact"


@dataclass
class MethodResult:
    method: str
    settings: dict
    perplexity: float
    kl_from_exact: float
    top1_agreement: float
    exact_pair_share: float
    seconds: float
    label: str = ""  # shown instead of the settings (e.g. the file a calibrated config came from)

    def as_dict(self) -> dict:
        return asdict(self)


def next_token_metrics(logits: torch.Tensor, exact_logits: torch.Tensor, input_ids: torch.Tensor) -> dict:
    """Sums over the predicted positions (token ``t+1`` from prefix ``..t``): NLL, KL(exact || method),
    top-1 agreement, and the count, so that several blocks can be pooled exactly."""
    log_p = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    log_q = torch.log_softmax(exact_logits[:, :-1].double(), dim=-1)
    target = input_ids[:, 1:]
    nll = -log_p.gather(-1, target[..., None]).squeeze(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    agree = log_p.argmax(-1) == log_q.argmax(-1)
    return {"nll": nll.sum().item(), "kl": kl.sum().item(), "agree": agree.sum().item(), "count": target.numel()}


def token_blocks(tokenizer, text: str, tokens: int, sequences: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping blocks of ``tokens`` tokens from the start of ``text``."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < tokens * sequences:
        raise ValueError(
            f"the text has {ids.numel()} tokens, fewer than tokens x sequences = {tokens} x {sequences}; "
            "lower --tokens/--sequences or give a longer --text"
        )
    return [ids[i * tokens : (i + 1) * tokens][None] for i in range(sequences)]


@torch.no_grad()
def compare_methods(
    model, blocks: list[torch.Tensor], methods: list[tuple[str, dict]], progress: bool = True
) -> list[MethodResult]:
    """Run every method on every block; ``methods`` lists (name, settings) pairs, the name a
    registered implementation (``"support_basis"``, ``"as23"``, ``"sink_window"``), the settings
    those of :class:`sb_hf.SupportBasisConfig`; a third item, a label, is shown instead of the settings.
    Exact attention (``sdpa``) runs first as the reference."""
    methods = [(m[0], m[1], m[2] if len(m) > 2 else "") for m in methods]
    for name, _, _ in methods:
        if name != EXACT and name not in IMPLEMENTATIONS:
            raise ValueError(f"unknown method {name!r}; choose from {[EXACT, *IMPLEMENTATIONS]}")
    model.set_attn_implementation("sdpa")
    start = time.perf_counter()
    exact_logits = [model(input_ids=ids).logits.float() for ids in tqdm(blocks, desc=EXACT, disable=not progress)]
    exact_seconds = time.perf_counter() - start

    results = []
    for name, settings, label in [(EXACT, {}, ""), *methods]:
        if name == EXACT:
            totals = _pool(exact_logits, exact_logits, blocks)
            results.append(_result(EXACT, {}, totals, 1.0, exact_seconds))
            continue
        apply_support_basis(model, settings, method=name)
        start = time.perf_counter()
        with attention_stats() as stats:
            logits = [model(input_ids=ids).logits.float() for ids in tqdm(blocks, desc=name, disable=not progress)]
        seconds = time.perf_counter() - start
        share = (stats["exact_pairs"] / stats["pairs"]).item() if stats else float("nan")
        results.append(_result(name, dict(settings), _pool(logits, exact_logits, blocks), share, seconds, label))
    model.set_attn_implementation("sdpa")
    return results


def _pool(logits, exact_logits, blocks) -> dict:
    totals: dict = {}
    for lg, ex, ids in zip(logits, exact_logits, blocks):
        for key, value in next_token_metrics(lg, ex, ids).items():
            totals[key] = totals.get(key, 0) + value
    return totals


def _result(name, settings, totals, share, seconds, label="") -> MethodResult:
    count = totals["count"]
    return MethodResult(
        method=name,
        settings=settings,
        perplexity=math.exp(totals["nll"] / count),
        kl_from_exact=totals["kl"] / count,
        top1_agreement=totals["agree"] / count,
        exact_pair_share=share,
        seconds=seconds,
        label=label,
    )


def markdown_table(results: list[MethodResult]) -> str:
    exact_ppl = next(r.perplexity for r in results if r.method == EXACT)
    lines = [
        "| method | settings | perplexity | vs exact | KL from exact (nats) | top-1 agreement | pairs exact | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        settings = r.label or ", ".join(f"{k}={v}" for k, v in r.settings.items())
        lines.append(
            f"| {r.method} | {settings or '-'} | {r.perplexity:.3f} | {100 * (r.perplexity / exact_ppl - 1):+.1f}% "
            f"| {r.kl_from_exact:.4f} | {100 * r.top1_agreement:.1f}% | {100 * r.exact_pair_share:.1f}% | {r.seconds:.1f} |"
        )
    return "\n".join(lines)


def frontier_series(results: list[dict]) -> dict[str, list[dict]]:
    """Compare results (``results.json`` entries, several runs on the same tokens) grouped into frontiers:
    a method's own settings form one series per method; calibrated configs one per calibration folder
    (the folder above ``budget_B/``), each series sorted by share of pairs computed exactly."""
    series: dict[str, list[dict]] = {}
    for r in results:
        if r["method"] == EXACT:
            continue
        name = r["method"]
        if r.get("label"):
            folder = Path(r["label"]).parent
            name = f"{r['method']} {folder.parent if folder.name.startswith('budget_') else folder}"
        series.setdefault(name, []).append(r)
    return {name: sorted(points, key=lambda r: r["exact_pair_share"]) for name, points in series.items()}


def plot_frontier(runs: list[dict], path: str | Path, *, goal: dict | None = None) -> Path:
    """Perplexity change, KL from exact and top-1 agreement against the share of pairs computed exactly,
    one line per series (:func:`frontier_series`), for ``runs`` (loaded ``results.json`` files of
    ``sb-hf compare`` on the same tokens). ``goal``: dashed reference lines (``ppl``: relative change,
    ``kl``, ``top1``, ``share``)."""
    from .figures import pyplot

    plt = pyplot()

    exact = {(run["tokens"], run["text"]): next(r["perplexity"] for r in run["results"] if r["method"] == EXACT)
             for run in runs}
    if len(exact) != 1 or len({round(v, 6) for v in exact.values()}) != 1:
        raise ValueError(f"the runs measured different tokens (tokens, text: {sorted(exact)}); plot one frontier per text and length")
    reference = next(iter(exact.values()))
    results = [r for run in runs for r in run["results"]]
    panels = [("perplexity vs exact (%)", lambda r: 100 * (r["perplexity"] / reference - 1), "ppl", 100),
              ("KL from exact (nats)", lambda r: r["kl_from_exact"], "kl", 1),
              ("top-1 agreement (%)", lambda r: 100 * r["top1_agreement"], "top1", 100)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, value, key, factor) in zip(axes, panels):
        for name, points in frontier_series(results).items():
            ax.plot([100 * r["exact_pair_share"] for r in points], [value(r) for r in points], "o-", label=name)
        if goal and key in goal:
            ax.axhline(factor * goal[key], linestyle="--", color="gray")
        if goal and "share" in goal:
            ax.axvline(100 * goal["share"], linestyle=":", color="gray")
        ax.set(xlabel="pairs computed exactly (%)", title=title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    tokens, text = next(iter(exact))
    half = " (second half)" if any(run.get("second_half") for run in runs) else ""
    fig.suptitle(f"{tokens} tokens of {Path(text).name}{half}: error vs cost (dashed: the goal)")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
