"""The benchmark scripts run end to end at tiny sizes and write what they print (no timings asserted)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model

from sb_hf.analysis.capture import capture_activations, save_capture
from sb_hf.calibration import calibrate, default_candidates, write_report

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def calibrated_capture(tmp_path, *, tokens: int, seed: int) -> tuple[Path, Path]:
    """A tiny Llama's captured activations over ``tokens`` random ids and their per-query-head calibration:
    the settings file and the capture file."""
    model = tiny_model("llama", max_position_embeddings=512)
    ids = torch.randint(1, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(seed))
    capture = capture_activations(model, ids)
    candidates = default_candidates((float("inf"),), 0, sinks=2, local_windows=(8, 32), column_shares=(0.0, 0.05))
    _, settings = write_report(calibrate(capture, budget=0.2, candidates=candidates, per_head=True), tmp_path / "cal")
    return settings, save_capture(capture, tmp_path / "capture.safetensors")


def test_op_scaling_random_inputs(tmp_path):
    methods = ("sdpa", "support_basis", "sink_window", "block_support", "block_support_flex")
    out = _run("op_scaling.py", "--lengths", "200", "--methods", ",".join(methods),
               "--large-rows", "4", "--window", "32", "--threads", "1", "--output", str(tmp_path),
               "--block", '{"gamma": 0.5, "block_size": 16, "local_window": 16}')
    rows = json.loads((tmp_path / "op_scaling.json").read_text())["rows"]
    assert [(r["n"], r["method"]) for r in rows] == [(200, m) for m in methods]
    assert 0 < rows[4]["kernel_share"] < 1  # FlexAttention's: the blocks its kernel reads
    share = {(r["n"], r["method"]): r["exact_pair_share"] for r in rows}
    assert share[200, "sdpa"] == 1.0 and 0 < share[200, "sink_window"] < 1 and 0 < share[200, "support_basis"] < 1
    assert 0 < share[200, "block_support"] < 1 and rows[3]["kernel_share"] > share[200, "block_support"]
    assert "vs sdpa" in out and all(r["seconds"] > 0 for r in rows)
    assert (tmp_path / "op_scaling.png").exists()


def test_op_scaling_calibrated_settings_on_a_capture(tmp_path):
    """--settings/--capture: a per-query-head calibration of a tiny model, run on its captured layer."""
    settings, path = calibrated_capture(tmp_path, tokens=300, seed=0)
    _run("op_scaling.py", "--settings", str(settings), "--capture", str(path), "--layer", "1", "--lengths", "256",
         "--methods", "sdpa,support_basis", "--threads", "1", "--backward", "--output", str(tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "op_scaling.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["sdpa", "support_basis"] and all(r["backward"] for r in rows)
    assert 0 < rows[1]["exact_pair_share"] < 1


def test_end_to_end_on_a_saved_tiny_model(tmp_path):
    model = tiny_model("llama", max_position_embeddings=512)
    model.save_pretrained(tmp_path / "model")
    _run("end_to_end.py", "--model", str(tmp_path / "model"), "--lengths", "40,90", "--new-tokens", "2", "--threads", "1",
         "--repeats", "2", "--cpu-kernel", "--output", str(tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "end_to_end.json").read_text())["rows"]
    assert all(len(r["prefill_seconds_each"]) == 2 and r["prefill_seconds"] == sum(r["prefill_seconds_each"]) / 2 for r in rows)
    assert [(r["n"], r["method"]) for r in rows] == [(n, m) for n in (40, 90) for m in ("sdpa", "support_basis", "support_basis_cpu_kernel")]
    assert all(r["prefill_seconds"] > 0 and r["decode_ms_per_token"] > 0 for r in rows)
    # every decoding step of support basis (both steps, every layer) came from its decoding state
    assert [r["state_steps"] for r in rows] == [0, 2, 2] * 2
    assert (tmp_path / "out" / "end_to_end.png").exists()


def test_end_to_end_block_support(tmp_path):
    model = tiny_model("llama", max_position_embeddings=512)
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "block.json").write_text(json.dumps({"block": {"exact_below": 0, "block_size": 16}}))
    _run("end_to_end.py", "--model", str(tmp_path / "model"), "--method", "block_support", "--settings",
         str(tmp_path / "block.json"), "--lengths", "90", "--new-tokens", "2", "--threads", "1", "--repeats", "1",
         "--output", str(tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "end_to_end.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["sdpa", "block_support"] and all(r["prefill_seconds"] > 0 for r in rows)


def test_end_to_end_no_attention_bound(tmp_path):
    """--method no_attention runs beside SDPA, and its attention reads no key: each position's logits depend on its
    own token only (a run that silently kept SDPA would mix the prefix in)."""
    model = tiny_model("llama", max_position_embeddings=512)
    model.save_pretrained(tmp_path / "model")
    _run("end_to_end.py", "--model", str(tmp_path / "model"), "--method", "no_attention", "--lengths", "50",
         "--new-tokens", "2", "--threads", "1", "--repeats", "1", "--output", str(tmp_path / "out"))
    rows = json.loads((tmp_path / "out" / "end_to_end.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["sdpa", "no_attention"] and all(r["decode_ms_per_token"] > 0 for r in rows)
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from end_to_end import NO_ATTENTION, register_no_attention
    finally:
        sys.path.remove(str(BENCHMARKS))
    register_no_attention()
    ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, -1] = ids[0, -1]  # two prefixes, one last token
    with torch.no_grad():
        exact = model(input_ids=ids).logits[:, -1]
        model.set_attn_implementation(NO_ATTENTION)
        none = model(input_ids=ids).logits[:, -1]
    assert not torch.allclose(exact[0], exact[1]) and torch.equal(none[0], none[1])


@pytest.mark.parametrize("all_logits", [False, True])
def test_end_to_end_prefill_computes_the_logits_generate_does(all_logits):
    """Prefill keeps the last position's logits only, as generate() does (--all-logits: every position's)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from end_to_end import measure
    finally:
        sys.path.remove(str(BENCHMARKS))
    from sb_hf.integrations.cache import cache_argument

    model = tiny_model("llama")
    shapes, arguments, forward = [], [], model.forward

    @functools.wraps(forward)  # (keeps forward's signature, which names the cache argument)
    def recording(*args, **kwargs):
        arguments.append(set(kwargs))
        out = forward(*args, **kwargs)
        shapes.append(tuple(out.logits.shape))
        return out

    model.forward = recording
    name = cache_argument(model)
    measure(model, torch.randint(1, model.config.vocab_size, (1, 30)), new_tokens=2, all_logits=all_logits)
    vocab = model.config.vocab_size
    assert shapes == [(1, 30 if all_logits else 1, vocab), (1, 1, vocab), (1, 1, vocab)]
    # the steps pass the cache under the name this transformers takes (no deprecated name, no warning)
    assert all(name in kw and kw & {"cache", "past_key_values"} == {name} for kw in arguments[1:])


