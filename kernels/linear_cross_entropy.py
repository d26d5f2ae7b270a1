"""Linear layer + cross entropy that never holds all the ``[N, V]`` logits.

Shapes
    x       [..., H]   activations (fp32, bf16, fp16)
    weight  [V, H]     the output head's weight, ``nn.Linear`` layout, same dtype as x
    bias    [V]        optional, same dtype as x
    target  [...]      ``x.shape[:-1]``, integer class ids
    result  ``kernels.cross_entropy(x @ weight.T + bias, target, ...)``: ``[...]`` for
            ``reduction="none"``, else a scalar; dtype of x.

The cross-entropy options are those of :func:`kernels.cross_entropy`, except that the per-class
weight is called ``class_weight`` here (``weight`` is the head's).

How: rows are processed in chunks of ``chunk`` rows. For each chunk
    logits_c = x_c @ W^T + b        [chunk, V], torch matmul (cuBLAS on GPU), input dtype
    loss rows and dlogits_c         Triton CE kernel (or its torch twin) writing the gradient
                                    in place into logits_c: that buffer is private, so this is
                                    always safe, and it saves a second [chunk, V] buffer
    dx_c  = dlogits_c @ W           complete for these rows, written once in the input dtype
    dW   += dlogits_c^T @ x_c       fp32 accumulator: summing per-chunk bf16 products in bf16
                                    would lose the small updates of rare tokens
    db   += dlogits_c.sum(0)        fp32
So the extra memory is one chunk of logits plus the gradient buffers (dW in fp32: V*H*4 bytes,
which is the floor of this design), instead of a few N*V buffers.

When gradients are computed
    "mean"/"sum": in the forward, with the 1/divisor of the mean folded into dlogits;
        backward only multiplies dx, dW, db by the scalar grad_output (sizes N*H and V*H, no
        N*V traffic).
    "none": grad_output is per row and unknown in the forward, so the forward computes the
        loss only and backward recomputes each chunk's logits with grad_output folded into the
        CE kernel's per-row scale. One extra forward matmul, same memory bound.

Chunk size: ``chunk_size`` if given; else on CUDA the rows whose logits fit in
min(CUDA_MEM_FRACTION (0.25) * (free memory - dW and dx buffers), CUDA_CHUNK_BYTES (1 GiB)),
on CPU in CPU_CHUNK_BYTES (64 MiB), rounded down to a multiple of 128 rows
(:func:`pick_chunk_size`, whose keywords override those budgets). The torch fallback splits
each chunk further for its fp32 temporaries (kernels.cross_entropy.TORCH_CHUNK_BYTES).

fp32 dW accumulation for bf16/fp16 on CUDA uses a GEMM with fp32 output added into the
accumulator (``torch.addmm(..., out_dtype=torch.float32)``), else ``torch.mm(out_dtype=)`` per
V block, else an fp32 upcast of the chunk; which one works is probed once per device. On CPU the
chunk is upcast to fp32 (CPU has no mixed-precision GEMM with fp32 output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._common import pick_backend
from kernels.cross_entropy import (
    ROW_BACKENDS,
    check_args,
    class_weight_fp32,
    grad_scale,
    make_options,
    reduce_rows,
)

__all__ = ["linear_cross_entropy", "pick_chunk_size"]

# CPU: 64 MiB chunks are as fast as bigger ones (GEMMs of >= 256 rows dominate) and cut memory.
CPU_CHUNK_BYTES = 64 * 2**20
CUDA_CHUNK_BYTES = 2**30
CUDA_MEM_FRACTION = 0.25
# Temporary fp32 [rows, H] block for the "mm_out_dtype" accumulation mode.
_ACC_TMP_BYTES = 256 * 2**20


def pick_chunk_size(
    n: int,
    h: int,
    v: int,
    dtype: torch.dtype,
    device: torch.device,
    chunk_size=None,
    *,
    chunk_bytes: int | None = None,
    mem_fraction: float = CUDA_MEM_FRACTION,
) -> int:
    """Rows per chunk so that one chunk of [rows, V] logits stays within the memory budget.

    On CUDA the budget is ``mem_fraction`` of the free memory left after the gradient buffers
    this call allocates (fp32 dW [V, H], dx [N, H]), capped at ``chunk_bytes``; on CPU it is
    ``chunk_bytes``. ``chunk_bytes`` defaults to CUDA_CHUNK_BYTES or CPU_CHUNK_BYTES.
    """
    if chunk_size is not None:
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        return int(chunk_size)
    elt = torch.empty((), dtype=dtype).element_size()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free -= v * h * 4 + n * h * elt
        cap = CUDA_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        budget = min(free * mem_fraction, cap)
    else:
        budget = CPU_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    rows = max(1, int(budget // (max(v, 1) * elt)))
    if rows >= n:
        return max(n, 1)
    return rows - rows % 128 if rows >= 128 else rows


# --------------------------------------------------------------------------- fp32 dW accumulation

_ACC_MODE_CACHE: dict = {}


def _probe_accumulate_mode(device: torch.device) -> str:
    """Find a GEMM that adds a bf16 product into an fp32 buffer at fp32 precision (one sync)."""
    m = torch.tensor([[1.0, 3.0], [2.0, 4.0]], dtype=torch.bfloat16, device=device)
    a, b = m.t(), m  # transposed like dlogits.T in real use
    tiny = 2.0**-12  # lost if the result went through bf16 (7 + 2**-12 rounds to 7)
    expect = (a.float() @ b.float()) + tiny
    candidates = {
        "addmm_out_dtype": lambda acc: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc),
        "mm_out_dtype": lambda acc: acc.add_(torch.mm(a, b, out_dtype=torch.float32)),
    }
    for name, fn in candidates.items():
        acc = torch.full((2, 2), tiny, dtype=torch.float32, device=device)
        try:
            fn(acc)
        except (RuntimeError, TypeError, NotImplementedError):
            continue
        if torch.equal(acc, expect):
            return name
    return "upcast"


def accumulate_mode(device: torch.device) -> str:
    """How :func:`accumulate_fp32` adds low-precision products on this device (cached)."""
    if device.type != "cuda":
        return "upcast"
    key = (device.type, device.index)
    if key not in _ACC_MODE_CACHE:
        _ACC_MODE_CACHE[key] = _probe_accumulate_mode(device)
    return _ACC_MODE_CACHE[key]


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc [V, H] fp32 += a [V, n] @ b [n, H], with a and b in the compute dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    mode = accumulate_mode(acc.device)
    if mode == "addmm_out_dtype":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif mode == "mm_out_dtype":
        step = max(1, _ACC_TMP_BYTES // (4 * max(acc.shape[1], 1)))
        for v0 in range(0, acc.shape[0], step):
            acc[v0 : v0 + step].add_(torch.mm(a[v0 : v0 + step], b, out_dtype=torch.float32))
    else:
        acc.addmm_(a.float(), b.float())


# --------------------------------------------------------------------------- chunk loop


@dataclass
class _Grads:
    """Gradient buffers filled chunk by chunk; None for inputs that need no gradient."""

    dx: torch.Tensor | None  # [N, H] input dtype, each row written once
    dw: torch.Tensor | None  # [V, H] fp32 accumulator
    db: torch.Tensor | None  # [V] fp32 accumulator

    @classmethod
    def allocate(cls, x2, weight, want_x, want_w, want_b):
        v, h = weight.shape
        dev = x2.device
        return cls(
            dx=torch.empty_like(x2, memory_format=torch.contiguous_format) if want_x else None,
            dw=torch.zeros((v, h), dtype=torch.float32, device=dev) if want_w else None,
            db=torch.zeros(v, dtype=torch.float32, device=dev) if want_b else None,
        )

    def add_chunk(self, s: int, e: int, xc, dlogits, weight) -> None:
        if self.dx is not None:
            torch.mm(dlogits, weight, out=self.dx[s:e])
        if self.dw is not None:
            accumulate_fp32(self.dw, dlogits.t(), xc)
        if self.db is not None:
            self.db.add_(dlogits.sum(dim=0, dtype=torch.float32))

    def finish(self, factor, x_shape, weight, bias):
        """(grad_x, grad_w, grad_b) times the 0-d factor (None: already folded in)."""
        gx = gw = gb = None
        if self.dx is not None:
            gx = (self.dx if factor is None else self.dx * factor).reshape(x_shape)
        if self.dw is not None:
            gw = _scaled_cast(self.dw, factor, weight)
        if self.db is not None:
            gb = _scaled_cast(self.db, factor, bias)
        return gx, gw, gb


def _scaled_cast(acc: torch.Tensor, factor, like: torch.Tensor) -> torch.Tensor:
    """acc * factor computed in fp32 and rounded once into like's dtype."""
    if factor is None:
        return acc.to(like.dtype)
    out = torch.empty(acc.shape, dtype=like.dtype, device=acc.device)
    return torch.mul(acc, factor.float(), out=out)


