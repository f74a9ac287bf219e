"""Attention ops on ``(batch, heads, seq, head_dim)`` tensors: pure torch, no transformers import.

``support_basis_attention``, ``multi_threshold_attention``, ``as23_attention`` and
``sink_window_attention`` (the sinks + local window baseline) are the fast paths; ``reference`` holds their naive quadratic twins with the same
signatures, which define the semantics. ``use_cpu_kernel()`` turns on the optional C++ decoding step on a CPU.
"""

from . import reference
from .common import large_rows, visible
from .cpu_kernel import use_cpu_kernel
from .polynomial import FeatureMap, exp_fit_coefficients, feature_dim, monomial_features
from .sink_window import sink_window_attention
from .support_basis import as23_attention, estimate_feature_bytes, multi_threshold_attention, support_basis_attention

__all__ = [
    "FeatureMap",
    "as23_attention",
    "estimate_feature_bytes",
    "exp_fit_coefficients",
    "feature_dim",
    "large_rows",
    "monomial_features",
    "multi_threshold_attention",
    "reference",
    "sink_window_attention",
    "support_basis_attention",
    "use_cpu_kernel",
    "visible",
]
