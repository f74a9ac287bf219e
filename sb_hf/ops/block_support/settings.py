"""The settings of block-support attention (one typed object) and the selection rule its op and twin share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


ESTIMATES = {
    "centroid": "n_b exp(scale q . c_b): the block's mean key, an underestimate (Jensen), cheap",
    "bound": "n_b exp(scale * sum_c max(q_c min_c, q_c max_c)): Quest's bound on the block's largest score, an overestimate",
    "sampled": "exp(scale q . k_j) summed over the members j with (p + j) % sample_stride == 0, p the selection query's position "
               "(XAttention's antidiagonals), times sample_stride: unbiased, noisy for a block one key dominates; "
               "1/sample_stride of the scores",
    "oracle": "the true mass sum_j exp(scale q . k_j) of the block (quadratic: for measuring the other estimates)",
}
SELECTIONS = {
    "row": "each row selects with its own query (strictly causal: a row depends on its own query and earlier keys only)",
    "union": "each row selects with its own query, and the rows of a query block share the union of their selections "
             "(a row may depend on the other queries of its block present in the call, never on later blocks)",
    "pooled": "each row estimates with its own query, its masses as shares of its estimated total; the rows of a query "
              "block share one selection by the sum of their shares (XAttention-like; the same causality as 'union')",
    "prefix": "each row estimates as in 'pooled' and selects by the sum of the shares of the rows of its query block up to "
              "and including it (causal: a row depends on its own and earlier queries and earlier keys only, never on a "
              "later token; a kernel pays it as the union of its block's rows)",
    "last": "the rows of a query block share the selection of its last query present in the call (MInference- and "
            "FlexPrefill-like; the same causality as 'union')",
}
SHARED_SELECTIONS = ("pooled", "union")  # one selection per query block: what a block-sparse kernel can skip on
FAR_FIELDS = {
    "centroid": "each unselected candidate as one pseudo-key: its mean key, mean value and log-count bias",
    "none": "unselected candidates dropped (the softmax renormalizes over the exact keys)",
}


@dataclass(frozen=True)
class BlockSettings:
    """``gamma``: the share of a row's estimated attention mass its exact support must hold (0: the structure only,
    1: every key exact); ``block_size``: keys per block (the unit of selection and of a centroid); ``sinks``: the
    first real keys, always exact; ``local_window``: keys behind each query always exact, rounded up to whole blocks
    (``band_blocks``); ``selection``: whose estimate chooses a row's blocks (:data:`SELECTIONS`); ``estimate``: how a
    candidate's mass is estimated for the selection (:data:`ESTIMATES`); ``far``: what stands for the candidates not
    selected (:data:`FAR_FIELDS`); ``sample_stride``: the "sampled" estimate scores one key in this many."""

    # The defaults: what measured best so far (docs/experiments/block_support.md: at 8192 tokens of SmolLM2,
    # perplexity +0.21%, KL 0.0064, top-1 96.3%, 28% of the pairs exact).
    gamma: float = 0.97
    block_size: int = 64
    sinks: int = 4
    local_window: int = 128
    selection: str = "pooled"
    estimate: str = "sampled"
    far: str = "centroid"
    sample_stride: int = 8

    @property
    def band_blocks(self) -> int:
        """Whole blocks behind a query's own block that its band covers."""
        return -(-self.local_window // self.block_size)

    def check(self, causal: bool) -> None:
        """Raise ``ValueError`` naming the setting to change."""
        if not causal:
            raise ValueError("block-support attention is causal only (its blocks are chosen among earlier keys); "
                             "pass causal=True")
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma must be a number in [0, 1] (the share of attention mass kept exact), got {self.gamma!r}")
        for name in ("block_size", "sinks", "local_window", "sample_stride"):
            value, low = getattr(self, name), 0 if name in ("sinks", "local_window") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {tuple(SELECTIONS)}, got {self.selection!r}")
        if self.estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {tuple(ESTIMATES)}, got {self.estimate!r}")
        if self.far not in FAR_FIELDS:
            raise ValueError(f"far must be one of {tuple(FAR_FIELDS)}, got {self.far!r}")


def select_blocks(exact_log_mass: torch.Tensor, block_log_mass: torch.Tensor, gamma: float) -> torch.Tensor:
    """The candidates a row keeps exact: ``block_log_mass (..., nb)`` the log of each candidate's estimated mass
    (``-inf``: not a candidate), ``exact_log_mass (...)`` that of the keys exact anyway. Candidates are taken in
    decreasing estimated mass (ties: the lower block first) while the mass taken before them is below ``gamma`` of the
    total. Returns ``(..., nb)`` bool."""
    candidate = block_log_mass > float("-inf")
    if gamma >= 1 or gamma <= 0:  # (every candidate, or none: no rounding at the ends)
        return candidate if gamma >= 1 else torch.zeros_like(candidate)
    order = torch.sort(-block_log_mass, dim=-1, stable=True).indices
    ranked = block_log_mass.gather(-1, order)
    taken = torch.logcumsumexp(ranked, dim=-1)  # the candidates up to each one, inclusive
    before = torch.cat([torch.full_like(ranked[..., :1], float("-inf")), taken[..., :-1]], dim=-1)
    before = torch.logaddexp(before, exact_log_mass[..., None])  # the mass exact before each candidate is taken
    goal = torch.logaddexp(exact_log_mass, taken[..., -1]) + math.log(gamma)
    keep = (before < goal[..., None]) & (ranked > float("-inf"))
    return torch.zeros_like(keep).scatter(-1, order, keep)
