"""The error/cost sweep on captured activations, against independent dense computations."""

import json
import math

import pytest
import torch

from sb_hf.analysis.capture import Capture
from sb_hf.analysis.sweep import features, grid, modelled_flops, sweep_capture, write_results
from sb_hf.ops import multi_threshold_attention, reference, support_basis_attention
from sb_hf.ops.polynomial import feature_dim


def synthetic_capture(n=45, heads=2, d=8, layers=(0, 3), window="none", seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    data = {
        i: {name: torch.randn(1, heads, n, d, generator=g) * spread for name in ("q", "k", "v")} for i in layers
    }
    meta = {"scale": str(d**-0.5), "sliding_window": window, "tokens": str(n), "layers": ",".join(map(str, layers))}
    return Capture(layers=data, meta=meta)


def run(capture, method, settings, rows=8):
    return sweep_capture(capture, [(method, settings)], matrix_rows=rows, progress=False)[0]


def test_exact_settings_have_zero_error_and_full_cost():
    capture = synthetic_capture()
    for method, settings in [("support_basis", {"threshold": 0.0, "degree": 2}),
                             ("sink_window", {"sinks": 0, "local_window": 1000})]:
        result = run(capture, method, settings)
        assert result.output_error < 1e-5 and result.matrix_error < 1e-6
        assert result.exact_pair_share == 1.0
        assert result.flops_ratio == pytest.approx(1.0)
        assert len(result.per_layer) == 2


@pytest.mark.parametrize(
    "method,settings",
    [("support_basis", {"threshold": 1.5, "degree": 2}),
     ("support_basis", {"threshold": 1.5, "degree": 2, "sketch_dim": 6}),
     ("support_basis_multi", {"thresholds": [1.5, 1.0, 0.5], "degrees": 2, "sketch_dim": 6}),
     ("support_basis_multi", {"thresholds": [1.5, 1.0, 0.5], "degrees": 4, "sketch_dim": 6, "kernel": "squared"})],
    ids=["single", "sketched", "multi-sketched", "multi-squared-sketched"],
)
def test_errors_match_a_dense_computation(method, settings):
    """Output and attention-matrix errors equal those computed directly from the full dense matrices
    (all rows sampled), pooled over layers as sqrt(sum of squares / sum of squares)."""
    capture = synthetic_capture(n=30, spread=1.3)
    result = run(capture, method, settings, rows=30)
    fast = support_basis_attention if method == "support_basis" else multi_threshold_attention
    twin = reference.support_basis_attention if method == "support_basis" else reference.multi_threshold_attention
    scale = float(capture.meta["scale"])
    err = ref = merr = mref = 0.0
    for layer in capture.layers.values():
        q, k, v = layer["q"], layer["k"], layer["v"]
        exact_w = reference.exact_attention(q, k, v, scale=scale, return_weights=True)
        approx_w = twin(q, k, v, scale=scale, return_weights=True, **settings)
        out = fast(q, k, v, scale=scale, **settings)
        exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        err += float((out - exact).pow(2).sum())
        ref += float(exact.pow(2).sum())
        merr += float((approx_w - exact_w).double().pow(2).sum())
        mref += float(exact_w.double().pow(2).sum())
    assert result.output_error == pytest.approx(math.sqrt(err / ref), rel=1e-4)
    assert result.matrix_error == pytest.approx(math.sqrt(merr / mref), rel=1e-4)
    assert 0 < result.exact_pair_share < 1 and result.output_error > 1e-4


def test_error_falls_with_degree_for_bounded_entries():
    capture = synthetic_capture(spread=0.5)
    errors = [run(capture, "as23", {"degree": g}).output_error for g in (1, 3, 6)]
    assert errors[0] > errors[1] > errors[2]


def test_sliding_window_capture_uses_the_window():
    capture = synthetic_capture(window="7")
    result = run(capture, "sink_window", {"sinks": 0, "local_window": 7})
    assert result.output_error < 1e-5  # the model's own window, computed exactly
    wider = run(synthetic_capture(window="none"), "sink_window", {"sinks": 0, "local_window": 7})
    assert wider.output_error > 1e-2


def test_modelled_flops_by_hand():
    n, d = 10, 4
    q = torch.zeros(1, 1, n, d)
    k = torch.zeros(1, 1, n, d)
    k[0, 0, :3, 0] = 5.0  # three large keys at threshold 1
    stats = {"pairs": torch.tensor(55), "exact_pairs": torch.tensor(20), "rows": torch.tensor(10), "exact_rows": torch.tensor(2)}
    cost, exact = modelled_flops("support_basis", {"threshold": 1.0, "degree": 2, "chunk_size": 4}, q=q, k=k, stats=stats)
    r = feature_dim(d, 2)
    small_q, small_k = 8, 7
    assert exact == 4 * d * 55
    assert cost == 4 * d * 20 + (small_q + small_k) * r * (1 + 2 * (d + 1)) + small_q * 2 * 4 * (r + d + 1)
    cost, _ = modelled_flops("sink_window", {"sinks": 1, "local_window": 2}, q=q, k=k, stats=stats)
    assert cost == 4 * d * 20


def test_grid_and_outputs(tmp_path):
    points = grid(["support_basis", "as23", "sink_window"], [1.0, 2.0], [2], 4, [8])
    cheb = {"kernel": "chebyshev"}  # always explicit: a model's settings without it take the method's default
    assert points == [("support_basis", {"threshold": 1.0, "degree": 2, **cheb}),
                      ("support_basis", {"threshold": 2.0, "degree": 2, **cheb}),
                      ("as23", {"degree": 2, **cheb}), ("sink_window", {"sinks": 4, "local_window": 8})]
    assert grid(["support_basis_multi", "as23"], [3.0], [2], 4, [8], sketch_dims=[None, 16]) == [
        ("support_basis_multi", {"thresholds": [3.0, 2.0, 1.0], "degrees": 2, **cheb}),
        ("support_basis_multi", {"thresholds": [3.0, 2.0, 1.0], "degrees": 2, "sketch_dim": 16, **cheb}),
        ("as23", {"degree": 2, **cheb}), ("as23", {"degree": 2, "sketch_dim": 16, **cheb})]
    assert features(64, {"degree": 2}) == 2145 and features(64, {"degree": 2, "sketch_dim": 100}) == 165
    assert features(64, {"thresholds": [3.0, 2.0], "degrees": [2, 1], "sketch_dim": 100}) == 165 + 65
    with pytest.raises(ValueError, match="unknown method"):
        grid(["bogus"], [1.0], [2], 4, [8])
    assert grid(["support_basis"], [3.0], [2], 4, [8], sketch_dims=[None, 16], kernels=["chebyshev", "squared"]) == [
        ("support_basis", {"threshold": 3.0, "degree": 2, **cheb}),
        ("support_basis", {"threshold": 3.0, "degree": 2, "sketch_dim": 16, **cheb}),
        ("support_basis", {"threshold": 3.0, "degree": 2, "kernel": "squared"}),
        ("support_basis", {"threshold": 3.0, "degree": 2, "sketch_dim": 16, "kernel": "squared"})]
    # the support-basis structure: every support-basis point gets it, as23 (the published baseline) does not
    assert grid(["support_basis", "as23"], [3.0], [0], 4, [8], kernels=["taylor"], sb_sinks=4, sb_windows=[0, 16]) == [
        ("support_basis", {"threshold": 3.0, "degree": 0, "kernel": "taylor", "sinks": 4}),
        ("support_basis", {"threshold": 3.0, "degree": 0, "kernel": "taylor", "sinks": 4, "local_window": 16}),
        ("as23", {"degree": 0, "kernel": "taylor"})]
    assert features(64, {"degree": 2, "kernel": "squared"}) == 2145  # sym2 of [1, k]: the degree-2 monomials
    assert features(64, {"degree": 4, "sketch_dim": 16, "kernel": "squared"}) == 81 * 82 // 2
    with pytest.raises(ValueError, match="even degrees"):
        grid(["support_basis"], [3.0], [3], 4, [8], kernels=["squared"])
    with pytest.raises(ValueError, match="kernel must be one of"):
        grid(["support_basis"], [3.0], [2], 4, [8], kernels=["gaussian"])
    capture = synthetic_capture()
    results = sweep_capture(capture, points, matrix_rows=4, progress=False)
    write_results(results, capture.meta, tmp_path)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["method"] for r in saved["results"]] == ["support_basis", "support_basis", "as23", "sink_window"]
    assert (tmp_path / "sweep.png").stat().st_size > 1000
    assert "| support_basis | threshold=1.0, degree=2, kernel=chebyshev |" in (tmp_path / "sweep.md").read_text()