def _chunk_pass(x2, weight, bias, t, cw, opts, scale, backend, chunk, loss_rows, grads) -> None:
    """Loss rows for all of x2 and, when grads is given, accumulate the gradients."""
    rows = ROW_BACKENDS[backend]
    n = x2.shape[0]
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xc = x2[s:e]
        logits = torch.mm(xc, weight.t()) if bias is None else torch.addmm(bias, xc, weight.t())
        row_scale = scale[s:e] if scale.dim() else scale
        dlogits = logits if grads is not None else None  # private buffer: in place is safe
        rows(logits, t[s:e], cw, opts, row_scale, loss_rows[s:e], dlogits)
        if grads is not None:
            grads.add_chunk(s, e, xc, dlogits, weight)
        del logits, dlogits  # free the chunk before the next matmul allocates one


def _check_linear(x, weight, bias) -> None:
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"need x [..., H] and weight [V, H], got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    dtypes = {x.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1 or not x.dtype.is_floating_point:
        raise TypeError(
            f"x, weight and bias must share one floating dtype, got {sorted(map(str, dtypes))}"
        )


# --------------------------------------------------------------------------- autograd


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, target, bias, class_weight, opts, reduction, backend, chunk_size):
        _check_linear(x, weight, bias)
        v, h = weight.shape
        check_args((*x.shape[:-1], v), x.device, target, class_weight, opts, reduction)
        x2, t = x.reshape(-1, h), target.reshape(-1).contiguous()
        cw = class_weight_fp32(class_weight)
        divisor, scale = grad_scale(t, cw, opts, reduction, v)
        chunk = pick_chunk_size(x2.shape[0], h, v, x.dtype, x.device, chunk_size)
        need = ctx.needs_input_grad
        want = (need[0], need[1], need[3] and bias is not None)
        loss_rows = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
        ctx.args = (cw, opts, backend, chunk, want, x.shape)
        ctx.grads, ctx.done = None, False
        ctx.recompute = reduction == "none" and any(want)
        if ctx.recompute:
            # Per-row grad_output is only known in backward: recompute there.
            ctx.save_for_backward(x, weight, target, bias)
            _chunk_pass(x2, weight, bias, t, cw, opts, scale, backend, chunk, loss_rows, None)
        else:
            grads = _Grads.allocate(x2, weight, *want) if any(want) else None
            _chunk_pass(x2, weight, bias, t, cw, opts, scale, backend, chunk, loss_rows, grads)
            ctx.save_for_backward(weight, bias)
            ctx.grads = grads
        return reduce_rows(loss_rows, reduction, divisor, x.shape[:-1], x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.done:
            raise RuntimeError("kernels.linear_cross_entropy supports one backward per forward")
        ctx.done = True
        cw, opts, backend, chunk, want, x_shape = ctx.args
        if ctx.recompute:  # reduction "none": recompute with the per-row factor
            x, weight, target, bias = ctx.saved_tensors
            x2, t = x.reshape(-1, weight.shape[1]), target.reshape(-1).contiguous()
            grads = _Grads.allocate(x2, weight, *want)
            scratch = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
            factor = grad_output.reshape(-1).float()
            _chunk_pass(x2, weight, bias, t, cw, opts, factor, backend, chunk, scratch, grads)
            gx, gw, gb = grads.finish(None, x_shape, weight, bias)
        else:
            weight, bias = ctx.saved_tensors
            grads, ctx.grads = ctx.grads, None  # drop the fp32 buffers as soon as possible
            gx, gw, gb = grads.finish(grad_output, x_shape, weight, bias)
        return gx, gw, None, gb, None, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``cross_entropy(x @ weight.T + bias, target, ...)`` computed chunk by chunk.

    ``class_weight`` is the per-class weight of the loss; ``chunk_size`` overrides the rows per
    chunk (see the module docstring for the default).
    """
    opts = make_options(ignore_index, label_smoothing, z_loss)
    chosen = pick_backend(x, backend)
    return _LinearCrossEntropy.apply(
        x, weight, target, bias, class_weight, opts, reduction, chosen, chunk_size
    )
