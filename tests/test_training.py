"""Training with the sb-hf backends: memory saved for backward, gradient checkpointing, optimizer
steps in fp32 / bf16 / autocast, and attention dropout. (Op gradients vs the naive twin: test_ops.py.)"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, script_results, tiny_model

import sb_hf
from sb_hf.ops import reference, support_basis_attention


def _planted(n, *, large_share=0.1, seed=0, heads=(4, 2), d=8):
    """q/k/v with entries in [-1, 1] and a fixed share of large rows (entry 4) in q and k."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(1, heads[0], n, d, generator=g) * 2 - 1
    k = torch.rand(1, heads[1], n, d, generator=g) * 2 - 1
    v = torch.randn(1, heads[1], n, d, generator=g)
    rows = torch.randperm(n, generator=g)[: int(large_share * n)]
    q[:, :, rows, 0] = 4.0
    k[:, :, rows, 1] = 4.0
    return [x.requires_grad_() for x in (q, k, v)]


def _saved_bytes(n, **kw):
    """Bytes of the distinct storages autograd keeps for backward of one call (outside the
    recomputed chunks, whose inputs are the running states and views of q/k/v)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    q, k, v = _planted(n)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = support_basis_attention(q, k, v, threshold=2.0, degree=2, chunk_size=16, **kw)
    assert out.requires_grad
    return sum(storages.values())


@pytest.mark.parametrize("kw", [dict(evaluation="features"), dict(evaluation="scores"),
                                dict(evaluation="features", sliding_window=24), dict(evaluation="scores", causal=False)],
                         ids=["features", "scores", "features-window", "scores-noncausal"])
def test_memory_saved_for_backward_grows_linearly(kw):
    """10% large rows: without recomputation the exact rows alone would keep 0.1 n x n scores and
    the score form Lq x Lk blocks, 16x more at 4x the length. Linear: about 4x."""
    small, large = _saved_bytes(128, **kw), _saved_bytes(512, **kw)
    assert large / small < 5.0, (small, large)


def _grads(model, ids, mask):
    model.zero_grad()
    labels = ids.masked_fill(mask == 0, -100)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    model = sb_hf.apply_support_basis(tiny_model(kind), threshold=1.0).train()
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    loss, plain = _grads(model, ids, mask)
    # (transformers renamed gradient checkpointing to activation checkpointing; the old name is deprecated)
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    loss_ckpt, ckpt = _grads(model, ids, mask)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    torch.testing.assert_close(loss_ckpt, loss)
    assert plain.keys() == ckpt.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_model_gradients_match_the_reference_backend():
    """The whole model's parameter gradients through the fast op equal those through the naive twin."""
    from transformers import AttentionInterface

    fast_forward = AttentionInterface._global_mapping["support_basis"]
    from sb_hf.integrations import hf

    def reference_forward(module, query, key, value, attention_mask, **kwargs):
        saved = hf.IMPLEMENTATIONS["support_basis"]
        try:  # same glue, naive op
            hf.IMPLEMENTATIONS["support_basis"] = reference.support_basis_attention
            return hf._make_attention_forward("support_basis")(module, query, key, value, attention_mask, **kwargs)
        finally:
            hf.IMPLEMENTATIONS["support_basis"] = saved

    ids = torch.randint(0, VOCAB, (2, 23), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    model = sb_hf.apply_support_basis(tiny_model("mistral", dtype=torch.float64), threshold=1.5).train()
    _, fast = _grads(model, ids, mask)
    AttentionInterface._global_mapping["support_basis"] = reference_forward
    try:
        _, naive = _grads(model, ids, mask)
    finally:
        AttentionInterface._global_mapping["support_basis"] = fast_forward
    for name in fast:
        torch.testing.assert_close(fast[name], naive[name], rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16-autocast"])
@pytest.mark.parametrize("method", ["support_basis", "as23"])
def test_optimizer_steps_reduce_the_loss(precision, method):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = sb_hf.apply_support_basis(tiny_model("llama", dtype=dtype), method=method, threshold=1.0).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0
    losses = []
    for _ in range(6):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.9 * losses[0], losses


def test_attention_dropout_is_refused_in_training_only():
    model = sb_hf.apply_support_basis(tiny_model("llama", attention_dropout=0.1))
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        model.eval()(input_ids=ids)  # eval: dropout is off, as with every backend
    with pytest.raises(ValueError, match=r"no attention dropout .*attention_dropout = 0.0"):
        model.train()(input_ids=ids)


# ----------------------------------------------------------------------------- examples/finetune_trainer.py

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_trainer.py"


def _example_args(model, output):
    from sb_hf.assets import news_text_path

    return [str(EXAMPLE), "--model", str(model), "--text", str(news_text_path()), "--max-steps", "3",
            "--block-size", "32", "--train-blocks", "12", "--eval-blocks", "4", "--batch-size", "2", "--lr", "1e-2",
            "--output", str(output)]


@pytest.mark.real_model
def test_finetune_example_under_sb_hf_run(tiny_with_tokenizer, tmp_path, capsys):
    from sb_hf import cli
    from sb_hf.integrations.hf import attention_stats

    with attention_stats() as stats:
        code = cli.main(["run", "--threshold", "1.0", "--", *_example_args(tiny_with_tokenizer, tmp_path)])
    (result,) = script_results(capsys.readouterr().out)
    assert code == 0 and int(stats["pairs"]) > 0
    assert result["attn_implementation"] == "support_basis" and result["steps"] == 3 and result["finite"]
    assert result["eval_loss_after"] < result["eval_loss_before"]


@pytest.mark.real_model
def test_finetune_example_data_parallel_two_cpu_processes(tiny_with_tokenizer, tmp_path):
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m sb_hf run -- examples/finetune_trainer.py`."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sb_hf", "run", "--threshold", "1.0", "--",
           *_example_args(tiny_with_tokenizer, tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(script_results(proc.stdout), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["attn_implementation"] == "support_basis" and r["world_size"] == 2 and r["steps"] == 3 and r["finite"]
    # data parallel: both processes hold the same (synchronized) model, so they report the same eval loss
    assert results[0]["eval_loss_after"] == pytest.approx(results[1]["eval_loss_after"], rel=1e-5)