def test_quantile_buckets_by_hand():
    from sb_hf.analysis.sweep import quantile_buckets

    maxima = torch.tensor([0.1 * i for i in range(1, 31)] + [9.0, 10.0])  # 30 small rows 0.1..3.0, two large
    # below 3.5: 0.1..3.0; torch.quantile's linear interpolation at 2/3 and 1/3: 2.0333, 1.0667
    assert quantile_buckets(maxima, 3.5) == [3.5, 2.0333, 1.0667]
    assert quantile_buckets(maxima, 3.5, buckets=2) == [3.5, 1.55]
    assert quantile_buckets(torch.ones(10), 3.0) == [3.0, 1.0]  # tied quantiles merge into one bucket
    with pytest.raises(ValueError, match="rows lie below threshold"):
        quantile_buckets(maxima, 0.15)


def test_sweep_cli_quantile_buckets(tmp_path):
    """`sb-hf sweep --buckets quantile` derives support_basis_multi's thresholds from the capture."""
    from sb_hf import cli
    from sb_hf.analysis.capture import save_capture
    from sb_hf.analysis.sweep import capture_row_maxima, quantile_buckets

    capture = synthetic_capture()
    path = tmp_path / "cap.safetensors"
    save_capture(capture, path)
    code = cli.main(["sweep", "--capture", str(path), "--methods", "support_basis_multi", "--thresholds", "2.0",
                     "--buckets", "quantile", "--matrix-rows", "4", "--output", str(tmp_path / "out")])
    assert code == 0
    (result,) = json.loads((tmp_path / "out" / "sweep.json").read_text())["results"]
    assert result["settings"]["thresholds"] == quantile_buckets(capture_row_maxima(capture), 2.0)
    assert len(result["settings"]["thresholds"]) == 3
