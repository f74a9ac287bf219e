"""What the ``block_support`` attention implementation runs per call: the block-support op where it pays, exact
attention elsewhere.

Exact attention (:func:`sb_hf.ops.support_basis_attention` at threshold 0: every row exact, PyTorch's fused kernel
on a CPU) serves the calls over fewer keys than ``exact_below`` (below the op's measured break-even it is the faster
of the two, and exact) and the calls with fewer queries than a block, decoding steps among them (a generated token
attends exactly to the cache, as in MInference and FlexPrefill, whose sparsity is the prompt's; block summaries kept
in the cache are issue 24's to do).
"""

from __future__ import annotations

import torch

from ..support_basis import support_basis_attention
from .chunk import block_support_attention


def block_support_or_exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, exact_below: int,
                           block_size: int, sinks: int, local_window: int, **settings) -> torch.Tensor:
    """:func:`.chunk.block_support_attention` with ``settings`` when ``k`` holds at least ``exact_below`` keys and
    ``q`` at least a block of queries, else exact attention with the same masks (``causal``, ``scale``,
    ``key_padding_mask``, ``sliding_window``, ``stats``; ``dropped_real_keys`` only places the sinks)."""
    if k.shape[2] < exact_below or q.shape[2] < block_size:
        settings = {name: settings[name] for name in ("causal", "scale", "key_padding_mask", "sliding_window", "stats")
                    if name in settings}
        return support_basis_attention(q, k, v, threshold=0.0, degree=0, **settings)
    return block_support_attention(q, k, v, block_size=block_size, sinks=sinks, local_window=local_window, **settings)
