"""The support-basis decoding cache (sb_hf.ops.decoding): single-query steps that take the far part from running
sums give, step by step, what the op gives without the state and what the quadratic reference gives; the state
resets when it must; and `generate()` keeps one per layer on the transformers cache, matching a full recompute
(greedy and beam search, a cropped cache)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_hf import generation_matching_full_recompute, logits, padded_batch
from test_ops import F64, INF

import sb_hf
from sb_hf.ops import as23_attention, multi_threshold_attention, reference, support_basis_attention
from sb_hf.integrations.cache import cache_argument, layer_states, returned_cache
from sb_hf.ops.decoding import DecodingState

HEAD_DIM = 8
COLUMNS = torch.randn(6, HEAD_DIM, generator=torch.Generator().manual_seed(3), dtype=F64) * 2
# (op, its reference, settings): a mix of large and small rows (entries ~ N(0, 1.5^2), thresholds 2.5-4), every
# kernel, sketched features, several buckets, and the structure (sinks, a local window, key columns).
SETTINGS = {
    "chebyshev": (support_basis_attention, reference.support_basis_attention, dict(threshold=3.0, degree=2, kernel="chebyshev")),
    "fixed-radius-deg3": (support_basis_attention, reference.support_basis_attention, dict(threshold=3.0, degree=3, radius=4.0, kernel="chebyshev")),
    "squared-sinks": (support_basis_attention, reference.support_basis_attention,
                      dict(threshold=2.5, degree=2, kernel="squared", sinks=2)),
    "taylor0-structure": (support_basis_attention, reference.support_basis_attention,
                          dict(threshold=3.0, degree=0, kernel="taylor", sinks=3, local_window=9)),
    "taylor2-columns": (support_basis_attention, reference.support_basis_attention,
                        dict(threshold=INF, degree=2, kernel="taylor", local_window=5, column_queries=COLUMNS,
                             column_threshold=torch.linspace(0.5, 1.5, 6, dtype=F64))),
    "sketched": (support_basis_attention, reference.support_basis_attention, dict(threshold=3.0, degree=2, sketch_dim=24)),
    "multi": (multi_threshold_attention, reference.multi_threshold_attention,
              dict(thresholds=[3.5, 2.0], degrees=[2, 1], kernel="chebyshev")),
    "as23": (as23_attention, reference.as23_attention, dict(degree=2)),
}


def qkv(length, *, batch=2, q_heads=6, kv_heads=2, dtype=F64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda heads, scale: (torch.randn(batch, heads, length, HEAD_DIM, generator=generator, dtype=F64) * scale).to(dtype)
    return make(q_heads, 1.5), make(kv_heads, 1.5), make(kv_heads, 1.0)


def left_padding(batch, length, pads=(5, 0)):
    mask = torch.ones(batch, length, dtype=torch.bool)
    for row, pad in enumerate(pads[:batch]):
        mask[row, :pad] = False
    return mask


def steps(op, q, k, v, mask, prompt, state, **settings):
    """The prompt as one call, then one call per query (each with every key so far), all with ``state``."""
    outs = [op(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], key_padding_mask=mask[:, :prompt],
               decoding_state=state, **settings)]
    for t in range(prompt, q.shape[2]):
        outs.append(op(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], key_padding_mask=mask[:, : t + 1],
                       decoding_state=state, **settings))
    return torch.cat(outs, dim=2)


@pytest.mark.parametrize("name", SETTINGS)
def test_steps_with_the_state_match_the_op_and_the_reference(name):
    """fp64, GQA (6 query heads on 2 KV heads), a left-padded row, 23 prompt tokens then 47 steps (no length a
    multiple of any block size): the state's steps equal the op without a state and the reference, and the
    state holds every key behind the local band."""
    op, ref, settings = SETTINGS[name]
    q, k, v = qkv(70)
    mask = left_padding(2, 70)
    state = DecodingState()
    got = steps(op, q, k, v, mask, 23, state, **settings)
    assert state.folded == [70 - settings.get("local_window", 0)] * 2  # one unit per KV head
    for t in range(23, 70):
        keys = dict(key_padding_mask=mask[:, : t + 1], **settings)
        plain = op(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], **keys)
        torch.testing.assert_close(got[:, :, t : t + 1], plain, rtol=1e-9, atol=1e-9, msg=lambda m: f"step {t}: {m}")
    expected = ref(q, k, v, key_padding_mask=mask, **settings)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)


def test_float32_steps_match_the_op():
    """fp32 at the calibrated kind of setting (taylor degree 0, sinks, a window, key columns; the running sums
    add in another order than the op's prefix sums): close to the op."""
    op, _, settings = SETTINGS["taylor0-structure"]
    settings = dict(settings, column_queries=COLUMNS, column_threshold=1.0)
    q, k, v = qkv(90, dtype=torch.float32, seed=4)
    mask = left_padding(2, 90, pads=(0, 7))
    got = steps(op, q, k, v, mask, 11, DecodingState(), **settings)
    expected = op(q, k, v, key_padding_mask=mask, **settings)
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_steps_count_the_same_pairs():
    _, _, settings = SETTINGS["taylor2-columns"]
    q, k, v = qkv(40)
    mask = left_padding(2, 40)
    counted = []
    for state in (DecodingState(), None):
        stats = {}
        for t in range(20, 40):
            support_basis_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], key_padding_mask=mask[:, : t + 1],
                                    decoding_state=state, stats=stats, **settings)
        counted.append({key: value.item() for key, value in stats.items()})
    assert counted[0] == counted[1]
    assert 0 < counted[0]["exact_pairs"] < counted[0]["pairs"]


