"""Load the packaged SmolLM2-135M with support-basis attention, generate, and take a training step.

    python examples/quickstart.py
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import sb_hf  # noqa: E402  (registers attn_implementation="support_basis" and "as23")
from sb_hf.assets import smollm2_path  # noqa: E402
from sb_hf.integrations.hf import attention_stats  # noqa: E402

folder, gguf = smollm2_path()
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
model = AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=gguf, dtype=torch.float32, attn_implementation="support_basis"
)
sb_hf.apply_support_basis(model, threshold=6.0, degree=2)  # or defaults: sb_hf.apply_support_basis(model)

prompt = tokenizer("The capital of France is", return_tensors="pt")
with attention_stats() as stats:
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
print(tokenizer.decode(out[0], skip_special_tokens=True))
print(f"pairs computed exactly: {int(stats['exact_pairs'])} of {int(stats['pairs'])}")

model.train()
batch = tokenizer(["Support basis splits large and small rows."], return_tensors="pt")
loss = model(**batch, labels=batch.input_ids).loss
loss.backward()
print(f"training loss {loss.item():.3f}, finite gradients: "
      f"{all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)}")
