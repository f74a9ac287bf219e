"""The structural exact part of support basis (attention sinks, a local window, key columns): the fast op
against its dense twin (outputs and stats), independent semantics (plain softmax attention, a per-row loop
reference, hand-counted exact pairs), gradients, decoding, keys a sliding-window cache dropped, bad input,
settings, and the Transformers backend on tiny Llama / Mistral models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_model
from test_hf import generation_matching_full_recompute, logits, padded_batch
from test_ops import F64, INF, assert_matches, dense_visibility, gradients, make_qkv, padding_mask, sdpa
from test_sink_window import masked_attention
from transformers import AutoModelForCausalLM

import sb_hf
from sb_hf.config import SupportBasisConfig
from sb_hf.integrations.cache import cache_argument, returned_cache
from sb_hf.integrations.hf import attention_stats
from sb_hf.integrations.plan import OP_SETTINGS, op_kwargs, settings_for
from sb_hf.ops import multi_threshold_attention, reference, support_basis_attention

COLUMN_THRESHOLD = 1.0  # with `column_queries` below and randn keys (head_dim 8): about 15% of the keys are columns
KERNELS = [("chebyshev", 2), ("taylor", 2), ("taylor", 0)]
STAT_KEYS = ("exact_pairs", "pairs", "exact_rows", "rows")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The shapes here are tiny: one intra-op thread avoids the spin-waiting of a second one on a busy machine
    (which made this file several times slower); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def column_queries(q_heads, head_dim, seed=100):
    """A random mean query per head (fp64; the ops cast it to the compute dtype)."""
    return torch.randn(q_heads, head_dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


def int_stats(stats):
    return {key: int(stats[key]) for key in STAT_KEYS}


# --------------------------------------------------------------------------- fast vs twin grid


def _case(name, **kw):
    base = dict(batch=2, q_heads=4, kv_heads=2, q_len=37, kv_len=None, dtype=F64, threshold=2.0, chunk_size=8, causal=True,
                radius=None, padding=None, sliding_window=None, seed=0, sinks=0, local_window=0, columns=None)
    base.update(kw)
    return pytest.param(base, id=name)


ALL = dict(sinks=3, local_window=5, columns="scalar")
CASES = [
    _case("sinks", sinks=3),
    _case("window", local_window=5),
    _case("columns", columns="scalar"),
    _case("columns-per-head", columns="per_head", seed=1),
    _case("all", **ALL),
    _case("all-gqa6x2", q_heads=6, kv_heads=2, **ALL, seed=2),
    _case("all-leftpad", batch=3, padding="left", **ALL, seed=3),
    _case("all-rightpad", batch=3, padding="right", **ALL, seed=3),
    _case("all-model-window12-leftpad", batch=3, padding="left", sliding_window=12, **ALL, seed=4),
    _case("all-model-window5-equal", sliding_window=5, **ALL, seed=4),
    _case("all-model-window3-smaller-rightpad", batch=3, padding="right", sliding_window=3, **ALL, seed=4),
    _case("decode1-leftpad", batch=3, q_len=1, kv_len=41, padding="left", **ALL, seed=5),
    _case("decode9-rightpad-window11", batch=3, q_len=9, kv_len=41, padding="right", sliding_window=11, **ALL, seed=5),
    _case("decode9-model-window4-smaller", q_len=9, kv_len=41, sliding_window=4, sinks=2, local_window=6, columns="scalar"),
    _case("decode9-local-window7-chunk8", q_len=9, kv_len=41, sinks=1, local_window=7, columns="per_head", seed=6),
    _case("local-window-eq-kv-len", q_len=41, local_window=41, sinks=2, columns="scalar", seed=6),
    _case("local-window-beyond-kv-len-decode", q_len=9, kv_len=41, local_window=100, padding="left", batch=3, seed=6),
    _case("local-window-1", local_window=1, sinks=2, seed=7),
    _case("chunk7", chunk_size=7, **ALL, seed=7),
    _case("chunk8-window8", chunk_size=8, sinks=2, local_window=8, columns="scalar", seed=7),
    _case("chunk5-window12-model-window9", chunk_size=5, sinks=2, local_window=12, sliding_window=9, seed=7),
    _case("chunk4-window17-gqa6x2", chunk_size=4, q_heads=6, kv_heads=2, sinks=1, local_window=17, columns="scalar", seed=7),
    _case("decode9-chunk2-window9", q_len=9, kv_len=41, chunk_size=2, sinks=2, local_window=9, columns="per_head", seed=7),
    _case("chunk1-window6", chunk_size=1, local_window=6, sinks=2, seed=7),
    _case("thrinf-all", threshold=INF, **ALL, seed=8),
    _case("thrinf-all-leftpad-window9", threshold=INF, batch=3, padding="left", sliding_window=9, **ALL, seed=8),
    _case("thr0-all", threshold=0.0, **ALL, seed=8),
    _case("sinks-beyond-real-keys-leftpad", batch=3, padding="left", sinks=30, local_window=4, seed=9),
    _case("length1", q_len=1, **ALL),
    _case("fixed-radius-all-leftpad", batch=3, padding="left", radius=5.0, **ALL, seed=13),
    _case("fixed-radius-decode9-window11", q_len=9, kv_len=41, sliding_window=11, radius=4.0, **ALL, seed=13),
    # non-causal: sinks and columns (no local window there)
    _case("noncausal-sinks-columns-rightpad", causal=False, batch=3, padding="right", sinks=3, columns="scalar", seed=12),
    _case("noncausal-q9-kv41-leftpad", causal=False, batch=3, q_len=9, kv_len=41, padding="left", sinks=2,
          columns="per_head", seed=12),
    _case("float32-all-leftpad", dtype=torch.float32, batch=3, padding="left", **ALL, seed=10),
    _case("float32-decode5-window9", dtype=torch.float32, q_len=5, kv_len=41, sliding_window=9, **ALL, seed=10),
    _case("bfloat16-all-leftpad", dtype=torch.bfloat16, batch=3, padding="left", **ALL, seed=11),
]


def _structure(c, q_heads, head_dim):
    """The structure keyword arguments of a grid case."""
    kw = dict(sinks=c["sinks"], local_window=c["local_window"])
    if c["columns"] is not None:
        kw["column_queries"] = column_queries(q_heads, head_dim)
        kw["column_threshold"] = (COLUMN_THRESHOLD if c["columns"] == "scalar"
                                  else torch.linspace(0.6, 1.4, q_heads, dtype=F64))
    return kw


def _inputs(c, kernel, degree):
    q, k, v = make_qkv(batch=c["batch"], q_heads=c["q_heads"], kv_heads=c["kv_heads"], q_len=c["q_len"],
                       kv_len=c["kv_len"], dtype=c["dtype"], seed=c["seed"])
    kw = dict(threshold=c["threshold"], degree=degree, kernel=kernel, sliding_window=c["sliding_window"], causal=c["causal"],
              radius=c["radius"],
              key_padding_mask=padding_mask(c["batch"], k.shape[2], c["padding"]), **_structure(c, q.shape[1], q.shape[3]))
    return q, k, v, kw


@pytest.mark.parametrize("evaluation", ["features", "scores"])
@pytest.mark.parametrize("kernel,degree", KERNELS, ids=[f"{k}{d}" for k, d in KERNELS])
@pytest.mark.parametrize("case", CASES)
def test_fast_matches_reference(case, kernel, degree, evaluation):
    q, k, v, kw = _inputs(case, kernel, degree)
    fast_stats, ref_stats = {}, {}
    out = support_basis_attention(q, k, v, chunk_size=case["chunk_size"], evaluation=evaluation, stats=fast_stats, **kw)
    expected = reference.support_basis_attention(q, k, v, stats=ref_stats, **kw)
    assert out.dtype == q.dtype and out.shape == (q.shape[0], q.shape[1], q.shape[2], v.shape[-1])
    assert torch.isfinite(out).all()
    assert_matches(out, expected, q.dtype)
    assert int_stats(fast_stats) == int_stats(ref_stats)
    if q.dtype != F64:  # the low-precision op stays close to the fp64 twin too
        expected64 = reference.support_basis_attention(q.to(F64), k.to(F64), v.to(F64), **kw)
        assert_matches(out, expected64, q.dtype)


@pytest.mark.parametrize("case", [c for c in CASES if c.values[0]["local_window"]])
def test_fused_and_plain_band_match_reference(case, monkeypatch):
    """CPU inference computes the exact band in PyTorch's fused attention kernel (blocks of more than one query
    row; a single row takes the plain matmuls, which copy less); the plain-matmul path (CUDA's, and training's)
    is forced here too: both against the twin."""
    import sb_hf.ops.fused_cpu as module

    q, k, v, kw = _inputs(case, "taylor", 0)
    expected = reference.support_basis_attention(q, k, v, **kw)
    calls = []
    for name in ("fused_band", "fused_causal"):  # the band's two uses of the fused kernel (the second: plain attention too)
        monkeypatch.setattr(module, name, lambda *a, original=getattr(module, name): calls.append(1) or original(*a))
    assert_matches(support_basis_attention(q, k, v, chunk_size=case["chunk_size"], **kw), expected, q.dtype)
    assert bool(calls) == (q.shape[2] > 1)  # the fused kernel ran (not for one query)
    monkeypatch.setattr(module, "FUSED_BIAS_BYTES", 1)  # one separately masked block per kernel call
    assert_matches(support_basis_attention(q, k, v, chunk_size=case["chunk_size"], **kw), expected, q.dtype)
    monkeypatch.setattr(module, "available", lambda q, v: False)
    calls.clear()
    assert_matches(support_basis_attention(q, k, v, chunk_size=case["chunk_size"], **kw), expected, q.dtype)
    assert not calls


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("q_len", [37, 40, 2])
@pytest.mark.parametrize("heads", [(1, 1), (3, 1), (2, 2)], ids=["1x1", "gqa3x1", "2x2"])
@pytest.mark.parametrize("local_window", [0, 1, 5, 8, 13, 36, 37], ids=lambda w: f"window{w}")
def test_halved_causal_calls_match_reference(local_window, heads, q_len, dtype, monkeypatch):
    """A causal kernel call that would leave a thread idle (an odd head count on 2 threads) runs as its two halves in
    one call plus the rectangle between them: the first window's rows of a prompt's band, and plain attention
    (threshold 0). Windows from 1 to the whole prompt, odd and even lengths, against the twin."""
    import sb_hf.ops.fused_cpu as module

    q, k, v = make_qkv(batch=1, q_heads=heads[0], kv_heads=heads[1], q_len=q_len, dtype=dtype, seed=21)
    halves = []
    monkeypatch.setattr(module, "halved_causal", lambda *a, original=module.halved_causal: halves.append(1) or original(*a))
    monkeypatch.setattr(module, "BALANCED_CAUSAL_MIN_ROWS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # (the decision; the file runs on one thread)
    threshold = 0.0 if local_window == 0 else INF
    kw = dict(threshold=threshold, degree=0, kernel="taylor", sinks=2, local_window=local_window)
    out = support_basis_attention(q, k, v, **kw)
    assert_matches(out, reference.support_basis_attention(q, k, v, **kw), dtype)
    assert bool(halves) == (heads[0] % 2 == 1 and local_window != 1)  # (a window of 1 calls no causal kernel)


@pytest.mark.parametrize("evaluation", ["features", "scores"])
@pytest.mark.parametrize("kernel,degrees", [("chebyshev", [2, 3, 1]), ("taylor", [2, 0, 2])], ids=["chebyshev", "taylor"])
@pytest.mark.parametrize("window", [None, 13])
def test_multi_threshold_matches_reference(window, kernel, degrees, evaluation):
    q, k, v = make_qkv(batch=3, q_heads=6, kv_heads=2, q_len=33, seed=12)
    kw = dict(thresholds=[2.0, 1.4, 0.8], degrees=degrees, kernel=kernel, sliding_window=window,
              key_padding_mask=padding_mask(3, 33, "left"), sinks=2, local_window=4,
              column_queries=column_queries(6, 8), column_threshold=COLUMN_THRESHOLD)
    fast_stats, ref_stats = {}, {}
    out = multi_threshold_attention(q, k, v, chunk_size=7, evaluation=evaluation, stats=fast_stats, **kw)
    expected = reference.multi_threshold_attention(q, k, v, stats=ref_stats, **kw)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert int_stats(fast_stats) == int_stats(ref_stats)
    # the structure reaches the multi-threshold op (a no-op flag would leave this equal)
    plain = multi_threshold_attention(q, k, v, **{**kw, "sinks": 0, "local_window": 0, "column_queries": None,
                                                  "column_threshold": None})
    assert (plain - out).abs().max() > 1e-3


@pytest.mark.parametrize("extra", [dict(radius_limit=0.5), dict(radius=4.0, radius_limit=3.0),
                                   dict(radius_limit=0.5, sliding_window=4)], ids=["limit0.5", "radius4-limit3", "limit0.5-window4"])
def test_radius_guard_stats_with_local_window(extra):
    """Every row's interval is at least the floor 1 (or the fixed radius), above radius_limit: every row is an
    exact row, with or without a local window (rows with no key beyond the window too; a regression test: the
    fast op once skipped the guard for them and counted fewer exact rows than the twin)."""
    q, k, v = make_qkv(batch=1, q_heads=2, kv_heads=1, q_len=12, seed=0)
    kw = dict(threshold=2.0, degree=2, **extra)
    for local_window in (0, 5):
        fast_stats, ref_stats = {}, {}
        out = support_basis_attention(q, k, v, local_window=local_window, stats=fast_stats, **kw)
        expected = reference.support_basis_attention(q, k, v, local_window=local_window, stats=ref_stats, **kw)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        assert int(ref_stats["exact_rows"]) == 24 == q.shape[1] * q.shape[2]
        assert int_stats(fast_stats) == int_stats(ref_stats), local_window


# --------------------------------------------------------------------------- independent semantics


@pytest.mark.parametrize("q_len", [29, 5])
@pytest.mark.parametrize("local_window", [29, 50])
def test_full_local_window_is_exact_attention(local_window, q_len):
    """local_window >= kv_len (threshold inf: no large row) is plain softmax attention (torch SDPA, GQA expanded)."""
    q, k, v = make_qkv(batch=2, q_heads=6, kv_heads=2, q_len=q_len, kv_len=29, seed=20)
    mask = dense_visibility(q_len, 29, causal=True, batch=2)
    expected = sdpa(q, k, v, mask=mask)
    if q_len == 29:
        torch.testing.assert_close(expected, sdpa(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)
    for kernel, degree in KERNELS:
        for evaluation in ("features", "scores"):
            got = support_basis_attention(q, k, v, threshold=INF, degree=degree, kernel=kernel, local_window=local_window,
                                          chunk_size=8, evaluation=evaluation)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # without the window the polynomial part is really used: a different result
    approx = support_basis_attention(q, k, v, threshold=INF, degree=2, chunk_size=8)
    assert (approx - expected).abs().max() > 1e-3


@pytest.mark.parametrize("local_window", [6, 10])
def test_local_window_covering_the_model_window_is_exact_sliding_attention(local_window):
    """With a model sliding window <= local_window every visible key is in the band: exact windowed attention."""
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=31, seed=21)
    expected = sdpa(q, k, v, mask=dense_visibility(31, 31, causal=True, sliding_window=6, batch=2))
    for evaluation in ("features", "scores"):
        got = support_basis_attention(q, k, v, threshold=INF, degree=2, sliding_window=6, local_window=local_window,
                                      chunk_size=8, evaluation=evaluation)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("q_len,window", [(31, None), (7, None), (31, 9)])
def test_sinks_beyond_kv_len_are_exact_attention(q_len, window, pad):
    q, k, v = make_qkv(batch=3, q_heads=4, kv_heads=2, q_len=q_len, kv_len=31, seed=22)
    key_padding_mask = padding_mask(3, 31, pad)
    visible = dense_visibility(q_len, 31, causal=True, sliding_window=window, key_padding_mask=key_padding_mask, batch=3)
    expected = masked_attention(q, k, v, visible)
    for sinks in (31, 1000):
        for kernel, degree in KERNELS:
            got = support_basis_attention(q, k, v, threshold=INF, degree=degree, kernel=kernel, sinks=sinks,
                                          key_padding_mask=key_padding_mask, sliding_window=window, chunk_size=8)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pad", [None, "left"])
@pytest.mark.parametrize("q_len,window", [(31, None), (7, None), (31, 9)])
def test_every_key_a_column_is_exact_attention(q_len, window, pad):
    q, k, v = make_qkv(batch=3, q_heads=6, kv_heads=2, q_len=q_len, kv_len=31, seed=23)
    key_padding_mask = padding_mask(3, 31, pad)
    visible = dense_visibility(q_len, 31, causal=True, sliding_window=window, key_padding_mask=key_padding_mask, batch=3)
    expected = masked_attention(q, k, v, visible)
    for column_threshold in (-1e9, torch.full((6,), -1e9, dtype=F64)):
        for evaluation in ("features", "scores"):
            got = support_basis_attention(q, k, v, threshold=INF, degree=2, column_queries=column_queries(6, 8),
                                          column_threshold=column_threshold, key_padding_mask=key_padding_mask,
                                          sliding_window=window, chunk_size=8, evaluation=evaluation)
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    # a very high column threshold makes no column: the same as no columns
    none = support_basis_attention(q, k, v, threshold=INF, degree=2, key_padding_mask=key_padding_mask, sliding_window=window)
    high = support_basis_attention(q, k, v, threshold=INF, degree=2, column_queries=column_queries(6, 8),
                                   column_threshold=1e9, key_padding_mask=key_padding_mask, sliding_window=window)
    torch.testing.assert_close(high, none, rtol=1e-12, atol=1e-12)


def _exact_sets(q, k, *, threshold, sinks, local_window, col_queries, col_threshold, key_padding_mask, sliding_window,
                dropped=None):
    """Per (b, h, i): the visible keys and the exact ones, with plain python loops (independent of sb_hf.ops).
    Returns a dict (b, h, i) -> (visible list, exact set, row_large bool)."""
    batch, q_heads, q_len, d = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    groups = q_heads // kv_heads
    scale = d**-0.5
    if col_queries is not None:
        thr = (col_threshold.tolist() if isinstance(col_threshold, torch.Tensor) and col_threshold.dim() == 1
               else [float(col_threshold)] * q_heads)
    out = {}
    for b in range(batch):
        real = [key_padding_mask is None or bool(key_padding_mask[b, j]) for j in range(kv_len)]
        rank = 0 if dropped is None else int(dropped[b])
        sink = []
        for j in range(kv_len):
            sink.append(real[j] and rank < sinks)
            rank += int(real[j])
        for kh in range(kv_heads):
            keys = k[b, kh].tolist()
            large_key = [max(abs(x) for x in keys[j]) > threshold for j in range(kv_len)]
            column = [False] * kv_len
            if col_queries is not None:
                for g in range(kh * groups, (kh + 1) * groups):
                    qbar = col_queries[g].tolist()
                    for j in range(kv_len):
                        if scale * sum(a * c for a, c in zip(qbar, keys[j])) > thr[g]:
                            column[j] = True
            for h in range(kh * groups, (kh + 1) * groups):
                for i in range(q_len):
                    p = kv_len - q_len + i
                    row_large = max(abs(x) for x in q[b, h, i].tolist()) > threshold
                    seen = [j for j in range(kv_len)
                            if real[j] and j <= p and (sliding_window is None or j > p - sliding_window)]
                    exact = set(seen) if row_large else {
                        j for j in seen if p - j < local_window or sink[j] or column[j] or large_key[j]}
                    out[b, h, i] = (seen, exact, row_large)
    return out


def taylor0_loop_reference(q, k, v, **kw):
    """Support basis with kernel taylor, degree 0, by hand: exact pairs weigh exp(s_ij); every other visible key
    of row i weighs exp(c_i), c_i = scale * q_i . (mean of those keys); large query rows are softmax rows."""
    batch, q_heads, q_len, d = q.shape
    groups = q_heads // k.shape[1]
    scale = d**-0.5
    out = torch.zeros(batch, q_heads, q_len, v.shape[-1], dtype=F64)
    for (b, h, i), (seen, exact, _) in _exact_sets(q, k, **kw).items():
        if not seen:
            continue
        kh = h // groups
        qi = q[b, h, i].tolist()
        far = [j for j in seen if j not in exact]
        if far:
            mean = [sum(k[b, kh, j, t].item() for j in far) / len(far) for t in range(d)]
            c = scale * sum(a * m for a, m in zip(qi, mean))
        num, den = [0.0] * v.shape[-1], 0.0
        for j in seen:
            w = math.exp(scale * sum(a * x for a, x in zip(qi, k[b, kh, j].tolist()))) if j in exact else math.exp(c)
            den += w
            for t, x in enumerate(v[b, kh, j].tolist()):
                num[t] += w * x
        out[b, h, i] = torch.tensor([x / den for x in num], dtype=F64)
    return out


LOOP_CASES = [  # q_len, model window, threshold, column threshold
    (23, None, 2.0, COLUMN_THRESHOLD),
    (23, 9, 2.0, COLUMN_THRESHOLD),
    (6, None, 2.0, COLUMN_THRESHOLD),
    (23, None, INF, 0.5),
    (23, 9, 3.0, "per_head"),
]


@pytest.mark.parametrize("evaluation", ["features", "scores"])
@pytest.mark.parametrize("q_len,window,threshold,col_threshold", LOOP_CASES)
def test_taylor_degree_zero_matches_a_loop_reference(q_len, window, threshold, col_threshold, evaluation):
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=q_len, kv_len=23, seed=24)
    key_padding_mask = padding_mask(2, 23, "left", pad=4)  # row 0 unpadded, row 1 left-padded
    if col_threshold == "per_head":
        col_threshold = torch.tensor([0.3, 1.2, 0.6, 0.9], dtype=F64)
    kw = dict(threshold=threshold, sinks=2, local_window=5, col_queries=column_queries(4, 8), col_threshold=col_threshold,
              key_padding_mask=key_padding_mask, sliding_window=window)
    sets = _exact_sets(q, k, **kw)
    # the case is not degenerate: exact and polynomial pairs, small rows (and large ones unless threshold inf)
    large = [row_large for _, _, row_large in sets.values()]
    assert not all(large) and (any(large) or threshold == INF)
    assert sum(len(e) for _, e, _ in sets.values()) < sum(len(s) for s, _, _ in sets.values())
    expected = taylor0_loop_reference(q, k, v, **kw)
    # the columns matter here (they are not all large keys, sinks or band keys anyway)
    assert (taylor0_loop_reference(q, k, v, **{**kw, "col_queries": None}) - expected).abs().max() > 1e-3
    got = support_basis_attention(q, k, v, threshold=threshold, degree=0, kernel="taylor", sinks=2, local_window=5,
                                  column_queries=kw["col_queries"], column_threshold=col_threshold,
                                  key_padding_mask=key_padding_mask, sliding_window=window, chunk_size=8, evaluation=evaluation)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_each_structure_changes_the_result():
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=37, seed=25)
    kw = dict(threshold=2.0, degree=2, kernel="taylor", chunk_size=8)
    base = support_basis_attention(q, k, v, **kw)
    for structure in (dict(sinks=3), dict(local_window=5),
                      dict(column_queries=column_queries(4, 8), column_threshold=COLUMN_THRESHOLD)):
        assert (support_basis_attention(q, k, v, **kw, **structure) - base).abs().max() > 1e-3, structure


@pytest.mark.parametrize("threshold", [INF, 2.0])
@pytest.mark.parametrize("window", [None, 12])
def test_stats_count_the_structural_exact_pairs(window, threshold):
    """exact_pairs is the hand count (taylor: no fallback rows); with threshold inf and only a local window
    it is sum over rows of min(W, keys visible), with only sinks sum of min(S, keys visible)."""
    batch, q_heads, length = 2, 4, 37
    q, k, v = make_qkv(batch=batch, q_heads=q_heads, kv_heads=2, q_len=length, seed=26)
    cq = column_queries(q_heads, 8)
    visible_counts = [min(p + 1, window or p + 1) for p in range(length)]
    pairs = batch * q_heads * sum(visible_counts)
    row_large = int((q.abs() > threshold).any(-1).sum())
    for sinks, local_window, columns in [(0, 0, False), (0, 5, False), (3, 0, False), (0, 0, True), (3, 5, True)]:
        structure = dict(sinks=sinks, local_window=local_window)
        if columns:
            structure.update(column_queries=cq, column_threshold=COLUMN_THRESHOLD)
        sets = _exact_sets(q, k, threshold=threshold, sinks=sinks, local_window=local_window,
                           col_queries=cq if columns else None, col_threshold=COLUMN_THRESHOLD,
                           key_padding_mask=None, sliding_window=window)
        expected = sum(len(e) for _, e, _ in sets.values())
        for evaluation in ("features", "scores"):
            stats = {}
            support_basis_attention(q, k, v, threshold=threshold, degree=2, kernel="taylor", sliding_window=window,
                                    chunk_size=8, evaluation=evaluation, stats=stats, **structure)
            assert int_stats(stats) == dict(exact_pairs=expected, pairs=pairs, exact_rows=row_large,
                                            rows=batch * q_heads * length), (structure, evaluation)
        if threshold == INF and not columns:
            if sinks == 0:  # the band alone: min(W, visible) per row
                assert expected == batch * q_heads * sum(min(local_window, n) for n in visible_counts)
            elif local_window == 0 and window is None:  # the sinks alone: min(S, p + 1) per row
                assert expected == batch * q_heads * sum(min(sinks, p + 1) for p in range(length))
        if threshold == INF and columns and sinks == 0:
            assert 0 < expected < pairs  # the columns are a real, partial structure on this input


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kernel", ["chebyshev", "taylor"])
@pytest.mark.parametrize("evaluation", ["features", "scores"])
@pytest.mark.parametrize("window", [None, 9])
def test_gradients_match_reference(window, evaluation, kernel):
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=21, seed=30)
    weights = torch.randn(2, 4, 21, 8, dtype=F64, generator=torch.Generator().manual_seed(31))
    kw = dict(threshold=2.0, degree=2, kernel=kernel, key_padding_mask=padding_mask(2, 21, "left", pad=4),
              sliding_window=window, sinks=2, local_window=4, column_queries=column_queries(4, 8),
              column_threshold=COLUMN_THRESHOLD)
    fast = gradients(support_basis_attention, q, k, v, weights, chunk_size=8, evaluation=evaluation, **kw)
    ref = gradients(reference.support_basis_attention, q, k, v, weights, **kw)
    for g_fast, g_ref in zip(fast, ref):
        assert torch.isfinite(g_fast).all() and g_fast.abs().max() > 0
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("kernel", ["chebyshev", "taylor"])
@pytest.mark.parametrize("window", [None, 9])
def test_decoding_matches_full_sequence(window, kernel):
    length = 23
    q, k, v = make_qkv(batch=3, q_heads=4, kv_heads=2, q_len=length, seed=32)
    mask = padding_mask(3, length, "left", pad=4)
    kw = dict(threshold=2.0, degree=2, kernel=kernel, sliding_window=window, sinks=2, local_window=4,
              column_queries=column_queries(4, 8), column_threshold=COLUMN_THRESHOLD)
    full = support_basis_attention(q, k, v, key_padding_mask=mask, chunk_size=8, **kw)
    torch.testing.assert_close(full, reference.support_basis_attention(q, k, v, key_padding_mask=mask, **kw),
                               rtol=1e-10, atol=1e-10)
    for q_len in (1, 5):
        for evaluation in ("features", "scores"):
            last = support_basis_attention(q[:, :, -q_len:], k, v, key_padding_mask=mask, chunk_size=8,
                                           evaluation=evaluation, **kw)
            torch.testing.assert_close(last, full[:, :, -q_len:], rtol=1e-10, atol=1e-10)
    for t in range(1, length + 1):  # step by step on growing prefixes, as with a KV cache
        step = support_basis_attention(q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t], key_padding_mask=mask[:, :t], **kw)
        torch.testing.assert_close(step, full[:, :, t - 1 : t], rtol=1e-10, atol=1e-10, msg=lambda m: f"step {t}: {m}")


# --------------------------------------------------------------------------- keys a sliding-window cache dropped


@pytest.mark.parametrize("op", ["fast", "reference"])
def test_dropped_real_keys_keep_their_sink_ranks(op):
    """The op on the keys a window-7 cache kept, given the count of real keys it dropped, equals the op on
    all keys (every query here is past the dropped keys), though the first kept keys are not sinks."""
    fn = support_basis_attention if op == "fast" else reference.support_basis_attention
    window, q_len, kv_len = 7, 5, 30
    q, k, v = make_qkv(batch=3, q_len=q_len, kv_len=kv_len, seed=33)
    mask = padding_mask(3, kv_len, "left", pad=4)  # row 1: 4 padded keys, row 2: 8
    kw = dict(threshold=2.0, degree=2, kernel="taylor", sliding_window=window, local_window=3,
              column_queries=column_queries(4, 8), column_threshold=COLUMN_THRESHOLD)
    for sinks in (1, 2, 6):
        full_stats = {}
        full = fn(q, k, v, sinks=sinks, key_padding_mask=mask, stats=full_stats, **kw)
        for drop in (1, 3, 6, 9, kv_len - q_len - window + 1):
            dropped = mask[:, :drop].sum(-1)
            kept_stats = {}
            kept = fn(q, k[:, :, drop:], v[:, :, drop:], sinks=sinks, key_padding_mask=mask[:, drop:],
                      dropped_real_keys=dropped, stats=kept_stats, **kw)
            torch.testing.assert_close(kept, full, rtol=1e-10, atol=1e-10, msg=lambda m: f"sinks {sinks} drop {drop}: {m}")
            assert int_stats(kept_stats) == int_stats(full_stats)
            if op == "fast":
                ref = reference.support_basis_attention(q, k[:, :, drop:], v[:, :, drop:], sinks=sinks,
                                                        key_padding_mask=mask[:, drop:], dropped_real_keys=dropped, **kw)
                torch.testing.assert_close(kept, ref, rtol=1e-10, atol=1e-10)
    # Without the count the first kept real keys become sinks: a different result.
    drop = kv_len - q_len - window + 1
    wrong = fn(q, k[:, :, drop:], v[:, :, drop:], sinks=2, key_padding_mask=mask[:, drop:], **kw)
    assert (wrong - fn(q, k, v, sinks=2, key_padding_mask=mask, **kw)).abs().max() > 1e-4


# --------------------------------------------------------------------------- bad input


BAD = [
    (dict(local_window=3, causal=False), "local_window"),
    (dict(sinks=-1), "sinks"),
    (dict(sinks=1.5), "sinks"),
    (dict(sinks=True), "sinks"),
    (dict(sinks=None), "sinks"),
    (dict(local_window=-2), "local_window"),
    (dict(local_window=2.0), "local_window"),
    (dict(local_window="3"), "local_window"),
    (dict(column_queries=torch.zeros(4, 7, dtype=F64), column_threshold=1.0), "column_queries"),
    (dict(column_queries=torch.zeros(2, 8, dtype=F64), column_threshold=1.0), "column_queries"),
    (dict(column_queries=torch.zeros(4, 8, dtype=torch.long), column_threshold=1.0), "column_queries"),
    (dict(column_queries=[[0.0] * 8] * 4, column_threshold=1.0), "column_queries"),
    (dict(column_queries=torch.full((4, 8), float("nan"), dtype=F64), column_threshold=1.0), "column_queries"),
    (dict(column_queries=torch.full((4, 8), float("inf"), dtype=F64), column_threshold=1.0), "column_queries"),
    (dict(column_threshold=1.0), "column_threshold"),
    (dict(column_queries=torch.zeros(4, 8, dtype=F64)), "column_threshold"),
    (dict(column_queries=torch.zeros(4, 8, dtype=F64), column_threshold=torch.ones(3)), "column_threshold"),
    (dict(column_queries=torch.zeros(4, 8, dtype=F64), column_threshold=torch.ones(2, 4)), "column_threshold"),
    (dict(column_queries=torch.zeros(4, 8, dtype=F64), column_threshold=float("nan")), "column_threshold"),
    (dict(column_queries=torch.zeros(4, 8, dtype=F64), column_threshold="1.0"), "column_threshold"),
    (dict(dropped_real_keys=torch.zeros(3, dtype=torch.long)), "dropped_real_keys"),
    (dict(dropped_real_keys=torch.tensor([0, -1])), "dropped_real_keys"),
]
OPS = {
    "fast": lambda q, k, v, **kw: support_basis_attention(q, k, v, threshold=2.0, degree=2, **kw),
    "reference": lambda q, k, v, **kw: reference.support_basis_attention(q, k, v, threshold=2.0, degree=2, **kw),
    "multi": lambda q, k, v, **kw: multi_threshold_attention(q, k, v, thresholds=[2.0, 1.0], **kw),
    "multi-reference": lambda q, k, v, **kw: reference.multi_threshold_attention(q, k, v, thresholds=[2.0, 1.0], **kw),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kwargs, match", BAD, ids=[f"{m}{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_input_raises(op, kwargs, match):
    q, k, v = make_qkv(q_len=9, seed=40)
    with pytest.raises(ValueError, match=match):
        OPS[op](q, k, v, **kwargs)


def test_good_structure_inputs_are_accepted():
    """The edges of what is valid: zeros, a per-head tensor threshold, a float32 column query with fp64 inputs."""
    q, k, v = make_qkv(q_len=9, seed=41)
    for op in OPS.values():
        for kw in (dict(sinks=0, local_window=0), dict(sinks=100, local_window=100),
                   dict(column_queries=torch.zeros(4, 8), column_threshold=torch.tensor([0.0, 1.0, 2.0, 3.0])),
                   dict(column_queries=column_queries(4, 8), column_threshold=-3),
                   dict(sinks=2, causal=False), dict(dropped_real_keys=torch.tensor([1, 0]), sinks=2)):
            assert torch.isfinite(op(q, k, v, **kw)).all()


# --------------------------------------------------------------------------- settings


QUERIES = [[0.5 * ((h + t) % 3 - 1) for t in range(8)] for h in range(4)]  # 4 heads x head_dim 8


def test_config_column_fields_round_trip_and_reach_the_op():
    c = SupportBasisConfig(threshold=1.5, sinks=2, local_window=8, column_queries=QUERIES, column_threshold=0.25,
                           layers={1: {"column_queries": [[1.0] * 8] * 4, "column_threshold": [0.1, 0.2, 0.3, 0.4],
                                       "sinks": 0, "local_window": 3}})
    assert SupportBasisConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    layer0, layer1 = c.for_layer(0).method_settings("support_basis"), c.for_layer(1).method_settings("support_basis")
    assert (layer0["sinks"], layer0["local_window"], layer1["sinks"], layer1["local_window"]) == (2, 8, 0, 3)
    torch.testing.assert_close(layer0["column_queries"], torch.tensor(QUERIES))
    assert float(layer0["column_threshold"]) == 0.25
    torch.testing.assert_close(layer1["column_threshold"], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    for method in ("support_basis", "support_basis_multi"):
        kw = op_kwargs(c, method)
        assert set(OP_SETTINGS[method]) >= {"sinks", "local_window", "column_queries", "column_threshold"}
        assert kw["sinks"] == 2 and kw["local_window"] == 8
        torch.testing.assert_close(kw["column_queries"], torch.tensor(QUERIES))
    assert "column_queries" not in op_kwargs(c, "as23") and "column_queries" not in op_kwargs(c, "sink_window")
    # ints are accepted and stored as floats
    c = SupportBasisConfig(column_queries=[[1, 2], [3, 4]], column_threshold=[1, 2])
    assert c.column_queries == [[1.0, 2.0], [3.0, 4.0]] and c.column_threshold == [1.0, 2.0]
    assert SupportBasisConfig().method_settings("support_basis")["column_queries"] is None


NAN = float("nan")
BAD_CONFIG = [
    (dict(column_queries=[[1.0, 2.0], [3.0]], column_threshold=0.5), "column_queries"),
    (dict(column_queries=[], column_threshold=0.5), "column_queries"),
    (dict(column_queries=[[]], column_threshold=0.5), "column_queries"),
    (dict(column_queries=[1.0, 2.0], column_threshold=0.5), "column_queries"),
    (dict(column_queries=[[1.0, NAN]], column_threshold=0.5), "column_queries"),
    (dict(column_queries=[[1.0, "2"]], column_threshold=0.5), "column_queries"),
    (dict(column_queries=[[1.0, 2.0]]), "column_threshold"),
    (dict(column_queries=[[1.0, 2.0], [3.0, 4.0]], column_threshold=[0.5]), "column_threshold"),
    (dict(column_queries=[[1.0, 2.0], [3.0, 4.0]], column_threshold=[0.5, 0.5, 0.5]), "column_threshold"),
    (dict(column_queries=[[1.0, 2.0]], column_threshold=NAN), "column_threshold"),
    (dict(column_queries=[[1.0, 2.0]], column_threshold=[NAN]), "column_threshold"),
    (dict(column_queries=[[1.0, 2.0]], column_threshold=True), "column_threshold"),
    (dict(column_threshold=0.5), "column_threshold"),
    (dict(layers={0: {"column_queries": [[1.0, 2.0]]}}), "column_threshold"),
    (dict(layers={0: {"column_queries": [[1.0], [1.0, 2.0]], "column_threshold": 1.0}}), "column_queries"),
    (dict(local_window=-1), "local_window"),
    (dict(sinks=-1), "sinks"),
]


@pytest.mark.parametrize("kwargs, match", BAD_CONFIG, ids=[f"{m}{i}" for i, (_, m) in enumerate(BAD_CONFIG)])
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SupportBasisConfig(**kwargs)


# --------------------------------------------------------------------------- Transformers backend

SPLIT = 1.0
STRUCTURE = dict(sinks=2, local_window=8, column_queries=[[float(x) for x in row] for row in
                                                          (torch.randn(4, 8, generator=torch.Generator().manual_seed(7)) * 2).tolist()],
                 column_threshold=1.0)


def _settings(**extra):
    return dict(threshold=SPLIT, kernel="taylor", degree=2, **extra)


MODELS = [("llama", {}, 8, True), ("mistral", {}, 3, True), ("mistral", {"sliding_window": 12}, 8, True),
          ("mistral", {}, 3, False)]


@pytest.mark.parametrize("kind,overrides,local_window,padded", MODELS,
                         ids=["llama", "mistral-w7", "mistral-w12", "mistral-w7-unpadded"])
def test_cached_generation_matches_full_recompute(kind, overrides, local_window, padded):
    """Greedy decoding with the KV cache (Mistral's drops keys: the sinks must keep their ranks) gives, step by
    step, the logits of a full forward pass without cache. Unpadded: one sequence, no attention_mask."""
    model = tiny_model(kind, **overrides)
    ids, mask = padded_batch(lengths=(14, 10), total=14)
    if not padded:
        ids, mask = ids[:1], None
    sb_hf.apply_support_basis(model, **_settings(**{**STRUCTURE, "local_window": local_window}))
    generation_matching_full_recompute(model, ids, mask, 12)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_manual_cached_steps_match_full_recompute(kind):
    """A step loop with the cache (no generate) agrees with the full forward too (Mistral window 12 < 20
    tokens: its cache drops keys, and local_window 8 leaves a polynomial part)."""
    model = tiny_model(kind, **({"sliding_window": 12} if kind == "mistral" else {}))
    sb_hf.apply_support_basis(model, **_settings(**STRUCTURE))
    ids, mask = padded_batch(lengths=(20, 13), total=20)
    full = logits(model, ids, mask)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    prefix = 6
    name = cache_argument(model)
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefix], attention_mask=mask[:, :prefix], position_ids=positions[:, :prefix],
                    use_cache=True)
        cache = returned_cache(out)
        real = mask[:, :prefix].bool()
        torch.testing.assert_close(out.logits[real], full[:, :prefix][real], rtol=1e-4, atol=1e-4)
        for t in range(prefix, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t : t + 1],
                        use_cache=True, **{name: cache})
            cache = returned_cache(out)
            torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4, msg=lambda m: f"step {t}: {m}")


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_structure_adds_exact_pairs_and_changes_logits(kind):
    model = tiny_model(kind, **({"sliding_window": 12} if kind == "mistral" else {}))
    ids, mask = padded_batch()
    counts, outs = {}, {}
    for name, extra in [("none", {}), ("sinks", dict(sinks=2)), ("window", dict(local_window=8)),
                        ("columns", {key: STRUCTURE[key] for key in ("column_queries", "column_threshold")}),
                        ("all", STRUCTURE)]:
        sb_hf.apply_support_basis(model, **_settings(**extra))
        with attention_stats() as stats, torch.no_grad():
            outs[name] = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
        counts[name] = int_stats(stats)
    for name in ("sinks", "window", "columns", "all"):
        assert counts[name]["pairs"] == counts["none"]["pairs"]
        assert counts[name]["exact_pairs"] > counts["none"]["exact_pairs"], name
        assert counts["all"]["exact_pairs"] >= counts[name]["exact_pairs"]
        real = mask.bool()
        assert (outs[name][real] - outs["none"][real]).abs().max() > 1e-4, name
    assert counts["all"]["exact_pairs"] < counts["all"]["pairs"]  # still a polynomial part


def test_llama_padding_invariance_with_structure():
    model = tiny_model("llama")
    ids, mask = padded_batch()
    out = logits(model, ids, mask, "support_basis", **_settings(**STRUCTURE))
    assert torch.isfinite(out).all()
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = logits(model, ids[row, real][None])
        torch.testing.assert_close(out[row, real], alone[0], rtol=1e-4, atol=1e-4)


def test_save_pretrained_keeps_the_structure(tmp_path):
    model = tiny_model("mistral", sliding_window=12)
    settings = _settings(**{**STRUCTURE, "column_threshold": [0.5, 1.0, 1.5, 2.0]}, layers={1: {"sinks": 0, "local_window": 3}})
    sb_hf.apply_support_basis(model, **settings)
    stored = model.config.support_basis
    assert stored["sinks"] == 2 and stored["local_window"] == 8
    assert stored["column_queries"] == STRUCTURE["column_queries"] and stored["column_threshold"] == [0.5, 1.0, 1.5, 2.0]
    json.dumps(stored)
    ids, mask = padded_batch()
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="support_basis").eval()
    assert loaded.config.support_basis == stored
    layer0, layer1 = (settings_for(layer.self_attn) for layer in loaded.model.layers)
    assert (layer0.sinks, layer0.local_window, layer1.sinks, layer1.local_window) == (2, 8, 0, 3)
    assert layer1.column_queries == STRUCTURE["column_queries"]
    torch.testing.assert_close(logits(loaded, ids, mask), before)
    # the loaded structure is in use: without it the logits differ
    plain = logits(loaded, ids, mask, "support_basis", **_settings())
    assert (plain - before).abs().max() > 1e-4


def test_model_with_wrong_column_queries_shape_raises():
    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, **_settings(column_queries=[[0.0] * 8] * 3, column_threshold=1.0))
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="column_queries"):
        logits(model, ids, mask)


def test_multi_threshold_model_takes_the_structure():
    """`support_basis_multi` gets the structure too: cached decoding matches the full recompute, and the
    structure adds exact pairs."""
    model = tiny_model("mistral", sliding_window=12)
    ids, mask = padded_batch(lengths=(14, 10), total=14)
    multi = dict(method="support_basis_multi", thresholds=[SPLIT, 0.7], degrees=[2, 2], kernel="taylor")
    exact_pairs = {}
    for name, extra in [("none", {}), ("all", STRUCTURE)]:
        sb_hf.apply_support_basis(model, **multi, **extra)
        with attention_stats() as stats, torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
        exact_pairs[name] = int(stats["exact_pairs"])
    assert exact_pairs["all"] > exact_pairs["none"]
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                               output_logits=True, return_dict_in_generate=True)
    full = logits(model, generated.sequences, torch.cat([mask, torch.ones(2, 10, dtype=mask.dtype)], dim=1))
    for step, step_logits in enumerate(generated.logits):
        torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1 + step], rtol=1e-4, atol=1e-4)