def test_state_serves_only_single_query_inference_steps_and_resets_when_it_must():
    _, _, settings = SETTINGS["taylor0-structure"]
    q, k, v = qkv(40)
    state = DecodingState()
    step = lambda t, **extra: support_basis_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1],
                                                      decoding_state=state, **{**settings, **extra})
    step(30)
    assert state.folded == [31 - 9] * 2
    support_basis_attention(q[:, :, 31:33], k[:, :, :33], v[:, :, :33], decoding_state=state, **settings)
    assert state.folded == [22] * 2  # two queries: the op in full, the state left alone
    step(35)
    assert state.folded == [36 - 9] * 2  # folds what it had not seen
    step(36, sinks=2)  # other settings: a new state
    assert state.folded == [37 - 9] * 2
    step(20)  # fewer keys than folded (a cropped cache): a new state
    assert state.folded == [21 - 9] * 2
    step(25, evaluation="scores")  # a form that has no state
    assert state.folded == [12] * 2
    out = step(30, sliding_window=10)  # a sliding window in effect: the op in full, the state emptied
    assert state.folded == [0] * 2
    expected = support_basis_attention(q[:, :, 30:31], k[:, :, :31], v[:, :, :31], sliding_window=10, **settings)
    torch.testing.assert_close(out, expected)
    with torch.enable_grad():
        qq = q[:, :, 30:31].clone().requires_grad_()
        support_basis_attention(qq, k[:, :, :31], v[:, :, :31], decoding_state=state, **settings).sum().backward()
    assert state.folded == [0] * 2 and qq.grad is not None  # training: the op in full


def test_a_state_checks_each_new_key_once():
    _, _, settings = SETTINGS["chebyshev"]
    q, k, v = qkv(30)
    state = DecodingState()
    support_basis_attention(q[:, :, 20:21], k[:, :, :21], v[:, :, :21], decoding_state=state, **settings)
    k[0, 1, 21, 3] = float("nan")
    with pytest.raises(ValueError, match="k contains NaN"):
        support_basis_attention(q[:, :, 21:22], k[:, :, :22], v[:, :, :22], decoding_state=state, **settings)
    assert state.folded == []  # the state forgot the key it had folded
    k[0, 1, 21, 3] = 0.5
    q[1, 4, 22, 0] = float("inf")
    with pytest.raises(ValueError, match="q contains NaN or inf"):
        support_basis_attention(q[:, :, 22:23], k[:, :, :23], v[:, :, :23], decoding_state=state, **settings)
    q[1, 4, 22, 0] = 0.5
    got = support_basis_attention(q[:, :, 22:23], k[:, :, :23], v[:, :, :23], decoding_state=state, **settings)
    torch.testing.assert_close(got, support_basis_attention(q[:, :, 22:23], k[:, :, :23], v[:, :, :23], **settings))


# --------------------------------------------------------------------------- transformers


