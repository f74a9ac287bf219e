"""Attention ops on ``(batch, heads, seq, head_dim)`` tensors: pure torch, no transformers import.

``support_basis_attention``, ``multi_threshold_attention``, ``as23_attention`` and ``sink_window_attention`` (the
sinks + local window baseline) are the fast paths, each in its method's folder beside the ``naive.py`` twin that
defines it (``reference`` gathers the twins, with the same signatures). ``DecodingState`` keeps a decoding step's far
part between steps; ``use_cpu_kernel()`` turns on the optional C++ decoding step on a CPU. The shared pieces:
``checks`` (inputs), ``masking`` (visibility and the window vocabulary), ``partial`` (partial attentions and their
merge), ``polynomial`` (fits and feature maps), ``exact`` (the exact parts on any device) and ``fused_cpu`` (the
same in PyTorch's fused CPU kernel).
"""

from . import reference
from .cpu_kernel import use_cpu_kernel
from .masking import visible
from .polynomial import FeatureMap, exp_fit_coefficients, feature_dim, monomial_features
from .sink_window import sink_window_attention
from .support_basis import (DecodingState, Polynomial, Structure, as23_attention, decoding_attention, estimate_feature_bytes,
                            multi_threshold_attention, support_basis_attention)
from .support_basis.keys import large_rows

__all__ = [
    "DecodingState",
    "FeatureMap",
    "Polynomial",
    "Structure",
    "as23_attention",
    "decoding_attention",
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
