"""Multi-threshold support basis: the fast op against its naive twin, the one-bucket limit, buckets (the signed
Chebyshev fit, any degree; the non-negative kernels' grid is in test_squared_kernel.py)."""

import pytest
import torch
from test_ops import F64, INF, assert_matches, gradients, make_qkv, padding_mask, with_evaluations

from sb_hf.ops import multi_threshold_attention, reference, support_basis_attention
from sb_hf.ops.support_basis.keys import key_buckets

THRESHOLDS = [2.5, 1.8, 1.2]  # standard normal rows of 8 entries: about 20% large, the rest spread over 3 buckets


def _case(name, **kw):
    base = dict(batch=2, q_heads=4, kv_heads=2, q_len=37, kv_len=None, dtype=F64, causal=True, thresholds=THRESHOLDS,
                degrees=2, sketch_dim=None, chunk_size=16, padding=None, sliding_window=None, seed=0)
    base.update(kw)
    return pytest.param(base, id=name)


CASES = [
    _case("causal"),
    _case("noncausal-rightpad", causal=False, padding="right", batch=3, chunk_size=7),
    _case("degrees-per-bucket", degrees=[3, 2, 1], chunk_size=5),
    _case("gqa6x2-window5-leftpad", q_heads=6, kv_heads=2, sliding_window=5, padding="left", batch=3, chunk_size=8),
    _case("decode4", q_len=4, kv_len=41, padding="left", batch=3, chunk_size=8),
    _case("two-buckets-deg4", thresholds=[3.0, 1.5], degrees=4, chunk_size=16),
    _case("no-exact-part", thresholds=[INF, 2.0, 1.0], degrees=[2, 2, 3]),
    _case("sketched", sketch_dim=[12, None, 6], degrees=[2, 3, 2], chunk_size=8),
    _case("float32", dtype=torch.float32, chunk_size=8),
    _case("bfloat16", dtype=torch.bfloat16, chunk_size=8),
]


def _inputs(c):
    q, k, v = make_qkv(batch=c["batch"], q_heads=c["q_heads"], kv_heads=c["kv_heads"], q_len=c["q_len"],
                       kv_len=c["kv_len"], dtype=c["dtype"], seed=c["seed"])
    kw = dict(thresholds=c["thresholds"], degrees=c["degrees"], sketch_dim=c["sketch_dim"], causal=c["causal"],
              sliding_window=c["sliding_window"], key_padding_mask=padding_mask(c["batch"], k.shape[2], c["padding"]),
              sketch_seed=4, kernel="chebyshev")
    return q, k, v, kw


@pytest.mark.parametrize("case,evaluation", with_evaluations(CASES))
def test_fast_matches_reference(case, evaluation):  # a sketched kernel has no score form
    q, k, v, kw = _inputs(case)
    out = multi_threshold_attention(q, k, v, chunk_size=case["chunk_size"], evaluation=evaluation, **kw)
    expected = reference.multi_threshold_attention(q, k, v, **kw)
    assert out.dtype == q.dtype and torch.isfinite(out).all()
    assert_matches(out, expected, q.dtype)


def test_the_buckets_are_a_real_split():
    """The grid above exercises every bucket, and the buckets change the result."""
    q, k, v = make_qkv(seed=0)
    buckets = key_buckets(k, THRESHOLDS)
    counts = [(buckets == b).sum().item() for b in (-1, 0, 1, 2)]
    assert all(c > 5 for c in counts), counts
    one = support_basis_attention(q, k, v, threshold=THRESHOLDS[0], degree=2)
    three = multi_threshold_attention(q, k, v, thresholds=THRESHOLDS, degrees=2)
    assert (one - three).abs().max() > 1e-3


