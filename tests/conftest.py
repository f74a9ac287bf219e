import json
import os

import pytest
import torch

import sb_hf  # noqa: F401  (registers the backends)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

VOCAB = 97
# The devices tests parametrised over devices run on: the CPU, and CUDA where there is one (benchmarks/gpu_check.sh).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def tiny_model(kind: str = "llama", *, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random Llama (GQA) or Mistral (sliding window 7) causal LM, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, head_dim=8,
    )
    common.update(overrides)
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "mistral":
        common.setdefault("sliding_window", 7)
        model = MistralForCausalLM(MistralConfig(**common))
    else:
        raise ValueError(kind)
    # Scale q/k projections up so post-RoPE entries spread over ~[-3, 3]: thresholds then split rows.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def require_assets():
    """Real-model tests skip without the packaged assets, unless SB_HF_REQUIRE_ASSETS=1 (CI) makes that a failure."""
    from sb_hf.assets import smollm2_path

    try:
        return smollm2_path()
    except FileNotFoundError as err:
        if os.environ.get("SB_HF_REQUIRE_ASSETS") == "1":
            raise
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def tiny_with_tokenizer(require_assets, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer, saved as a plain checkpoint (what the training scripts load)."""
    from transformers import AutoTokenizer

    folder, gguf = require_assets
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf)
    out = tmp_path_factory.mktemp("tiny_smollm2_tok")
    tiny_model("llama", vocab_size=len(tokenizer)).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def script_results(text: str) -> list[dict]:
    """The ``RESULT {json}`` records a training script printed (processes launched together share one stdout, and a
    record may follow another on its line)."""
    decoder, records, at = json.JSONDecoder(), [], text.find("RESULT ")
    while at >= 0:
        record, end = decoder.raw_decode(text, at + len("RESULT "))
        records.append(record)
        at = text.find("RESULT ", end)
    return records
