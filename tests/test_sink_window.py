"""Attention sinks + local window: the fast op against its dense twin and an explicit mask, and the
Transformers backend on tiny Llama (GQA) and Mistral (sliding window 7) models."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_hf import generation_matching_full_recompute, logits, padded_batch
from test_ops import F64, TOLERANCES, dense_visibility, make_qkv, padding_mask
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import sb_hf
from sb_hf.config import SupportBasisConfig
from sb_hf.integrations.hf import attention_stats
from sb_hf.integrations.masks import support_basis_mask
from sb_hf.integrations.plan import op_kwargs, settings_for
from sb_hf.ops import reference, sink_window_attention

OPS = {"fast": sink_window_attention, "reference": reference.sink_window_attention}


def dense_attend(q_len, kv_len, *, sinks, local_window, sliding_window=None, key_padding_mask=None, batch=1, dropped=None):
    """(batch, q_len, kv_len) pairs to compute, with ranks counted in a loop (independent of the package): visible
    under the model's mask, and a sink (one of the first `sinks` real keys, after `dropped` real ones) or local."""
    visible = dense_visibility(
        q_len, kv_len, causal=True, sliding_window=sliding_window, key_padding_mask=key_padding_mask, batch=batch
    )
    p = torch.arange(kv_len - q_len, kv_len)[:, None]
    j = torch.arange(kv_len)[None, :]
    out = torch.zeros_like(visible)
    for b in range(batch):
        rank = 0 if dropped is None else int(dropped[b])
        sink = []
        for jj in range(kv_len):
            real = key_padding_mask is None or bool(key_padding_mask[b, jj])
            sink.append(real and rank < sinks)
            rank += int(real)
        out[b] = visible[b] & (torch.tensor(sink)[None, :] | (p - j < local_window))
    return out, visible


