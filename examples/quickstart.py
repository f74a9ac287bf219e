"""Load the packaged SmolLM2-135M with support-basis attention, generate, and take a training step.

    python examples/quickstart.py
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sb_hf  # registers attn_implementation="support_basis" and "as23"
from sb_hf.assets import smollm2_path
from sb_hf.integrations.hf import attention_stats

folder, gguf = smollm2_path()  # a local folder: local_files_only, no Hub request
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, local_files_only=True)
model = AutoModelForCausalLM.from_pretrained(
    folder, gguf_file=gguf, dtype=torch.float32, attn_implementation="support_basis", local_files_only=True
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