def test_decode_step_with_calibrated_settings_on_a_capture(tmp_path):
    """Every layer of a per-query-head calibration of a tiny model, decoding steps on its captured activations."""
    settings, path = calibrated_capture(tmp_path, tokens=260, seed=1)
    out = _run("decode_step.py", "--settings", str(settings), "--capture", str(path), "--lengths", "100,240", "--steps", "3",
               "--threads", "1", "--cpu-kernel", "--output", str(tmp_path / "out"))
    data = json.loads((tmp_path / "out" / "decode_step.json").read_text())
    assert data["layers"] == [0, 1] and [r["n"] for r in data["rows"]] == [100, 240]
    assert all(r["sdpa_ms"] > 0 and r["support_basis_ms"] > 0 and 0 < r["exact_pair_share"] < 1 for r in data["rows"])
    assert all(r["aten_calls_per_layer"] >= 20 for r in data["rows"])  # fold, far part, band, merge: tens of calls
    assert all(r["band_sdpa_ms"] > 0 and r["cpu_kernel_ms"] > 0 for r in data["rows"])
    assert "vs sdpa" in out and "band sdpa ms" in out and "cpu kernel ms" in out and (tmp_path / "out" / "decode_step.png").exists()


def test_widest_bands_are_the_longest_window_of_each_kv_head_or_every_key():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from decode_step import widest_bands
    finally:
        sys.path.remove(str(BENCHMARKS))
    from sb_hf.ops.decoding import EVERY_KEY

    settings = dict(threshold=2.0, local_window=16, layers={
        0: {"heads": {h: {"local_window": w} for h, w in enumerate([8, 300, 40, 8, 8, 8])}},
        1: {"kv_heads": {1: {"threshold": 0.0}}}})
    assert widest_bands(settings, 0, 6, 2) == [300, 8]  # query heads 0-2 on KV head 0, 3-5 on KV head 1
    assert widest_bands(settings, 1, 6, 2) == [16, EVERY_KEY]  # a KV head computed exactly reads every key
    assert widest_bands(settings, 2, 6, 2) == [16, 16]


