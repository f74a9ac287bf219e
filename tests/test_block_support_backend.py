"""``attn_implementation="block_support"``: the op runs at and above ``exact_below`` keys (a test that fails if that
path is skipped), its model logits equal those of the same model with the dense twin in its place (GQA, padding, a
sliding window, cached generation), exact attention runs below and for decoding steps, training backpropagates, and
bad settings name what to change."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, tiny_model
from sb_hf.config import SupportBasisConfig
from sb_hf.ops import reference
from sb_hf.ops.block_support import backend

OP = {"exact_below": 0, "block_size": 8, "gamma": 0.6, "local_window": 8, "sinks": 2}


def block_model(kind="llama", block=OP, **overrides):
    model = tiny_model(kind, **overrides)
    settings = {key: value for key, value in block.items() if key not in ("sinks", "local_window")}
    model.config.support_basis = {"block": settings, **{key: block[key] for key in ("sinks", "local_window") if key in block}}
    model.set_attn_implementation("block_support")
    return model


class Calls(list):
    """The op's calls (query length, key length); :meth:`twin` puts the dense twin in the op's place."""

    op = None

    def twin(self):
        self.op = reference.block_support_attention


@pytest.fixture
def op_calls(monkeypatch):
    calls = Calls()
    calls.op = backend.block_support_attention

    def counted(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[2]))
        return calls.op(q, k, v, **kw)

    monkeypatch.setattr(backend, "block_support_attention", counted)
    return calls


def inputs(batch=2, length=45, pad=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, :pad] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("mistral", {"sliding_window": 30})])
def test_the_model_runs_the_op_and_equals_the_twin(kind, overrides, op_calls):
    """45 tokens (not a multiple of the block of 8), left padding, GQA 4/2, Mistral's sliding window of 30: the
    logits of the real tokens are those of the twin in the op's place, and differ from exact attention's."""
    model = block_model(kind, **overrides)
    ids, mask = inputs()
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask).logits
        assert op_calls == [(45, 45)] * 2  # one call per layer: the op ran
        op_calls.twin()
        twin = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("sdpa")
        exact = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(fast[real], twin[real], rtol=1e-4, atol=1e-4)
    assert (fast[real] - exact[real]).abs().max() > 1e-3  # an approximation: the op's output is the one used


def test_cached_generation_runs_the_op_on_the_prompt_and_exact_steps(op_calls):
    """The prompt (37 tokens) goes through the op; each generated token is one query, fewer than a block, and
    attends exactly to the cache: the scores equal those of the twin's prompt with exact steps."""
    model = block_model()
    ids, mask = inputs(length=37)
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        fast = model.generate(input_ids=ids, attention_mask=mask, **kw)
        assert op_calls == [(37, 37)] * 2  # the prompt only
        op_calls.twin()
        twin = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(fast.sequences, twin.sequences)
    for a, b in zip(fast.scores, twin.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_below_exact_below_attention_is_exact(op_calls):
    """The defaults (exact below 8192 keys) on 45 tokens: exact attention, the op never called."""
    model = tiny_model()
    ids, mask = inputs()
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
        model.set_attn_implementation("block_support")
        out = model(input_ids=ids, attention_mask=mask).logits
        for below in (46, 1000):
            model.config.support_basis = {"block": {"exact_below": below, "block_size": 8}}
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits[mask.bool()], exact[mask.bool()],
                                       rtol=1e-5, atol=1e-5)
        model.config.support_basis = {"block": {"exact_below": 45, "block_size": 8}}
        model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out[mask.bool()], exact[mask.bool()], rtol=1e-5, atol=1e-5)
    assert op_calls == [(45, 45)] * 2  # only at exact_below = 45 keys


def test_training_backpropagates(op_calls):
    model = block_model().train()
    ids, _ = inputs(batch=1, pad=0)
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert op_calls == [(45, 45)] * 2 and grads and all(torch.isfinite(g).all() for g in grads)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_with_gradients_a_shared_selection_runs_strictly_causally(monkeypatch):
    """Where gradients flow the backend runs the default pooled selection as "prefix" (a test that fails if it runs
    "pooled" there): no row changes when a later token does; without gradients it runs "pooled"."""
    seen = []
    real = backend.block_support_attention
    monkeypatch.setattr(backend, "block_support_attention", lambda *a, **kw: seen.append(kw["selection"]) or real(*a, **kw))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 70, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    kw = dict(exact_below=0, block_size=8, sinks=2, local_window=8, gamma=0.9, causal=True)
    with torch.no_grad():
        backend.block_support_or_exact(q, k, v, **kw)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = backend.block_support_or_exact(*leaves, **kw)
    out.sum().backward()
    assert seen == ["pooled", "prefix"] and all(x.grad is not None for x in leaves)
    for p in (20, 37, 61):
        later = [x.clone() for x in (q, k, v)]
        for x in later:
            x[:, :, p + 1 :] = torch.randn(x[:, :, p + 1 :].shape, generator=g, dtype=torch.float64)
        changed = backend.block_support_or_exact(*(x.requires_grad_() for x in later), **kw)
        torch.testing.assert_close(changed[:, :, : p + 1], out[:, :, : p + 1], rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="with gradients the backend runs 'prefix'"):
        backend.block_support_or_exact(*leaves, engine="flex", **kw)