def test_key_buckets_by_hand():
    x = torch.tensor([[0.5, -0.2], [1.0, 1.9], [-3.0, 0.0], [2.0, 1.2], [0.0, 1.2]])
    # max |entry|: 0.5, 1.9, 3.0, 2.0, 1.2 with thresholds 2.5 > 1.8 > 1.2
    assert key_buckets(x, [2.5, 1.8, 1.2]).tolist() == [2, 0, -1, 0, 2]
    assert key_buckets(x, [2.5]).tolist() == [0, 0, -1, 0, 0]
    assert key_buckets(x, [0.0]).tolist() == [-1] * 5


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_one_bucket_is_the_single_threshold_op(fast):
    q, k, v = make_qkv(batch=3, q_heads=6, kv_heads=2, seed=3)
    kw = dict(key_padding_mask=padding_mask(3, 37, "left"), sliding_window=9, kernel="chebyshev")
    multi = multi_threshold_attention if fast else reference.multi_threshold_attention
    single = support_basis_attention if fast else reference.support_basis_attention
    for degree, sketch in ((2, None), (3, 10)):
        a = multi(q, k, v, thresholds=[2.0], degrees=[degree], sketch_dim=[sketch], sketch_seed=2, **kw)
        b = single(q, k, v, threshold=2.0, degree=degree, sketch_dim=sketch, sketch_seed=2, **kw)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_match_reference():
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=23, seed=5)
    weights = torch.randn(2, 4, 23, 8, dtype=F64, generator=torch.Generator().manual_seed(6))
    kw = dict(thresholds=THRESHOLDS, degrees=[2, 3, 2], sketch_dim=[None, 8, None], key_padding_mask=padding_mask(2, 23, "left"),
              sliding_window=7, kernel="chebyshev")
    fast = gradients(multi_threshold_attention, q, k, v, weights, chunk_size=6, **kw)
    for g_fast, g_ref in zip(fast, gradients(reference.multi_threshold_attention, q, k, v, weights, **kw)):
        assert torch.isfinite(g_fast).all() and g_fast.abs().max() > 0
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("window", [None, 6])
def test_decoding_matches_full_sequence(window):
    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=33, seed=7)
    kw = dict(thresholds=THRESHOLDS, degrees=2, sliding_window=window, chunk_size=8)
    full = multi_threshold_attention(q, k, v, **kw)
    for t in (1, 10, 33):
        step = multi_threshold_attention(q[:, :, t - 1 : t], k[:, :, :t], v[:, :, :t], **kw)
        torch.testing.assert_close(step, full[:, :, t - 1 : t], rtol=1e-10, atol=1e-10)


def test_stats_count_only_the_exact_part():
    q, k, v = make_qkv(seed=8)
    fast, naive = {}, {}
    multi_threshold_attention(q, k, v, thresholds=THRESHOLDS, degrees=2, stats=fast)
    reference.multi_threshold_attention(q, k, v, thresholds=THRESHOLDS, degrees=2, stats=naive)
    assert {key: int(val) for key, val in fast.items()} == {key: int(val) for key, val in naive.items()}
    assert 0 < int(fast["exact_pairs"]) < int(fast["pairs"])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(thresholds=[1.0, 2.0]), "strictly decreasing"),
        (dict(thresholds=[2.0, 2.0]), "strictly decreasing"),
        (dict(thresholds=[]), "non-empty"),
        (dict(thresholds=[2.0, -1.0]), "numbers >= 0"),
        (dict(thresholds=[2.0, 1.0], degrees=[2, 2, 2]), "one degree and one sketch_dim per threshold"),
        (dict(thresholds=[2.0, 1.0], degrees=[2, 13]), "degree must be an integer"),
        (dict(thresholds=[2.0, 1.0], sketch_dim=[4, 0]), "sketch_dim must be a positive integer"),
    ],
)
@pytest.mark.parametrize("fn", [multi_threshold_attention, reference.multi_threshold_attention], ids=["fast", "reference"])
def test_bad_input(fn, kwargs, match):
    q, k, v = make_qkv(q_len=5, seed=9)
    with pytest.raises(ValueError, match=match):
        fn(q, k, v, **kwargs)


def test_config_buckets_round_trip_through_json():
    import json

    from sb_hf.config import SupportBasisConfig

    config = SupportBasisConfig(thresholds=[INF, 2.0, 1.0], degrees=[2, 3, 2], sketch_dim=32,
                                layers={1: {"thresholds": [3.0], "degrees": [2]}})
    again = SupportBasisConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.thresholds == [INF, 2.0, 1.0] and again.degrees == [2, 3, 2]
    assert again.bucket_settings()["thresholds"] == [INF, 2.0, 1.0]
    assert again.for_layer(1).bucket_settings()["thresholds"] == [3.0]
    assert again.for_layer(1).bucket_settings()["degrees"] == [2]
    with pytest.raises(ValueError, match="one degree and one sketch_dim per threshold"):  # found when built
        SupportBasisConfig(thresholds=[2.0, 1.0], degrees=[2, 2], layers={1: {"thresholds": [3.0]}})