def masked_attention(q, k, v, attend):
    """Exact softmax attention restricted to ``attend (B, Lq, Lk)`` with torch's SDPA; rows with nothing to
    attend are zero."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    has_key = attend.any(-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(attend | ~has_key[..., None])[:, None])
    return torch.where(has_key[:, None, :, None], out, torch.zeros_like(out))


# --------------------------------------------------------------------------- fast vs reference grid


@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("local_window", [1, 5, 100])
@pytest.mark.parametrize("sinks", [0, 1, 4])
def test_fast_matches_reference_grid(sinks, local_window, pad):
    """Lengths not multiples of the chunk, chunk sizes 1/8/64, GQA and MHA, model window, decoding shapes."""
    for kv_len, q_len, chunk, window in itertools.product((13, 70), (None, 1, 5), (1, 8, 64), (None, 7)):
        if chunk == 1 and kv_len == 70 and q_len is None:
            continue
        q_len = kv_len if q_len is None else q_len
        heads = (3, 3) if chunk == 8 else (4, 2)
        q, k, v = make_qkv(batch=3, q_heads=heads[0], kv_heads=heads[1], q_len=q_len, kv_len=kv_len, seed=kv_len + q_len)
        mask = padding_mask(3, kv_len, pad)
        kwargs = dict(sinks=sinks, local_window=local_window, key_padding_mask=mask, sliding_window=window)
        got = sink_window_attention(q, k, v, chunk_size=chunk, **kwargs)
        expected = reference.sink_window_attention(q, k, v, **kwargs)
        assert got.dtype == F64 and got.shape == (3, heads[0], q_len, 8)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"{kv_len, q_len, chunk, window, heads}: {m}")


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_reference_matches_an_explicit_mask(pad, window):
    """The dense twin is softmax attention under the mask built by hand (`dense_attend`)."""
    for sinks, local_window, q_len in itertools.product((0, 1, 4), (1, 5, 100), (1, 5, 29)):
        q, k, v = make_qkv(batch=3, q_len=q_len, kv_len=29, seed=q_len)
        mask = padding_mask(3, 29, pad)
        attend, _ = dense_attend(q_len, 29, sinks=sinks, local_window=local_window, sliding_window=window, key_padding_mask=mask, batch=3)
        got = reference.sink_window_attention(q, k, v, sinks=sinks, local_window=local_window, key_padding_mask=mask, sliding_window=window)
        torch.testing.assert_close(got, masked_attention(q, k, v, attend), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pad", [None, "left"])
def test_low_precision_keeps_dtype_and_matches_reference(dtype, pad):
    q, k, v = make_qkv(batch=3, q_len=37, dtype=dtype, seed=5)
    mask = padding_mask(3, 37, pad)
    kwargs = dict(sinks=2, local_window=6, key_padding_mask=mask, sliding_window=11)
    got = sink_window_attention(q, k, v, chunk_size=8, **kwargs)
    assert got.dtype == dtype
    torch.testing.assert_close(got, reference.sink_window_attention(q, k, v, **kwargs), **TOLERANCES[dtype])
    expected = reference.sink_window_attention(q.to(F64), k.to(F64), v.to(F64), **kwargs)
    torch.testing.assert_close(got.to(F64), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("pad", [None, "left", "right"])
@pytest.mark.parametrize("q_len", [1, 5, 37])
def test_full_window_without_sinks_is_exact_attention(q_len, pad, window):
    q, k, v = make_qkv(batch=3, q_len=q_len, kv_len=37, seed=6)
    mask = padding_mask(3, 37, pad)
    exact = reference.exact_attention(q, k, v, key_padding_mask=mask, sliding_window=window)
    for local_window in (37, 1000):
        for op in OPS.values():
            got = op(q, k, v, sinks=0, local_window=local_window, key_padding_mask=mask, sliding_window=window, chunk_size=8)
            torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-10)


def test_sinks_and_window_are_a_real_restriction():
    """With a short window the result differs from exact attention, and the sinks change it."""
    q, k, v = make_qkv(q_len=37, seed=7)
    exact = reference.exact_attention(q, k, v)
    no_sinks = sink_window_attention(q, k, v, sinks=0, local_window=5)
    with_sinks = sink_window_attention(q, k, v, sinks=4, local_window=5)
    assert not torch.allclose(no_sinks, exact, atol=1e-3)
    assert not torch.allclose(with_sinks, no_sinks, atol=1e-3)
    # The first local_window rows see only local keys: they are exact either way.
    torch.testing.assert_close(with_sinks[:, :, :5], exact[:, :, :5], rtol=1e-10, atol=1e-10)


def test_fully_padded_rows_are_zero():
    q, k, v = make_qkv(batch=2, q_len=9, seed=8)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :6] = False  # left padding: queries 0..5 of row 1 see no real key
    for op in OPS.values():
        out = op(q, k, v, sinks=2, local_window=3, key_padding_mask=mask)
        assert torch.equal(out[1, :, :6], torch.zeros_like(out[1, :, :6]))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("window", [None, 7])
def test_left_padding_invariance(window):
    """A left-padded row equals the same sequence alone: padding does not move the sinks."""
    q, k, v = make_qkv(batch=3, q_len=30, seed=9)
    mask = padding_mask(3, 30, "left", pad=6)
    for op in OPS.values():
        out = op(q, k, v, sinks=3, local_window=4, key_padding_mask=mask, sliding_window=window, chunk_size=8)
        for b in range(3):
            real = mask[b]
            alone = op(q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real], sinks=3, local_window=4, sliding_window=window)
            torch.testing.assert_close(out[b, :, real], alone[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 7])
def test_decoding_matches_full_sequence(window):
    q, k, v = make_qkv(batch=3, q_len=41, seed=10)
    mask = padding_mask(3, 41, "left")
    full = sink_window_attention(q, k, v, sinks=2, local_window=6, key_padding_mask=mask, sliding_window=window, chunk_size=8)
    for q_len in (1, 5):
        step = sink_window_attention(q[:, :, -q_len:], k, v, sinks=2, local_window=6, key_padding_mask=mask, sliding_window=window)
        torch.testing.assert_close(step, full[:, :, -q_len:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
def test_dropped_real_keys_keep_their_sink_ranks(op):
    """A sliding-window cache drops keys no query sees any more; given their count of real tokens, the
    op on the kept keys equals the op on all keys, although the first kept keys are not sinks."""
    op = OPS[op]
    window, q_len, kv_len = 7, 5, 30
    q, k, v = make_qkv(batch=3, q_len=q_len, kv_len=kv_len, seed=11)
    mask = padding_mask(3, kv_len, "left", pad=4)  # row 2 has 8 padded keys, row 1 has 4
    kwargs = dict(local_window=3, sliding_window=window)
    for sinks, drop in itertools.product((0, 1, 2, 6, 9), (1, 3, 6, 9, kv_len - q_len - window + 1)):
        full = op(q, k, v, sinks=sinks, key_padding_mask=mask, **kwargs)
        dropped = mask[:, :drop].sum(-1)
        kept = op(q, k[:, :, drop:], v[:, :, drop:], sinks=sinks, key_padding_mask=mask[:, drop:], dropped_real_keys=dropped, **kwargs)
        torch.testing.assert_close(kept, full, rtol=1e-10, atol=1e-10)
        expected, _ = dense_attend(
            q_len, kv_len - drop, sinks=sinks, batch=3, key_padding_mask=mask[:, drop:], dropped=dropped, local_window=3,
            sliding_window=window,
        )
        torch.testing.assert_close(kept, masked_attention(q, k[:, :, drop:], v[:, :, drop:], expected), rtol=1e-10, atol=1e-10)
    # Without the count the first kept real keys become sinks: a different result.
    drop = 20
    wrong = op(q, k[:, :, drop:], v[:, :, drop:], sinks=2, key_padding_mask=mask[:, drop:], **kwargs)
    assert not torch.allclose(wrong, op(q, k, v, sinks=2, key_padding_mask=mask, **kwargs), atol=1e-3)


def test_chunk_size_does_not_change_the_result():
    q, k, v = make_qkv(batch=2, q_len=45, seed=12)
    mask = padding_mask(2, 45, "right")
    outs = [sink_window_attention(q, k, v, sinks=3, local_window=9, key_padding_mask=mask, chunk_size=c) for c in (1, 4, 9, 64, 1000)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-12, atol=1e-12)


def test_value_dim_scale_and_non_contiguous_inputs():
    q, k, v = make_qkv(q_len=23, value_dim=5, seed=13)
    q_t = q.transpose(2, 3).contiguous().transpose(2, 3)
    kwargs = dict(sinks=2, local_window=4, scale=0.3)
    got = sink_window_attention(q_t, k[..., :], v, chunk_size=8, **kwargs)
    assert got.shape == (2, 4, 23, 5)
    torch.testing.assert_close(got, reference.sink_window_attention(q, k, v, **kwargs), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- stats


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_stats_equal_dense_counts(pad, window):
    for sinks, local_window, q_len in itertools.product((0, 1, 4), (1, 5, 100), (1, 5, 37)):
        heads = 4
        q, k, v = make_qkv(batch=3, q_heads=heads, kv_heads=2, q_len=q_len, kv_len=37, seed=14)
        mask = padding_mask(3, 37, pad)
        attend, visible = dense_attend(
            q_len, 37, sinks=sinks, local_window=local_window, sliding_window=window, key_padding_mask=mask, batch=3
        )
        expected = {
            "exact_pairs": heads * int(attend.sum()),
            "pairs": heads * int(visible.sum()),
            "exact_rows": heads * int((attend == visible).all(-1).sum()),
            "rows": 3 * heads * q_len,
        }
        for op in OPS.values():
            stats = {}
            op(q, k, v, sinks=sinks, local_window=local_window, key_padding_mask=mask, sliding_window=window, chunk_size=8, stats=stats)
            assert {key: int(value) for key, value in stats.items()} == expected


def test_stats_accumulate_and_include_support_basis():
    q, k, v = make_qkv(q_len=20, seed=15)
    stats = {}
    sink_window_attention(q, k, v, sinks=1, local_window=3, stats=stats)
    first = {key: int(value) for key, value in stats.items()}
    sink_window_attention(q, k, v, sinks=1, local_window=3, stats=stats)
    assert {key: int(value) for key, value in stats.items()} == {key: 2 * value for key, value in first.items()}
    assert first["pairs"] == 2 * 4 * 20 * 21 // 2 and first["exact_pairs"] < first["pairs"]


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("pad", [None, "left"])
def test_gradients_match_reference(pad, window):
    q, k, v = make_qkv(batch=3, q_len=29, seed=16)
    mask = padding_mask(3, 29, pad)
    grads = []
    for op in OPS.values():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = op(*leaves, sinks=2, local_window=4, key_padding_mask=mask, sliding_window=window, chunk_size=8)
        (out * torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)).sum().backward()
        grads.append([x.grad for x in leaves])
    for fast, ref in zip(*grads):
        assert torch.isfinite(fast).all()
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


def test_gradcheck():
    q, k, v = (x.requires_grad_() for x in make_qkv(batch=1, q_heads=2, kv_heads=1, q_len=9, head_dim=3, seed=17))
    mask = torch.tensor([[False, True, True, True, True, True, True, True, True]])
    assert torch.autograd.gradcheck(
        lambda q, k, v: sink_window_attention(q, k, v, sinks=1, local_window=3, key_padding_mask=mask, chunk_size=4), (q, k, v)
    )


# --------------------------------------------------------------------------- bad input


BAD = [
    (dict(causal=False), "causal"),
    (dict(sinks=-1), "sinks"),
    (dict(sinks=1.5), "sinks"),
    (dict(sinks=True), "sinks"),
    (dict(sinks=None), "sinks"),
    (dict(local_window=0), "local_window"),
    (dict(local_window=-3), "local_window"),
    (dict(local_window=2.0), "local_window"),
    (dict(local_window="5"), "local_window"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), "key_padding_mask"),
    (dict(dropped_real_keys=torch.zeros(3, dtype=torch.long)), "dropped_real_keys"),
    (dict(dropped_real_keys=torch.zeros(2)), "dropped_real_keys"),
    (dict(dropped_real_keys=torch.tensor([0, -1])), "dropped_real_keys"),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kwargs, match", BAD, ids=[m + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_input_raises(op, kwargs, match):
    q, k, v = make_qkv(q_len=9, seed=18)
    with pytest.raises(ValueError, match=match):
        OPS[op](q, k, v, **{"sinks": 2, "local_window": 3, **kwargs})


def test_bad_chunk_size_and_shapes_raise():
    q, k, v = make_qkv(q_len=9, seed=19)
    for chunk in (0, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size"):
            sink_window_attention(q, k, v, sinks=2, local_window=3, chunk_size=chunk)
    with pytest.raises(ValueError, match="q_len <= kv_len"):
        sink_window_attention(q, k[:, :, :4], v[:, :, :4], sinks=2, local_window=3)
    with pytest.raises(ValueError, match="NaN"):
        sink_window_attention(q * float("nan"), k, v, sinks=2, local_window=3)


# --------------------------------------------------------------------------- settings


def test_config_sinks_and_local_window():
    c = SupportBasisConfig()
    assert (c.sinks, c.local_window) == (None, None)  # each method's default
    assert c.method_settings("sink_window") == dict(sinks=4, local_window=256)
    assert c.method_settings("support_basis") == dict(kernel="taylor", sinks=0, local_window=0, column_queries=None,
                                                      column_threshold=None)
    c = SupportBasisConfig(sinks=0, local_window=1, layers={1: {"sinks": 8, "local_window": 32}})
    assert (c.for_layer(0).sinks, c.for_layer(0).local_window) == (0, 1)
    assert (c.for_layer(1).sinks, c.for_layer(1).local_window) == (8, 32)
    assert SupportBasisConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    for kwargs, field in [
        (dict(sinks=-1), "sinks"), (dict(sinks=2.0), "sinks"), (dict(sinks=True), "sinks"),
        (dict(local_window=-1), "local_window"), (dict(local_window="8"), "local_window"),
        (dict(layers={0: {"local_window": -3}}), "local_window"), (dict(layers={0: {"sinks": -2}}), "sinks"),
    ]:
        with pytest.raises(ValueError, match=field):
            SupportBasisConfig(**kwargs)


def test_each_method_gets_only_its_settings():
    c = SupportBasisConfig(threshold=1.5, degree=3, chunk_size=16, sinks=2, local_window=9)
    assert op_kwargs(c, "sink_window") == dict(sinks=2, local_window=9, chunk_size=16)
    assert op_kwargs(c, "support_basis") == c.op_kwargs() and c.op_kwargs()["local_window"] == 9
    as23 = {key: value for key, value in c.op_kwargs("as23").items() if key != "threshold"}
    assert op_kwargs(c, "as23") == as23 and as23["kernel"] == "chebyshev" and "sinks" not in as23
    # left unset, each method gets its own default: the baseline's pattern, no structure for support basis
    c = SupportBasisConfig()
    assert (op_kwargs(c, "sink_window")["local_window"], op_kwargs(c, "support_basis")["local_window"]) == (256, 0)


# --------------------------------------------------------------------------- Transformers backend

KINDS = ["llama", "mistral"]
SINKS, LOCAL = 2, 5


def explicit_mask(model, mask, sinks, local_window, dtype=torch.float32):
    """The 4-D additive mask of sink + local window attention built by hand, for eager/sdpa."""
    batch, length = mask.shape
    allowed, _ = dense_attend(
        length, length, sinks=sinks, local_window=local_window, batch=batch, key_padding_mask=mask.bool(),
        sliding_window=getattr(model.config, "sliding_window", None),
    )
    out = torch.zeros(batch, 1, length, length, dtype=dtype)
    return out.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_model_matches_explicit_4d_mask(kind, implementation):
    model = tiny_model(kind)
    ids, mask = padded_batch()
    got = logits(model, ids, mask, "sink_window", sinks=SINKS, local_window=LOCAL)
    model.set_attn_implementation(implementation)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=explicit_mask(model, mask, SINKS, LOCAL), position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    # The restriction matters on these models: plain attention differs.
    exact = logits(model, ids, mask, "sdpa")
    assert not torch.allclose(got[real], exact[real], atol=1e-3)


@pytest.mark.parametrize("sinks", [0, SINKS, 30])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_matches_full_recompute(kind, sinks):
    """Includes Mistral's sliding-window cache, which drops keys: the sinks must not move onto the kept ones."""
    model = tiny_model(kind)
    ids, mask = padded_batch(lengths=(14, 10), total=14)
    sb_hf.apply_support_basis(model, method="sink_window", sinks=sinks, local_window=LOCAL)
    generation_matching_full_recompute(model, ids, mask, 10, tolerance=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_full_window_without_sinks_equals_sdpa(kind):
    model = tiny_model(kind)
    ids, mask = padded_batch()
    expected = logits(model, ids, mask, "sdpa")
    got = logits(model, ids, mask, "sink_window", sinks=0, local_window=ids.shape[1])
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    # Per-layer overrides reach the op: full windows on both layers, a tiny default.
    got = logits(model, ids, mask, "sink_window", sinks=0, local_window=1, layers={i: {"local_window": 64} for i in (0, 1)})
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


def test_apply_sink_window_stores_settings_and_counts_pairs():
    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, method="sink_window", sinks=4, local_window=64)
    assert model.config._attn_implementation == "sink_window"
    assert (model.config.support_basis["sinks"], model.config.support_basis["local_window"]) == (4, 64)
    json.dumps(model.config.support_basis)
    settings = settings_for(model.model.layers[0].self_attn)
    assert (settings.sinks, settings.local_window) == (4, 64)
    assert "sink_window" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    ids, mask = padded_batch()
    with attention_stats() as stats, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert int(stats["exact_pairs"]) == int(stats["pairs"])  # the window covers every sequence
    sb_hf.apply_support_basis(model, method="sink_window", sinks=1, local_window=3)
    with attention_stats() as stats, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert 0 < int(stats["exact_pairs"]) < int(stats["pairs"])
    with pytest.raises(ValueError, match="local_window"):
        sb_hf.apply_support_basis(model, method="sink_window", local_window=0)


def test_mask_function_keeps_the_keys_a_sliding_cache_dropped():
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 1]]).bool()
    # 8 tokens cached, a window-4 cache keeps the last 3, plus 1 new query: the first 5 keys were dropped.
    got = support_basis_mask(2, 1, 4, q_offset=8, kv_offset=5, attention_mask=attention_mask)
    assert torch.equal(got, attention_mask)
    got = support_basis_mask(2, 1, 4, q_offset=8, kv_offset=5, attention_mask=None)
    assert got.shape == (2, 9) and bool(got.all())
    assert support_basis_mask(2, 1, 9, q_offset=8, kv_offset=0, attention_mask=None) is None
