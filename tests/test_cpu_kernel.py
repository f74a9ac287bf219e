"""The C++ decoding step (sb_hf.ops.cpu_kernel): step by step it gives what the op gives per group of heads
without a decoding state (itself checked against the quadratic reference in test_decoding/test_ops), over
per-query-head and per-KV-head structure, padding, GQA, lengths across its 256-key blocks, fp64/fp32/bf16;
it runs only where it applies, names non-finite inputs, and generate() with it matches a full recompute."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_decoding import COLUMNS, left_padding, qkv
from test_hf import generation_matching_full_recompute, padded_batch
from test_ops import F64, INF

import sb_hf.ops.cpu_kernel as cpu_kernel
from sb_hf.ops import support_basis_attention
from sb_hf.ops.decoding import EVERY_KEY, DecodingState, decoding_attention
from sb_hf.ops.heads import grouped_attention


@pytest.fixture(scope="module")
def kernel():
    cpu_kernel.use_cpu_kernel(True)  # builds it (about a minute the first time) or fails saying why
    yield cpu_kernel._module
    cpu_kernel.use_cpu_kernel(False)


@pytest.fixture
def calls(kernel, monkeypatch):
    """The kernel's calls in this test (a counting stand-in for the built module)."""
    counted = []

    class Counting:
        def decoding_step(self, *args):
            counted.append(1)
            return kernel.decoding_step(*args)

    monkeypatch.setattr(cpu_kernel, "_module", Counting())
    return counted


CORE = dict(degree=0, kernel="taylor", radius=None, sketch_dim=None, sketch_seed=0, radius_limit=150.0, sinks=0, local_window=0)


def heads(per_query_head: bool, threshold: float, **core):
    """Every kind of structure the kernel handles: windows of 0 (no band), 3, 270 keys (across its blocks) and every
    key (a head kept exact), sinks, key columns, a tight radius limit (the guard sends rows to the exact path)."""
    base = {**CORE, "threshold": threshold, **core}
    columns = lambda rows, low: dict(column_queries=COLUMNS[:rows], column_threshold=torch.linspace(low, low + 0.8, rows, dtype=F64))
    if per_query_head:  # 6 query heads on 2 KV heads
        structures = [dict(local_window=3, sinks=2), dict(local_window=0, radius_limit=4.0), dict(local_window=270, **columns(1, 0.6)),
                      dict(local_window=EVERY_KEY, threshold=0.0), dict(local_window=9, sinks=1), dict(local_window=3, **columns(1, 0.9))]
        return [([h], {**base, **s}) for h, s in enumerate(structures)]
    return [([0], {**base, "local_window": 270, "sinks": 2, **columns(3, 0.6)}), ([1], {**base, "local_window": 5, "radius_limit": 5.0})]


def plan(groups, per_query_head):
    from sb_hf.integrations.plan import layer_plan

    return layer_plan("support_basis", groups, per_query_head, 6, 2)


def compare(groups, per_query_head, q, k, v, mask, first, *, tolerance, out_dtype=None):
    """Steps first..end with one state (its first step folds the prompt) against the op per group, no state."""
    polynomial, units = plan(groups, per_query_head)
    state = DecodingState()
    cast = (lambda x: x) if out_dtype is None else (lambda x: x.to(out_dtype))
    for t in range(first, q.shape[2]):
        step = dict(key_padding_mask=None if mask is None else mask[:, : t + 1])
        args = (cast(q[:, :, t : t + 1]), cast(k[:, :, : t + 1]), cast(v[:, :, : t + 1]))
        got = decoding_attention(*args, state, polynomial=polynomial, units=units, **step)
        expected = grouped_attention(support_basis_attention, *args, groups, per_query_head=per_query_head, **step)
        assert got.dtype == args[0].dtype
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance, msg=lambda m: f"step {t}: {m}")
    return state


@pytest.mark.parametrize("padded", [True, False], ids=["left-padded", "unpadded"])
@pytest.mark.parametrize("threshold", [INF, 2.5], ids=["no-large-rows", "threshold-2.5"])
@pytest.mark.parametrize("per_query_head", [True, False], ids=["query-heads", "kv-heads"])
def test_kernel_steps_match_the_op_per_group(calls, per_query_head, threshold, padded):
    """fp64, 2 sequences, a 283-token prompt then 16 steps (bands of 270 keys and every key cross the kernel's
    256-key blocks; no length is a multiple of them); the kernel ran at every step after the first."""
    q, k, v = qkv(300, seed=11)
    mask = left_padding(2, 300, pads=(6, 0)) if padded else None
    state = compare(heads(per_query_head, threshold), per_query_head, q, k, v, mask, 283, tolerance=1e-10)
    assert len(calls) == 17  # every step: the first one after the PyTorch fold of the prompt
    assert state.seen == 300


