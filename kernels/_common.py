"""Helpers shared by the kernel modules: optional Triton, backend choice, lazy JIT, env knobs.

Triton is optional. Without it (macOS, CPU-only installs) every kernel module still imports,
``backend="auto"`` resolves to the PyTorch fallback, and ``backend="triton"`` raises a clear
error. When Triton is absent ``tl`` is a stub whose only job is to keep the
``BLOCK: tl.constexpr`` annotations of the kernel functions evaluable at import time.

Kernels are JIT-decorated lazily (:class:`LazyJit`), on their first launch, and once per value
of ``TRITON_INTERPRET``. ``triton.jit`` reads that variable when it decorates, so decorating at
import time would make the interpreter depend on import order: a test module that sets
``TRITON_INTERPRET=1`` after some other module imported ``kernels`` would still get compiled
(GPU-only) kernels.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = SimpleNamespace(constexpr=None)
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
_TRUE = ("1", "true", "on", "yes")


def interpret_mode() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def pick_backend(tensor: torch.Tensor, backend: str) -> str:
    """Resolve ``"auto" | "triton" | "torch"`` to the backend that will run on ``tensor``.

    ``auto`` takes Triton only for CUDA tensors (it never opts into the slow interpreter);
    ``triton`` on a CPU tensor needs ``TRITON_INTERPRET=1`` and raises otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if (tensor.is_cuda and HAS_TRITON) else "torch"
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' was requested but triton is not importable")
    if tensor.is_cuda or interpret_mode():
        return "triton"
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors (got device {tensor.device}); to run the Triton "
        "kernels on CPU tensors set TRITON_INTERPRET=1 in the environment (slow, for tests)"
    )


def env_int(name: str, default: int) -> int:
    """Integer tuning knob from the environment (read per call, so tests can monkeypatch it)."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r} is not an integer") from exc


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        return float(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r} is not a number") from exc


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


class LazyJit:
    """``triton.jit`` applied on first launch, cached per interpreter mode.

    Use exactly like a jitted kernel: ``kernel[grid](*args, BLOCK=..., num_warps=...)``.
    """

    def __init__(self, fn):
        self.fn = fn
        self._by_mode = {}

    def __getitem__(self, grid):
        mode = interpret_mode()
        kernel = self._by_mode.get(mode)
        if kernel is None:
            if not HAS_TRITON:
                raise RuntimeError("triton is not importable")
            kernel = self._by_mode[mode] = triton.jit(self.fn)
        return kernel[grid]
