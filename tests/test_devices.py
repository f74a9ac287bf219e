"""The ops and a tiny model on every available device (``conftest.DEVICES``: the CPU, and CUDA where there is one;
``benchmarks/gpu_check.sh`` runs the CUDA cases): each op's output on the device equals its dense twin's on the CPU,
a decoding state steps on the device, and a model's logits on the device are its logits on the CPU. On a CPU these
repeat what the op grids check; their point is the CUDA run (no fused CPU kernel there: the plain-torch paths)."""

from __future__ import annotations

import pytest
import torch

from conftest import DEVICES, VOCAB, tiny_model
from sb_hf.ops import reference, sink_window_attention, support_basis_attention
from sb_hf.ops.decoding import DecodingState

F64 = torch.float64


def qkv(q_len=37, kv_len=53, batch=2, q_heads=6, kv_heads=2, d=8, seed=0, device="cpu", dtype=F64):
    g = torch.Generator().manual_seed(seed)
    make = lambda heads, length, s: (s * torch.randn(batch, heads, length, d, generator=g, dtype=F64)).to(device, dtype)
    return make(q_heads, q_len, 1.5), make(kv_heads, kv_len, 1.5), make(kv_heads, kv_len, 1.0)


def padded(batch, kv_len, device):
    mask = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    mask[-1, :7] = False
    return mask


on_cpu = lambda kw: {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in kw.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("evaluation", ["features", "scores"])
@pytest.mark.parametrize("settings", [dict(threshold=2.0, degree=2), dict(threshold=float("inf"), degree=0, kernel="taylor",
                                                                            sinks=3, local_window=9),
                                      dict(threshold=2.5, degree=3, kernel="chebyshev", sliding_window=11)],
                         ids=["taylor2", "taylor0-structure", "chebyshev3-window"])
def test_support_basis_on_the_device_equals_the_twin(device, evaluation, settings):
    q, k, v = qkv(device=device)
    kw = dict(settings, key_padding_mask=padded(2, 53, device))
    out = support_basis_attention(q, k, v, evaluation=evaluation, chunk_size=8, **kw)
    assert out.device.type == device
    expected = reference.support_basis_attention(q.cpu(), k.cpu(), v.cpu(), **on_cpu(kw))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_sink_window_on_the_device_equals_the_twin(device):
    q, k, v = qkv(device=device)
    kw = dict(sinks=3, local_window=9, key_padding_mask=padded(2, 53, device), sliding_window=20)
    out = sink_window_attention(q, k, v, **kw)
    torch.testing.assert_close(out.cpu(), reference.sink_window_attention(q.cpu(), k.cpu(), v.cpu(), **on_cpu(kw)),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-9), (torch.bfloat16, 3e-2)])
def test_decoding_steps_on_the_device(device, dtype, tol):
    """A prompt of 23 then 30 steps with one decoding state, over a cache in ``dtype``: each step equals the op
    without a state, on the same device."""
    settings = dict(threshold=3.0, degree=0, kernel="taylor", sinks=3, local_window=9)
    q, k, v = qkv(q_len=53, dtype=dtype, device=device)
    q = q * 0.5
    mask = padded(2, 53, device)
    state = DecodingState()
    support_basis_attention(q[:, :, :23], k[:, :, :23], v[:, :, :23], key_padding_mask=mask[:, :23], decoding_state=state,
                            **settings)
    for t in range(23, 53):
        step = dict(key_padding_mask=mask[:, : t + 1], **settings)
        got = support_basis_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], decoding_state=state, **step)
        plain = support_basis_attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], **step)
        torch.testing.assert_close(got.double(), plain.double(), rtol=tol, atol=tol)
    assert state.served_steps == 30


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", ["support_basis", "sink_window"])
def test_a_model_on_the_device_gives_its_cpu_logits(device, implementation):
    """A tiny Llama with left padding: the logits of the real tokens on the device are those on the CPU, and cached
    generation runs there."""
    model = tiny_model(dtype=F64)
    model.config.support_basis = {"sinks": 2, "local_window": 8} if implementation == "sink_window" else {}
    model.set_attn_implementation(implementation)
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[-1, :5] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        model.to(device)
        got = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[mask.to(device).bool()]
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=3,
                                   do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-8, atol=1e-8)
    assert generated.shape == (2, 33) and generated.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_block_support_training_on_the_device(device):
    """With gradients the block-support backend runs the strictly causal "prefix" selection in the chunked op (on
    CUDA as plain matmuls): its output and gradients on the device equal the dense twin's on the CPU."""
    from sb_hf.ops.block_support import backend

    q, k, v = qkv(q_len=53, device=device)
    kw = dict(block_size=8, sinks=2, local_window=8, gamma=0.8, causal=True, key_padding_mask=padded(2, 53, device))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = backend.block_support_or_exact(*leaves, exact_below=0, **kw)
    weights = torch.linspace(-1, 1, out.shape[-1], dtype=F64)
    (out * weights.to(device)).sum().backward()
    twin_leaves = [x.detach().cpu().requires_grad_() for x in (q, k, v)]
    twin = reference.block_support_attention(*twin_leaves, selection="prefix", **on_cpu(kw))
    (twin * weights).sum().backward()
    torch.testing.assert_close(out.detach().cpu(), twin.detach(), rtol=1e-9, atol=1e-10)
    for got, want in zip(leaves, twin_leaves):
        torch.testing.assert_close(got.grad.cpu(), want.grad, rtol=1e-8, atol=1e-9)
