"""The naive, quadratic twins of the fast ops, with the same signatures: they define the semantics, the fast ops
must match them. Each lives in ``naive.py`` beside its fast path; this module gathers them under one name."""

from .block_support.naive import block_support_attention
from .naive import exact_attention
from .sink_window.naive import sink_window_attention
from .support_basis.naive import as23_attention, multi_threshold_attention, support_basis_attention

__all__ = ["as23_attention", "block_support_attention", "exact_attention", "multi_threshold_attention", "sink_window_attention", "support_basis_attention"]
