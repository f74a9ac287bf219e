"""An optional C++ kernel for the decoding step on a CPU: :func:`use_cpu_kernel` builds and turns it on.

A decoding step in eager PyTorch costs some 250 small ATen calls per layer (a few microseconds each, whatever
their size), which is most of a step at the calibrated settings. ``csrc/decoding_step.cpp`` does the whole step
of a layer (finiteness check, fold, band, held exact keys, far part, exact rows) in one call, for the settings
whose far part is the degree-0 taylor kernel with one threshold (what ``sb-hf calibrate`` writes). Other
settings, CUDA tensors, and steps that count ``stats`` keep the PyTorch path. The kernel is built with the C++
compiler PyTorch's extensions use (about a minute the first time; PyTorch caches the build under
``~/.cache/torch_extensions`` or ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "decoding_step.cpp"

_module = None  # the built extension
_enabled = False


def use_cpu_kernel(enabled: bool = True, *, verbose: bool = False) -> None:
    """Use the C++ decoding step on CPU tensors from now on (``enabled=False``: the PyTorch path again).
    Builds it the first time (raises ``RuntimeError`` saying what is missing when it cannot be built)."""
    global _enabled
    if enabled:
        _build(verbose)
    _enabled = bool(enabled)


def cpu_kernel():
    """The built extension when :func:`use_cpu_kernel` turned it on, else None."""
    return _module if _enabled else None


def _build(verbose: bool):
    global _module
    if _module is not None:
        return _module
    from torch.utils import cpp_extension

    # The vector units this CPU has (AVX2 and FMA when PyTorch itself uses them); the name carries them and the
    # source's hash, so another CPU or another version builds its own.
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp"] + (["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else [])
    digest = hashlib.sha1(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:10]
    try:
        _module = cpp_extension.load(name=f"sb_hf_decoding_{digest}", sources=[str(SOURCE)], extra_cflags=flags,
                                     extra_ldflags=["-fopenmp"], verbose=verbose)
    except Exception as error:  # (a missing compiler or ninja raises assorted errors)
        raise RuntimeError(f"could not build sb_hf's CPU decoding kernel ({error}); it needs a C++ compiler and ninja "
                           "(`pip install ninja`, and g++ or clang); without it the PyTorch path runs") from error
    return _module