def test_block_support_quality_runs_the_twin_in_the_real_model(tmp_path, require_assets):
    """The twin, sink + window and support basis as the packaged model's attention on 64 tokens: a table and JSON,
    and a twin keeping every block exact (gamma 1) scores what exact attention scores."""
    points = json.dumps([["block_support", {"gamma": 1.0, "block_size": 8, "local_window": 8}],
                         ["block_support", {"gamma": 0.0, "block_size": 8, "local_window": 8, "selection": "row"}],
                         ["sink_window", {"sinks": 4, "local_window": 16}]])
    out = _run("block_support_quality.py", "--tokens", "64", "--points", points, "--output", str(tmp_path))
    assert "| block_support |" in out and "| sink_window |" in out
    rows = json.loads((tmp_path / "block_quality.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["exact", "block_support", "block_support", "sink_window"]
    assert rows[1]["exact_share"] == 1.0 and rows[1]["kl"] < 1e-6 and rows[1]["top1"] == 1.0
    assert rows[2]["exact_share"] < 1.0 and rows[2]["selected_share"] == 0.0 and rows[2]["kl"] > rows[1]["kl"]


def test_block_selection_study_on_a_capture(tmp_path):
    """The selection study on a tiny model's capture (300 tokens, blocks of 64): every rule at each gamma, its missed
    mass in [0, 1] and its cost; the per-row oracle misses at most 1 - gamma, and sharing a row's selection over its
    block (the union) misses no more than the row's own."""
    model = tiny_model("llama", max_position_embeddings=512)
    ids = torch.randint(1, VOCAB, (1, 300), generator=torch.Generator().manual_seed(3))
    path = save_capture(capture_activations(model, ids), tmp_path / "capture.safetensors")
    out = _run("block_selection_study.py", "--capture", str(path), "--gammas", "0.5,0.9", "--local-window", "64",
               "--output", str(tmp_path / "out"))
    assert "| oracle-row g0.9 |" in out and "| antidiagonal g0.5 |" in out
    rows = {r["rule"]: r for r in json.loads((tmp_path / "out" / "selection_study.json").read_text())["rows"]}
    assert len(rows) == 2 * 9 and all(0 <= r["missed"] <= 1 and 0 < r["cost"] for r in rows.values())
    for g in ("0.5", "0.9"):
        assert rows[f"oracle-row g{g}"]["missed"] <= 1 - float(g) + 1e-6
        assert rows[f"oracle-union g{g}"]["missed"] <= rows[f"oracle-row g{g}"]["missed"] + 1e-6


def test_far_field_study_on_a_capture(tmp_path):
    """The far-field study on a tiny model's capture (320 tokens, the last 128 rows): with every block kept (gamma 1)
    nothing is left out (error 0, every key exact); at gamma 0.5 some keys are left out, and a far field that stands
    for them changes the error."""
    model = tiny_model("llama", max_position_embeddings=512)
    ids = torch.randint(1, VOCAB, (1, 320), generator=torch.Generator().manual_seed(4))
    path = save_capture(capture_activations(model, ids), tmp_path / "capture.safetensors")
    for part, count in (("far", 2 * 3), ("ranking", 3)):
        _run("far_field_study.py", "--capture", str(path), "--part", part, "--rows", "128", "--gammas", "0.5,1.0",
             "--output", str(tmp_path / part))
        rows = json.loads((tmp_path / part / "far_field_study.json").read_text())["rows"]
        layers = {r["layer"] for r in rows}
        assert len(rows) == len(layers) * count * 2
        for r in rows:
            assert 0 < r["exact_share"] <= 1 and r["error"] >= 0
            if r["gamma"] == 1.0:
                assert r["error"] < 1e-5 and r["exact_share"] == pytest.approx(1.0)
        half = [r for r in rows if r["gamma"] == 0.5]
        assert all(r["exact_share"] < 1 and r["error"] > 0 for r in half)
    rows = json.loads((tmp_path / "far" / "far_field_study.json").read_text())["rows"]
    fields = {r["far"]: r["error"] for r in rows if r["gamma"] == 0.5 and r["rule"] == "oracle" and r["layer"] == min(layers)}
    assert len(set(fields.values())) == 3  # (dropped, centroids and sampled keys differ)


def test_long_capture_stretches_the_rotary_embedding(tmp_path, require_assets):
    """One layer of the packaged model captured with linear RoPE interpolation: position 0 is unchanged (its rotation
    is the identity at any factor), later positions rotate by half the angle at factor 2, so their q differ."""
    from sb_hf.analysis.capture import load_capture

    captured = {}
    for factor in ("1", "2"):
        out = _run("long_capture.py", "--tokens", "128", "--layer", "0", "--rope-factor", factor,
                   "--output", str(tmp_path / f"cap{factor}.safetensors"))
        assert f"linear RoPE factor {factor}" in out
        captured[factor] = load_capture(tmp_path / f"cap{factor}.safetensors")
    q1, q2 = (captured[f].layers[0]["q"].float() for f in ("1", "2"))
    assert q1.shape == (1, 9, 128, 64) and captured["2"].meta["rope_factor"] == "2"
    torch.testing.assert_close(q1[:, :, 0], q2[:, :, 0], rtol=1e-3, atol=1e-3)
    assert (q1[:, :, 100] - q2[:, :, 100]).abs().max() > 0.1


def test_gpu_check_runs_without_a_gpu_and_skips_what_needs_one(tmp_path):
    """benchmarks/gpu_check.sh on a CPU: versions written, the GPU parts written as skipped, the report made."""
    root = BENCHMARKS.parent
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), str(tmp_path)], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "versions.json").read_text())["torch"] == torch.__version__
    if not torch.cuda.is_available():
        for part in ("op", "model"):
            assert json.loads((tmp_path / f"{part}.json").read_text()) == {"skipped": "no CUDA device"}
        assert "skipped: no CUDA device" in (tmp_path / "report.md").read_text()


