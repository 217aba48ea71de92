"""Which implementation a kernel call runs: reference, fused torch, or Triton.

Every kernel in `minirlhf.kernels` has three paths behind one function:

- ``"reference"``: the plain, obviously correct computation (the oracle the tests compare with);
- ``"fused"``: the fast torch path, the CPU default (it also runs on CUDA tensors);
- ``"triton"``: hand-written Triton kernels, used for CUDA tensors when Triton is importable;
- ``"triton_tiled"``: opt-in only, never chosen by ``"auto"``: `token_logprobs` on the tensor cores
  (`triton_tiled.py`), whose speed has not been measured yet. Kernels without such a second Triton
  version (GAE) run their ``"triton"`` path.

A call picks its path with ``impl=...``; ``impl=None`` uses the process-wide default that
``set_kernel_impl`` sets (the stage scripts' ``--kernels {auto,reference}`` flag calls it).
``"auto"`` means: Triton for CUDA tensors when Triton is importable, the fused torch path otherwise.

Triton is optional. It is imported lazily, the first time a call needs it, so that
``import minirlhf`` never imports Triton, and so that a test can set ``TRITON_INTERPRET=1``
(which must happen before Triton is imported) in a fresh process.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

KERNEL_IMPLS = ("auto", "reference", "fused", "triton", "triton_tiled")

_default_impl = "auto"
_triton_module: ModuleType | None = None
_triton_import_error: str | None = None


def set_kernel_impl(mode: str) -> None:
    """Set the process-wide default path used when a kernel is called with ``impl=None``.

    ``mode`` is ``"auto"`` (Triton on CUDA when available, else fused torch) or ``"reference"``
    (the plain implementations, for comparing); ``"fused"``, ``"triton"`` and ``"triton_tiled"``
    force one path.
    """
    global _default_impl
    if mode not in KERNEL_IMPLS:
        raise ValueError(f"kernel impl must be one of {KERNEL_IMPLS}, got {mode!r}")
    _default_impl = mode


def get_kernel_impl() -> str:
    """The process-wide default path (``"auto"`` unless `set_kernel_impl` changed it)."""
    return _default_impl


def triton_is_available() -> bool:
    """True when Triton can be imported (and our kernels with it). Imports it on first call."""
    return _load_triton_kernels() is not None


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton then runs kernels on CPU tensors, slowly (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _load_triton_kernels() -> ModuleType | None:
    """Import `minirlhf.kernels.triton_kernels` once; None (and the reason kept) if Triton is missing."""
    global _triton_module, _triton_import_error
    if _triton_module is not None or _triton_import_error is not None:
        return _triton_module
    if importlib.util.find_spec("triton") is None:
        _triton_import_error = "the 'triton' package is not installed"
        return None
    try:
        _triton_module = importlib.import_module("minirlhf.kernels.triton_kernels")
    except Exception as error:  # a broken Triton install must not break the package
        _triton_import_error = f"importing triton failed: {error!r}"
    return _triton_module


def triton_kernels() -> ModuleType:
    """The Triton kernels module; a clear error if Triton can't be imported."""
    module = _load_triton_kernels()
    if module is None:
        raise RuntimeError(f"a Triton path was requested but {_triton_import_error}")
    return module


def resolve_impl(impl: str | None, tensor: torch.Tensor) -> str:
    """Turn ``impl`` (or the default, when None) into ``"reference"``, ``"fused"``, ``"triton"``
    or ``"triton_tiled"``.

    ``tensor`` is one of the call's inputs: its device and dtype decide what ``"auto"`` means.
    Triton computes in fp32, so ``"auto"`` keeps float64 inputs on the fused torch path.
    """
    mode = _default_impl if impl is None else impl
    if mode not in KERNEL_IMPLS:
        raise ValueError(f"impl must be None or one of {KERNEL_IMPLS}, got {mode!r}")
    if mode == "auto":
        use_triton = (
            tensor.is_cuda and tensor.dtype != torch.float64 and triton_is_available()
        )
        return "triton" if use_triton else "fused"
    if mode in ("triton", "triton_tiled"):
        triton_kernels()  # raises a readable error when Triton is missing
        if not tensor.is_cuda and not triton_interpreter_enabled():
            raise RuntimeError(
                f"impl={mode!r} needs CUDA tensors (or TRITON_INTERPRET=1, set before Triton is "
                f"imported, to run the kernels on the CPU); got a tensor on {tensor.device}"
            )
    return mode