SB_SETTINGS = dict(threshold=1.0, kernel="taylor", degree=2, sinks=2, local_window=4)
PER_HEAD = dict(threshold=2.0, layers={0: {"heads": {0: {"threshold": INF, "degree": 0, "sinks": 1, "local_window": 3},
                                                    3: {"threshold": 1.5}}}})


states_of = layer_states


def test_beam_search_reorders_and_the_states_follow():
    """Beam search reorders the cache every step (reorder_cache): the states are dropped then, so the beams
    score as without a cache. (No local window: generated keys are folded from the first step on, and beams
    differ in them.)"""
    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, **{**SB_SETTINGS, "local_window": 0})
    ids, mask = padded_batch(lengths=(12, 9), total=12)
    runs = [model.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0,
                           use_cache=use_cache, output_scores=True, return_dict_in_generate=True)
            for use_cache in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    torch.testing.assert_close(runs[0].sequences_scores, runs[1].sequences_scores, rtol=1e-4, atol=1e-4)


def test_a_cropped_cache_drops_the_states():
    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, **SB_SETTINGS)
    ids = torch.randint(1, 90, (1, 30), generator=torch.Generator().manual_seed(2))
    full = logits(model, ids)
    name = cache_argument(model)
    with torch.no_grad():
        cache = returned_cache(model(input_ids=ids[:, :10], use_cache=True))
        for t in range(10, 22):
            cache = returned_cache(model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache}))
        assert all(min(state.folded) > 0 for states in states_of(cache) for state in states.values())
        cache.crop(-7)  # 22 keys -> 15
        assert all(not states for states in states_of(cache))
        for t in range(15, 30):
            out = model(input_ids=ids[:, t : t + 1], use_cache=True, **{name: cache})
            torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- one call per layer


def per_head_groups(q_heads=6, per_query_head=True):
    """Heads that share the polynomial but not the structure: windows, sinks, key columns, radius limits."""
    structures = [dict(local_window=4, sinks=2), dict(local_window=0, sinks=0, radius_limit=6.0),
                  dict(local_window=9, sinks=1, column_queries=COLUMNS[:1], column_threshold=torch.tensor([0.8], dtype=F64))]
    core = dict(threshold=3.0, degree=2, kernel="taylor", radius=None, sketch_dim=None, sketch_seed=0)
    heads = [[0, 3], [1, 5], [2, 4]] if per_query_head else [[0], [1]]
    if not per_query_head:
        structures = structures[:0:-1]  # key columns and the tight radius limit
    groups = []
    for members, structure in zip(heads, structures):
        kwargs = {**core, "radius_limit": 150.0, "sinks": 0, "local_window": 0, **structure}
        if "column_queries" in kwargs:
            rows = len(members) * (1 if per_query_head else q_heads // 2)
            kwargs["column_queries"] = COLUMNS[:rows]
            kwargs["column_threshold"] = torch.linspace(0.6, 1.2, rows, dtype=F64)
        groups.append((members, kwargs))
    return groups


@pytest.mark.parametrize("fused", [True, False], ids=["fused-band", "matmul-band"])
@pytest.mark.parametrize("per_query_head", [True, False], ids=["query-heads", "kv-heads"])
def test_one_call_per_layer_matches_the_op_per_group(per_query_head, fused, monkeypatch):
    """:func:`decoding_attention` with every head's structure at once equals the op run per group of heads
    without a state (outputs and pair counts), step by step over a left-padded batch; the local band in the
    fused CPU kernel and in plain matmuls (CUDA's path), windows of 0 (no band), 4 and 9 keys."""
    import sb_hf.ops.fused_cpu as fused_cpu
    from sb_hf.integrations.plan import polynomial_of, units_of
    from sb_hf.ops.decoding import decoding_attention
    from sb_hf.ops.heads import grouped_attention

    calls = []
    available = fused_cpu.available
    monkeypatch.setattr(fused_cpu, "available", lambda q, v: calls.append(1) is None and fused and available(q, v))
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    kernel_calls = []
    monkeypatch.setattr(fused_cpu, "kernel", lambda *a, **kw: kernel_calls.append(1) or kernel(*a, **kw))

    groups = per_head_groups(per_query_head=per_query_head)
    polynomial = polynomial_of("support_basis", groups[0][1])
    units = units_of(groups, per_query_head, 6, 2)
    q, k, v = qkv(60, seed=8)
    mask = left_padding(2, 60, pads=(3, 0))
    state = DecodingState()
    for t in range(30, 60):
        stats_layer, stats_groups = {}, {}
        step = dict(key_padding_mask=mask[:, : t + 1])
        got = decoding_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], state, polynomial=polynomial, units=units,
                                 stats=stats_layer, **step)
        expected = grouped_attention(support_basis_attention, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1],
                                     groups, per_query_head=per_query_head, stats=stats_groups, **step)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"step {t}: {m}")
        assert {key: value.item() for key, value in stats_layer.items()} == {key: value.item() for key, value in stats_groups.items()}
    assert len(state.folded) == (6 if per_query_head else 2)
    assert len(calls) == 30 and len(kernel_calls) == (30 if fused else 0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-band", "matmul-band"])
def test_a_band_per_kv_head_when_their_windows_differ(fused, monkeypatch):
    """Query heads whose longest windows differ per KV head (21 keys on KV head 0, 3 on KV head 1): the band runs
    one span per KV head, each reading its own window, and the steps still equal the op per query head."""
    import sb_hf.ops.fused_cpu as fused_cpu
    from sb_hf.integrations.plan import polynomial_of, units_of
    from sb_hf.ops.decoding import decoding_attention
    from sb_hf.ops.heads import grouped_attention

    if not fused:
        monkeypatch.setattr(fused_cpu, "available", lambda q, v: False)
    core = dict(threshold=3.0, degree=0, kernel="taylor", radius=None, sketch_dim=None, sketch_seed=0, radius_limit=150.0, sinks=1)
    groups = [([h], {**core, "local_window": w}) for h, w in enumerate([2, 0, 21, 3, 1, 2])]
    units = units_of(groups, True, 6, 2)
    q, k, v = qkv(50, seed=9)
    mask = left_padding(2, 50, pads=(4, 0))
    state = DecodingState()
    for t in range(25, 50):
        step = dict(key_padding_mask=mask[:, : t + 1])
        got = decoding_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], state,
                                 polynomial=polynomial_of("support_basis", groups[0][1]), units=units, **step)
        expected = grouped_attention(support_basis_attention, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1],
                                     groups, per_query_head=True, **step)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"step {t}: {m}")
    assert state._band_spans == [(0, 1, 21), (1, 2, 3)]