def test_gpu_report_tables(tmp_path):
    """The report's tables from rows as the GPU parts write them (an error row kept)."""
    sys.path.insert(0, str(BENCHMARKS))
    import gpu_bench

    (tmp_path / "versions.json").write_text(json.dumps({"gpu": "NVIDIA H100", "torch": "2.11.0"}))
    (tmp_path / "op.json").write_text(json.dumps({"rows": [
        {"n": 8192, "sdpa_flash_s": 0.01, "flex_dense_s": 0.012, "block_support_s": 0.008, "block_vs_sdpa": 0.8,
         "block_vs_flex": 0.67, "listed_share": 0.3}, {"n": 131072, "error": "OutOfMemoryError: ..."}]}))
    text = gpu_bench.report(tmp_path)
    assert "GPU: NVIDIA H100; torch 2.11.0" in text and "| 8192 | 0.01 | 0.012 | 0.008 | 0.8 | 0.67 | 0.3 |" in text
    assert "| 131072 | None" in text and "skipped: not run" in text  # (no model.json)


def test_structured_activations_attend_locally_and_select_a_minority_of_blocks():
    """The op benchmark's synthetic layer: most of a query's attention within its last 384 keys or on the sink and
    retrieved keys, and block support (eager FlexAttention, the defaults but blocks of 32) reads under half of
    dense causal attention's blocks at 2048 tokens."""
    sys.path.insert(0, str(BENCHMARKS))
    import gpu_bench
    from sb_hf.ops.block_support import block_support_flex

    q, k, v = gpu_bench.structured_qkv(2048, q_heads=4, kv_heads=2, d=64, dtype=torch.float32)
    assert q.shape == (1, 4, 2048, 64) and k.shape == v.shape == (1, 2, 2048, 64)
    scores = q[0, 0, -64:] @ k[0, 0].T / 8
    weights = torch.softmax(scores.masked_fill(torch.arange(2048) > torch.arange(1984, 2048)[:, None], float("-inf")), -1)
    assert weights.max(dim=-1).values.mean() > 0.3
    info = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (eager FlexAttention's advice to compile)
        block_support_flex(q, k, v, block_size=32, compiled=False, info=info)
    assert 0 < float(info["listed_blocks"] / info["causal_blocks"]) < 0.5


def test_gpu_benchmark_dry_runs_on_a_cpu(tmp_path):
    """``gpu_bench.py op|model --device cpu``: the op part's code (SDPA's flash backend, compiled dense FlexAttention,
    compiled block support) on one short Llama-3-8B-shaped layer, and the model part's (prefill and decoding, SDPA
    and block_support) on a tiny random Llama; their rows written, no error."""
    _run("gpu_bench.py", "op", "--device", "cpu", "--lengths", "300", "--repeats", "1", "--output", str(tmp_path))
    (row,) = json.loads((tmp_path / "op.json").read_text())["rows"]
    assert row["n"] == 300 and "error" not in row and row["block_support_s"] > 0 and row["listed_share"] > 0
    _run("gpu_bench.py", "model", "--device", "cpu", "--models", "tiny-shape", "--lengths", "200", "--new-tokens", "2",
         "--repeats", "1", "--output", str(tmp_path))
    (row,) = json.loads((tmp_path / "model.json").read_text())["rows"]
    assert row["model"] == "tiny-shape" and "error" not in row and row["block_support_decode_ms"] > 0
