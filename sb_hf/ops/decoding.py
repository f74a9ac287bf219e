"""The decoding step's public names (their home: :mod:`sb_hf.ops.support_basis.decoding` and ``.settings``)."""

from .support_basis.decoding import DecodingState, decoding_attention
from .support_basis.settings import EVERY_KEY, Units

__all__ = ["EVERY_KEY", "DecodingState", "Units", "decoding_attention"]