def test_one_call_per_layer_is_not_served_outside_decoding():
    from sb_hf.integrations.plan import polynomial_of, units_of
    from sb_hf.ops.decoding import decoding_attention

    groups = per_head_groups()
    polynomial, units = polynomial_of("support_basis", groups[0][1]), units_of(groups, True, 6, 2)
    q, k, v = qkv(20)
    state = DecodingState()
    assert decoding_attention(q[:, :, 18:], k, v, state, polynomial=polynomial, units=units) is None  # two queries
    assert decoding_attention(q[:, :, 19:], k, v, state, polynomial=polynomial, units=units, sliding_window=10) is None
    assert decoding_attention(q[:, :, 19:], k, v, state, polynomial=polynomial, units=units) is not None


PER_HEAD_STRUCTURE = dict(threshold=1.5, kernel="taylor", degree=2, layers={
    0: {"heads": {0: {"sinks": 1, "local_window": 3}, 3: {"local_window": 6, "column_queries": [[0.5] * 8],
                                                          "column_threshold": [0.2]}, 1: {"threshold": 0.0}}},
    1: {"kv_heads": {1: {"sinks": 3, "local_window": 2, "radius_limit": 20.0}}}})  # query head 1: exact


# settings, then per layer: how many decoding states (op calls per step) and how many units each holds
GENERATE_CASES = {
    "layer": (SB_SETTINGS, [1, 1], [[2], [2]]),  # one unit per KV head
    "per-head-polynomials": (PER_HEAD, [3, 1], [[1, 2, 1], [2]]),  # layer 0: heads 0, 1-2 and 3 apart (three polynomials)
    "per-head-structure": (PER_HEAD_STRUCTURE, [1, 1], [[4], [2]]),  # one call per layer: query heads / KV heads
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate_keeps_decoding_states_and_matches_a_full_recompute(case):
    """Greedy generation over a left-padded batch gives, step by step, the logits of a full forward pass; the
    cache holds the expected decoding states, which hold every key behind the band."""
    settings, calls, units = GENERATE_CASES[case]
    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, **settings)
    ids, mask = padded_batch(lengths=(14, 10), total=14)
    new = 12
    generated = generation_matching_full_recompute(model, ids, mask, new)
    per_layer = states_of(returned_cache(generated))
    assert [len(states) for states in per_layer] == calls
    assert [[len(state.folded) for state in states.values()] for states in per_layer] == units
    # every step after the prompt came from the states (the prompt is a prefill, which the op runs in full)
    assert all(state.served_steps == new - 1 for states in per_layer for state in states.values())
    if case == "layer":
        assert all(state.folded == [ids.shape[1] + new - 1 - settings["local_window"]] * 2
                   for states in per_layer for state in states.values())