@pytest.mark.parametrize("per_query_head", [True, False], ids=["query-heads", "kv-heads"])
def test_padding_that_leaves_the_band_during_the_kernels_steps(calls, per_query_head):
    """A row padded for its first 25 keys, decoding from position 8: the kernel folds the padded keys (not into the
    sums, not as sinks: the sinks are the first real keys, reached later) and the steps match the op."""
    q, k, v = qkv(48, seed=16)
    compare(heads(per_query_head, 2.5), per_query_head, q, k, v, left_padding(2, 48, pads=(25, 3)), 8, tolerance=1e-10)
    assert len(calls) == 40


def test_kernel_in_float32_and_bfloat16(calls):
    """fp32 inputs (computed in fp32) and bf16 ones (computed in fp32, returned in bf16) match the op's steps."""
    q, k, v = qkv(200, seed=12, dtype=torch.float32)
    groups = heads(True, INF)
    compare(groups, True, q, k, v, left_padding(2, 200), 180, tolerance=2e-5)
    compare(groups, True, q, k, v, left_padding(2, 200), 190, tolerance=2e-2, out_dtype=torch.bfloat16)
    assert len(calls) == 30


def test_the_exact_key_buffers_grow_while_the_kernel_folds(calls):
    """Every key a column (threshold far below every score): each step adds a held exact key per unit, past the
    buffers' first 64 slots, and the steps still match the op."""
    groups = [([h], {**CORE, "threshold": INF, "local_window": 2, "column_queries": COLUMNS[:1],
                     "column_threshold": torch.tensor([-1e9], dtype=F64)}) for h in range(6)]
    q, k, v = qkv(120, seed=13)
    state = compare(groups, True, q, k, v, left_padding(2, 120), 30, tolerance=1e-10)
    assert state.exact_k.shape[2] >= 118 and int(state.exact_count.max()) == 118
    assert len(calls) == 90


def test_the_kernel_runs_only_where_it_applies(calls):
    """Not for degree 2 (the PyTorch path), not when a step counts pairs (the stats), nor once turned off."""
    q, k, v = qkv(40, seed=14)
    groups = [([h], {**CORE, "threshold": INF, "degree": 2, "local_window": 3}) for h in range(6)]
    compare(groups, True, q, k, v, None, 35, tolerance=1e-10)
    assert calls == []
    groups = heads(True, INF)
    polynomial, units = plan(groups, True)
    state, stats = DecodingState(), {}
    decoding_attention(q[:, :, 39:], k, v, state, polynomial=polynomial, units=units, stats=stats)
    assert calls == [] and stats["pairs"] > 0
    decoding_attention(q[:, :, 39:], k, v, state, polynomial=polynomial, units=units)
    assert calls == [1]
    cpu_kernel.use_cpu_kernel(False)
    try:
        decoding_attention(q[:, :, 39:], k, v, state, polynomial=polynomial, units=units)
        assert calls == [1]
    finally:
        cpu_kernel.use_cpu_kernel(True)


@pytest.mark.parametrize("culprit", ["q", "k", "v"])
def test_the_kernel_names_a_non_finite_input_and_forgets_the_state(kernel, culprit):
    q, k, v = qkv(40, seed=15)
    polynomial, units = plan(heads(True, INF), True)
    state = DecodingState()
    decoding_attention(q[:, :, 38:39], k[:, :, :39], v[:, :, :39], state, polynomial=polynomial, units=units)
    assert state.seen == 39
    bad = {"q": q, "k": k, "v": v}[culprit].clone()
    bad[1, 0, 39, 2] = float("nan")
    q, k, v = (bad if name == culprit else x for name, x in (("q", q), ("k", k), ("v", v)))
    with pytest.raises(ValueError, match=f"^{culprit} contains NaN or inf"):
        decoding_attention(q[:, :, 39:40], k, v, state, polynomial=polynomial, units=units)
    assert state.seen == 0


CALIBRATED_KIND = dict(threshold=INF, degree=0, kernel="taylor", layers={
    0: {"heads": {0: {"sinks": 1, "local_window": 3}, 1: {"threshold": 0.0},
                  3: {"local_window": 6, "column_queries": [[0.5] * 8], "column_threshold": [0.2]}}},
    1: {"heads": {h: {"sinks": 2, "local_window": 4, "radius_limit": 3.0} for h in range(4)}}})


def test_generate_with_the_kernel_matches_a_full_recompute(calls):
    """A tiny Llama with per-query-head settings of the calibrated kind, greedy over a left-padded batch: the logits
    of every step with the kernel equal those of a full forward pass, and the kernel ran once per layer and step."""
    import sb_hf

    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, **CALIBRATED_KIND)
    ids, mask = padded_batch(lengths=(14, 10), total=14)
    new = 12
    generation_matching_full_recompute(model, ids, mask, new)
    assert len(calls) == 2 * (new - 1)  # the prompt is a prefill; each later token one call per layer
