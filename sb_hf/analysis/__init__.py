"""Measurements on real activations: capture post-RoPE queries/keys/values from a Transformers
model (``capture``) and test the paper's sub-Gaussian assumption on their entries (``distributions``).
and measure every method's error and cost over its settings on those activations (``sweep``).
"""

from .capture import Capture, capture_activations, capture_text, capturing, load_capture, save_capture
from .distributions import analyze_capture, entry_statistics, plot_grid, summarize, write_tables

__all__ = [
    "Capture",
    "analyze_capture",
    "capture_activations",
    "capture_text",
    "capturing",
    "entry_statistics",
    "load_capture",
    "plot_grid",
    "save_capture",
    "summarize",
    "write_tables",
]