def test_a_model_that_generated_still_pickles_and_forgets_the_cache(tmp_path):
    """The attention modules keep the cache they were called with only weakly, and not on themselves: the
    model saves whole (torch.save pickles it) and a dropped cache is freed."""
    import gc
    import weakref

    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, **SB_SETTINGS)
    ids = torch.randint(1, 90, (1, 12), generator=torch.Generator().manual_seed(4))
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    cache = weakref.ref(returned_cache(generated))
    assert states_of(cache())[0]  # the steps kept a decoding state on it
    del generated
    gc.collect()
    assert cache() is None
    torch.save(model, tmp_path / "model.pt")
    reloaded = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


class Casts:
    """The shapes of the tensors cast to another dtype (``aten._to_copy``) while active."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        shapes = self.shapes = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._to_copy.default:
                    shapes.append(tuple(args[0].shape))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("name", ["taylor0-structure", "taylor2-columns", "chebyshev"])
def test_a_step_over_a_bf16_cache_casts_only_what_it_reads(name):
    """A bf16 KV cache: each decoding step casts the keys it reads (the new key, the band; the first step folds the
    prompt's keys) and never the whole cache (O(context) per token); the steps equal the op run without a state.
    Small queries (no large row, which would read every key exactly)."""
    op, _, settings = SETTINGS[name]
    q, k, v = qkv(70, dtype=torch.bfloat16, seed=5)
    q = q * 0.3
    mask = left_padding(2, 70)
    state = DecodingState()
    op(q[:, :, :23], k[:, :, :23], v[:, :, :23], key_padding_mask=mask[:, :23], decoding_state=state, **settings)
    for t in range(23, 70):
        step = dict(key_padding_mask=mask[:, : t + 1], **settings)
        with Casts() as casts:
            got = op(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], decoding_state=state, **step)
        whole = [shape for shape in casts.shapes if len(shape) == 4 and shape[2] == t + 1]
        assert casts.shapes and (t == 23 or not whole), f"step {t} cast the whole cache: {whole}"
        plain = op(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], **step)
        torch.testing.assert_close(got.float(), plain.float(), rtol=2e-2, atol=2e-2)
    assert state.served_steps == 47


def test_one_call_per_layer_over_a_bf16_cache_casts_only_what_it_reads():
    """:func:`decoding_attention` (heads with their own structure in one call) over a bf16 cache: no whole-cache
    cast after the first step, and the per-group op's outputs."""
    from sb_hf.integrations.plan import polynomial_of, units_of
    from sb_hf.ops.decoding import decoding_attention
    from sb_hf.ops.heads import grouped_attention

    groups = per_head_groups(per_query_head=True)
    groups = [(heads, {**kwargs, "radius_limit": 150.0}) for heads, kwargs in groups]
    polynomial, units = polynomial_of("support_basis", groups[0][1]), units_of(groups, True, 6, 2)
    q, k, v = qkv(50, dtype=torch.bfloat16, seed=8)
    q = q * 0.3
    state = DecodingState()
    for t in range(30, 50):
        with Casts() as casts:
            got = decoding_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], state, polynomial=polynomial,
                                     units=units)
        assert t == 30 or not [shape for shape in casts.shapes if len(shape) == 4 and shape[2] == t + 1]
        expected = grouped_attention(support_basis_attention, q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1],
                                     groups, per_query_head=True)
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)
