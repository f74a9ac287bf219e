"""matplotlib for sb-hf's figures, an optional dependency: ``pip install "sb-hf[plot]"``."""

from __future__ import annotations

from types import ModuleType

INSTALL = 'pip install "sb-hf[plot]"'  # (or pip install matplotlib)


def require_matplotlib() -> ModuleType:
    """``matplotlib``, or an ``ImportError`` that says what to install."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(f"sb-hf draws its figures with matplotlib, which is not installed: {INSTALL}") from error
    return matplotlib


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (:func:`require_matplotlib`'s error without it)."""
    require_matplotlib().use("Agg")
    import matplotlib.pyplot as plt

    return plt
