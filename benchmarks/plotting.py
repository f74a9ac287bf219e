"""The benchmarks' figure: one log-log panel per measured quantity, one line per method, against length."""

from __future__ import annotations

from pathlib import Path


def loglog_panels(rows: list[dict], methods, panels: list[tuple], xlabel: str, path: Path) -> None:
    """``panels``: ``(value of a row, ylabel, title)`` each; ``rows`` hold ``method`` and ``n``. Needs matplotlib."""
    from sb_hf.figures import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (value, ylabel, title) in zip(axes[0], panels):
        for method in methods:
            pts = [r for r in rows if r["method"] == method]
            ax.loglog([r["n"] for r in pts], [value(r) for r in pts], "o-", label=method)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