@pytest.mark.parametrize("block,message", [
    ({"gama": 0.9}, "unknown settings \\['gama'\\]"),
    ({"sinks": 3}, "top-level fields"),
    ({"gamma": 1.5}, "gamma must be"),
    ({"exact_below": -1}, "exact_below must be"),
    ({"selection": "last"}, "dense twin's only"),
    ({"estimate": "oracle"}, "measuring tool"),
    ([0.9], "block must be a dict"),
])
def test_bad_settings(block, message):
    with pytest.raises(ValueError, match=message):
        SupportBasisConfig.from_dict({"block": block})


def test_per_layer_settings_and_no_per_head_ones():
    """``layers`` may give a layer its own ``block``; per-head settings are the support-basis methods' only."""
    config = SupportBasisConfig.from_dict({"layers": {"1": {"block": {"gamma": 0.5}}}})
    assert config.for_layer(1).block_settings()["gamma"] == 0.5 and config.for_layer(0).block_settings()["gamma"] == 0.97
    with pytest.raises(ValueError, match="kv_heads settings are for the support-basis methods"):
        SupportBasisConfig.from_dict({"kv_heads": {"0": {"sinks": 1}}}).check_method("block_support")


@pytest.mark.parametrize("q_len", [1, 20, 45])
@pytest.mark.parametrize("padded,sliding_window", [(False, None), (True, None), (False, 10), (True, 10)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.bfloat16, 2e-2)])
def test_exact_attention_equals_the_reference(q_len, padded, sliding_window, dtype, tol):
    """The exact fallback against the support-basis twin at threshold 0 (every row exact): the last ``q_len`` of 45
    positions, GQA 4/2, left padding (a fully padded query row: zeros), a sliding window, fp64 and bf16."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, n, 8, generator=g, dtype=torch.float64) for h, n in ((4, q_len), (2, 45), (2, 45)))
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[-1, :30] = False
    kw = dict(key_padding_mask=mask if padded else None, sliding_window=sliding_window)
    stats, twin_stats = {}, {}
    out = backend.exact_attention(q.to(dtype), k.to(dtype), v.to(dtype), stats=stats, **kw)
    twin = reference.support_basis_attention(q, k, v, threshold=0.0, degree=0, stats=twin_stats, **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), twin, rtol=tol, atol=tol)
    assert {key: int(value) for key, value in stats.items()} == {key: int(twin_stats[key]) for key in stats}


def test_exact_attention_needs_no_mask_for_a_full_causal_call_or_one_query(monkeypatch):
    """Without padding or a window, a full causal call and a single query go to SDPA without a mask (its fused
    path; a test that fails if a mask is built for them); a partial call does need one."""
    masks = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, attn_mask=None, **kw: masks.append(attn_mask is None) or real(*a, attn_mask=attn_mask, **kw))
    k, v = torch.randn(1, 2, 45, 8), torch.randn(1, 2, 45, 8)
    for q_len in (45, 1, 20):
        backend.exact_attention(torch.randn(1, 4, q_len, 8), k, v)
    assert masks == [True, True, False]


def test_the_sampled_estimate_masks_leading_sinks_without_padding(monkeypatch):
    """Without padding the op tells the sampled estimate that the only non-members are the leading sinks (it then
    masks a few columns instead of every score; a test that fails if that is skipped); with padding it does not."""
    from sb_hf.ops.block_support import chunk

    seen = []
    real = chunk.estimated_log_mass
    monkeypatch.setattr(chunk, "estimated_log_mass", lambda *a: seen.append(a[10]) or real(*a))
    q, k, v = (torch.randn(1, h, 90, 8) for h in (4, 2, 2))
    chunk.block_support_attention(q, k, v, block_size=8, local_window=8, sinks=3)
    assert seen and set(seen) == {3}
    seen.clear()
    chunk.block_support_attention(q, k, v, block_size=8, local_window=8, sinks=3,
                                  key_padding_mask=torch.ones(1, 90, dtype=torch.bool))
    assert seen and set(seen) == {None}
