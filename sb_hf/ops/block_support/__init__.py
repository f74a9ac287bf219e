"""Block-support attention: support basis with its exact support chosen per input, no calibration.

The keys fall in blocks; each query row keeps exact the sinks, a band of recent blocks, and the earlier blocks that
carry the most of its estimated attention mass (up to a share ``gamma``), and every other earlier block enters the
same softmax as one pseudo-key, its centroid. ``naive.py`` defines it densely (every selection mode and estimate),
``chunk.py`` computes it without scoring the blocks it skips (per-row selections, the bound, centroid and oracle
estimates), ``flex.py`` the shared selections in one FlexAttention call (the CUDA path), ``backend.py`` what the
``block_support`` attention implementation runs (the op in one of them, or exact attention below its break-even and
for decoding steps). docs/experiments/block_support.md holds the measurements; the decoding
step from block summaries and the backend as the default are the rest of issue 24.
"""

from .backend import ENGINES, block_support_or_exact, engine_for
from .chunk import block_support_attention
from .flex import block_support_flex
from .settings import ESTIMATES, FAR_FIELDS, SELECTIONS, BlockSettings, select_blocks

__all__ = ["ENGINES", "ESTIMATES", "FAR_FIELDS", "SELECTIONS", "BlockSettings", "block_support_attention",
           "block_support_flex", "block_support_or_exact", "engine_for", "select_blocks"]
