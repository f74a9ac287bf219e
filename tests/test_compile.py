"""torch.compile (CPU inductor): a support-basis model compiles and gives the eager logits. Dynamo breaks the
graph at the op's host syncs (the counts that size the gathered blocks, the data-dependent skips), which is
documented in docs/layout_notes.md; what runs between them is compiled."""

from __future__ import annotations

import torch
from conftest import tiny_model

import sb_hf


def test_compiled_model_matches_eager():
    model = tiny_model("llama", num_hidden_layers=1)
    sb_hf.apply_support_basis(model, threshold=1.0, kernel="taylor", degree=2, sinks=2, local_window=4)
    ids = torch.randint(1, 90, (2, 30), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            expected = model(input_ids=ids).logits
            got = torch.compile(model)(input_ids=ids).logits
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
