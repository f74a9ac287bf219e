"""The fast paths stay on: each test here fails when its path is skipped, not only when a result is wrong.

- ``generate()`` keeps a decoding state per layer on the transformers cache and computes every step after the
  prompt from it (the cache reaches the attention under whichever name this transformers passes it);
- a layer with per-head settings of the calibrated kind runs one call per decoding step;
- the local band of a prompt runs in PyTorch's fused CPU kernel at inference (and not when training);
- heads kept exact (threshold 0) run plain SDPA attention, no polynomial;
- (the C++ decoding step, when turned on: ``test_cpu_kernel.test_generate_with_the_kernel_matches_a_full_recompute``).
Each path's results are checked against a full recompute or the reference elsewhere; here we count the calls.
"""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_model
from test_hf import generation_matching_full_recompute, padded_batch

import sb_hf
import sb_hf.integrations.hf as hf
import sb_hf.ops.fused_cpu as fused_cpu
import sb_hf.ops.support_basis.chunk as support_basis
from sb_hf.integrations.cache import call_cache, layer_states, returned_cache

INF = float("inf")
STRUCTURE = dict(threshold=1.0, kernel="taylor", degree=2, sinks=2, local_window=4)
# The calibrated kind: degree-0 far field, per query head windows, sinks, key columns, a head kept exact.
CALIBRATED = dict(threshold=INF, degree=0, kernel="taylor", sinks=1, local_window=3, layers={
    0: {"heads": {0: {"sinks": 2, "local_window": 5}, 1: {"threshold": 0.0},
                  3: {"local_window": 6, "column_queries": [[0.5] * 8], "column_threshold": [0.2]}}},
    1: {"heads": {h: {"sinks": 2, "local_window": 4, "radius_limit": 3.0} for h in range(4)}}})


def _counting(monkeypatch, module, name, record=lambda *args, **kwargs: True):
    """Replace ``module.name`` by a wrapper that counts its calls (those ``record`` accepts) into the returned list."""
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        if record(*args, out=out, **kwargs):
            calls.append(1)
        return out

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generate_computes_every_step_after_the_prompt_from_the_decoding_states(kind, monkeypatch):
    """Sinks + local band + polynomial on a left-padded batch: one state per layer, which serves each of the 11
    steps after the prompt (the op never runs on a single query), and the logits equal a full recompute. Mistral's
    window (64) is longer than the sequence here: a state serves only while no sliding window drops keys."""
    model = tiny_model(kind, **({"sliding_window": 64} if kind == "mistral" else {}))
    sb_hf.apply_support_basis(model, **STRUCTURE)
    single_query_op_calls = _counting(monkeypatch, hf, "grouped_attention", lambda op, q, *a, out, **kw: q.shape[2] == 1)
    ids, mask = padded_batch(lengths=(14, 10), total=14)
    new = 12
    generated = generation_matching_full_recompute(model, ids, mask, new)
    per_layer = layer_states(returned_cache(generated))
    assert [len(states) for states in per_layer] == [1, 1]
    assert [state.served_steps for states in per_layer for state in states.values()] == [new - 1] * 2
    assert single_query_op_calls == []
    # A second generate() (the cache hook is now installed from the prompt on) keeps its own states the same way.
    again = layer_states(returned_cache(generation_matching_full_recompute(model, ids[:1], mask[:1], 5)))
    assert [state.served_steps for states in again for state in states.values()] == [4] * 2


def test_the_cache_reaches_the_attention_under_either_name():
    """transformers passes the cache to the attention module as ``cache`` (current) or ``past_key_values`` (older
    releases): the hook reads both, and ``returned_cache`` finds it in an output under either."""
    cache = object()
    assert call_cache({"cache": cache}) is cache and call_cache({"past_key_values": cache}) is cache
    assert call_cache({"cache": None, "past_key_values": cache}) is cache and call_cache({}) is None
    assert returned_cache({"past_key_values": cache}) is cache and returned_cache({"cache": cache}) is cache
    assert returned_cache({"logits": 1}) is None


def test_a_calibrated_per_head_layer_runs_one_call_per_decoding_step(monkeypatch):
    """Per-query-head settings of the calibrated kind (windows, sinks, key columns, a head kept exact): each layer's
    heads share one state and one call of the one-call-per-layer step per token, never the op per group."""
    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, **CALIBRATED)
    steps = _counting(monkeypatch, hf, "decoding_attention", lambda *a, out, **kw: out is not None)
    single_query_op_calls = _counting(monkeypatch, hf, "grouped_attention", lambda op, q, *a, out, **kw: q.shape[2] == 1)
    ids, mask = padded_batch(lengths=(14, 10), total=14)
    new = 10
    generated = generation_matching_full_recompute(model, ids, mask, new)
    per_layer = layer_states(returned_cache(generated))
    assert [len(states) for states in per_layer] == [1, 1]  # one state (one call) per layer
    assert [len(state.folded) for states in per_layer for state in states.values()] == [4, 4]  # a unit per query head
    assert len(steps) == 2 * (new - 1) and single_query_op_calls == []


def test_the_fused_cpu_band_runs_at_inference_and_not_in_training(monkeypatch):
    """A prompt's local band (window 4 of 33 tokens) runs in the fused CPU kernel: the first window's rows as one
    causal call, the rest as blocks, per layer; a training forward (it needs the band's gradient) uses matmuls."""
    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, **STRUCTURE)
    causal = _counting(monkeypatch, fused_cpu, "fused_causal")
    blocks = _counting(monkeypatch, fused_cpu, "fused_band")
    ids = torch.randint(1, VOCAB, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids)
    assert (len(causal), len(blocks)) == (2, 2)  # one of each per layer
    model.train()
    model(input_ids=ids).logits.sum().backward()
    assert (len(causal), len(blocks)) == (2, 2)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_heads_kept_exact_run_plain_sdpa_attention(kind, monkeypatch):
    """KV head 0 exact (threshold 0), KV head 1 approximated, unpadded prompt (Mistral: its window of 7 in effect): the
    exact head's call is plain attention (one per layer: no exact-row gathering, no polynomial), and equals SDPA's."""
    model = tiny_model(kind)
    ids = torch.randint(1, VOCAB, (2, 21), generator=torch.Generator().manual_seed(4))
    outputs = {}
    hook = model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, args, out: outputs.update(o=args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    sdpa = outputs.pop("o")
    sb_hf.apply_support_basis(model, threshold=1.0, layers={i: {"kv_heads": {0: {"threshold": 0.0}}} for i in range(2)})
    plain = _counting(monkeypatch, support_basis, "plain_attention")
    far = _counting(monkeypatch, support_basis, "far_part")
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    assert len(plain) == 2 and len(far) == 2  # per layer: the exact KV head plain, the other with its far part
    exact_heads = slice(0, 2 * 8)  # query heads 0-1 (KV head 0) in layer 0 (later layers' inputs differ)
    torch.testing.assert_close(outputs["o"][..., exact_heads], sdpa[..., exact_heads], rtol=1e-5, atol=1e-5)
