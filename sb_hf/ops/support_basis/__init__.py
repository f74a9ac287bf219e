"""Support-basis attention (arXiv 2510.01643): large rows and a structure exact, a polynomial for the rest.

``chunk.py`` is the fast path of a prompt (and of any call), ``decoding.py`` the decoding step from running sums,
``naive.py`` the quadratic twin that defines both; ``settings.py`` holds the typed settings (:class:`Polynomial`,
:class:`Structure`), ``keys.py`` the rules of which rows are exact, ``far.py`` and ``scan.py`` the far part.
"""

from .chunk import as23_attention, multi_threshold_attention, support_basis_attention
from .decoding import DecodingState, decoding_attention
from .scan import DEFAULT_CHUNK_SIZE
from .settings import (DEFAULT_MAX_FEATURE_BYTES, EVERY_KEY, RADIUS_FLOOR, RADIUS_LIMIT, Polynomial, Structure, Units,
                       check_buckets, estimate_feature_bytes)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_FEATURE_BYTES",
    "EVERY_KEY",
    "RADIUS_FLOOR",
    "RADIUS_LIMIT",
    "DecodingState",
    "Polynomial",
    "Structure",
    "Units",
    "as23_attention",
    "check_buckets",
    "decoding_attention",
    "estimate_feature_bytes",
    "multi_threshold_attention",
    "support_basis_attention",
]
