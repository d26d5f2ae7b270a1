"""Helpers shared by the kernel modules: optional Triton, backend choice, lazy JIT, block sizes.

Triton is optional. Without it (macOS, CPU-only installs) every kernel module still imports,
``backend="auto"`` resolves to the PyTorch fallback, and ``backend="triton"`` raises a clear
error. When Triton is absent ``tl`` is a stub whose only job is to keep the
``BLOCK: tl.constexpr`` annotations of the kernel functions evaluable at import time.

Kernels, and the helper functions they call, are JIT-decorated lazily (:class:`LazyJit`), on
their first launch, and once per value of ``TRITON_INTERPRET``. ``triton.jit`` reads that
variable when it decorates, so decorating at import time would make the interpreter depend on
import order: a test module that sets ``TRITON_INTERPRET=1`` after some other module imported
``kernels`` would still get compiled (GPU-only) kernels.
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


def next_power_of_2(n: int, *, floor: int = 1) -> int:
    """Smallest power of two >= max(n, floor), ``floor`` a power of two (``tl.arange`` extents
    must be powers of two)."""
    return max(floor, 1 if n <= 1 else 1 << (n - 1).bit_length())


class LazyJit:
    """A Triton kernel passed to ``triton.jit`` at its first launch, once per interpreter mode.

    Launch it like a jitted kernel: ``kernel[grid](*args, BLOCK=..., num_warps=...)``.
    ``helpers`` are the plain ``@triton.jit``-style functions the kernel calls (directly or
    through one another); they are jitted with it. Triton resolves a callee by its name in the
    kernel's module globals and accepts only a jitted function there, so every launch makes
    sure those names hold the helpers jitted for the current mode. Each mode keeps its own
    jitted objects, so going back to a mode finds its compile cache intact.
    """

    def __init__(self, fn, helpers=()):
        self.fn = fn
        self.helpers = tuple(helpers)
        self._by_mode: dict[bool, tuple] = {}

    def __getitem__(self, grid):
        mode = interpret_mode()
        jitted = self._by_mode.get(mode)
        if jitted is None:
            if not HAS_TRITON:
                raise RuntimeError("triton is not importable")
            helpers = {fn.__name__: triton.jit(fn) for fn in self.helpers}
            jitted = self._by_mode[mode] = (triton.jit(self.fn), helpers)
        kernel, helpers = jitted
        scope = self.fn.__globals__
        for name, helper in helpers.items():
            if scope.get(name) is not helper:
                scope[name] = helper
        return kernel[grid]
