"""kernels.linear_cross_entropy against a float64 PyTorch reference, both backends.

Without a GPU the Triton CE kernel runs in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` is
set below, before anything imports triton, and only when CUDA is absent (GPU machines run the
compiled kernels). Shapes stay tiny (N <= 64, V <= 300): the interpreter is slow.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels._common as common  # noqa: E402
from kernels import linear_cross_entropy  # noqa: E402

# importlib: the package attributes kernels.cross_entropy / linear_cross_entropy are functions.
lce_mod = importlib.import_module("kernels.linear_cross_entropy")
ce_mod = importlib.import_module("kernels.cross_entropy")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = common.HAS_TRITON and (DEVICE == "cuda" or common.interpret_mode())
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="no triton/interpreter")),
]
# (rtol, atol relative to the largest reference magnitude)
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 1.5e-2), torch.float16: (5e-3, 3e-3)}


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    monkeypatch.setattr(ce_mod, "MAX_BLOCK", 64)  # several column blocks per row in the kernel


def reference(x, w, target, b=None, cw=None, ignore_index=-100, ls=0.0, z=0.0, reduction="mean"):
    """Float64 F.cross_entropy(x @ w.T + b) (class dim last) plus the z-loss term."""
    logits = x.reshape(-1, x.shape[-1]) @ w.t()
    if b is not None:
        logits = logits + b
    t = target.reshape(-1)
    cw = None if cw is None else cw.double()
    ce = F.cross_entropy(
        logits, t, weight=cw, ignore_index=ignore_index, label_smoothing=ls, reduction=reduction
    )
    valid = t != ignore_index
    z_rows = z * torch.logsumexp(logits, dim=-1) ** 2 * valid
    if reduction == "none":
        return (ce + z_rows).reshape(target.shape)
    if reduction == "sum":
        return ce + z_rows.sum()
    divisor = valid.sum() if cw is None else (cw[t.clamp(min=0)] * valid).sum()
    return ce + z_rows.sum() / divisor


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale)


def make_case(n, h, v, dtype, seed=0, ignore_every=0, ignore_index=-100, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * (2.0 / h**0.5)
    b = torch.randn(v, generator=g) if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    if ignore_every:
        target[::ignore_every] = ignore_index
    cw = torch.rand(v, generator=g) + 0.1
    to = lambda t: None if t is None else t.to(DEVICE)
    return (
        to(x.to(dtype)),
        to(w.to(dtype)),
        to(None if b is None else b.to(dtype)),
        to(target),
        to(cw),
    )


def upstream(loss, reduction):
    if reduction == "none":
        g = torch.Generator().manual_seed(1)
        return (torch.rand(loss.shape, generator=g) + 0.5).to(loss.device, loss.dtype)
    return torch.tensor(0.6, device=loss.device, dtype=loss.dtype)


def run_both(x, w, b, target, backend, reduction="mean", cw=None, chunk_size=None, **opts):
    """Ours vs reference: (loss, grads, ref loss, ref grads), grads in (x, w, b) order."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    loss = linear_cross_entropy(
        leaves[0],
        leaves[1],
        target,
        leaves[2],
        class_weight=cw,
        reduction=reduction,
        backend=backend,
        chunk_size=chunk_size,
        **opts,
    )
    go = upstream(loss, reduction)
    loss.backward(go)
    refs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    ref = reference(
        refs[0],
        refs[1],
        target,
        refs[2],
        cw,
        -100 if opts.get("ignore_index", -100) is None else opts.get("ignore_index", -100),
        opts.get("label_smoothing", 0.0),
        opts.get("z_loss", 0.0),
        reduction,
    )
    ref.backward(go.double())
    grads = [t.grad if t is not None else None for t in leaves]
    ref_grads = [t.grad if t is not None else None for t in refs]
    return loss, grads, ref.detach(), ref_grads


def check(result, dtype):
    loss, grads, ref, ref_grads = result
    assert loss.shape == ref.shape and loss.dtype == dtype
    close(loss, ref, dtype)
    for name, g, r in zip("xwb", grads, ref_grads):
        if r is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        close(g, r, dtype)


EVERYTHING = {"label_smoothing": 0.1, "z_loss": 1e-3, "ignore_index": -1}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("options", ["plain", "everything"])
def test_matches_reference_fp32(backend, reduction, options):
    everything = options == "everything"
    x, w, b, target, cw = make_case(
        37, 24, 257, torch.float32, ignore_every=4 if everything else 0, ignore_index=-1
    )
    opts = EVERYTHING if everything else {}
    result = run_both(
        x, w, b, target, backend, reduction, cw if everything else None, chunk_size=8, **opts
    )
    check(result, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ignore_index_none_counts_every_row(backend, reduction):
    x, w, b, target, cw = make_case(37, 24, 257, torch.float32)
    opts = {"ignore_index": None, "label_smoothing": 0.1, "z_loss": 1e-3}
    check(run_both(x, w, b, target, backend, reduction, cw, chunk_size=8, **opts), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk_size", [1, 5, 64, None])
def test_chunk_sizes_and_no_bias(backend, chunk_size):
    x, w, _, target, _ = make_case(19, 16, 90, torch.float32, seed=chunk_size or 0, bias=False)
    check(run_both(x, w, None, target, backend, "mean", chunk_size=chunk_size), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    x, w, b, target, cw = make_case(40, 32, 200, dtype, seed=2, ignore_every=6)
    result = run_both(
        x, w, b, target, backend, "mean", cw, chunk_size=6, label_smoothing=0.1, z_loss=1e-3
    )
    check(result, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_three_dim_input(backend, reduction):
    x, w, b, target, cw = make_case(24, 12, 70, torch.float32, seed=3, ignore_every=5)
    x, target = x.reshape(2, 12, 12), target.reshape(2, 12)
    loss, grads, ref, ref_grads = run_both(x, w, b, target, backend, reduction, cw, chunk_size=7)
    assert loss.shape == ((2, 12) if reduction == "none" else ())
    assert grads[0].shape == (2, 12, 12)
    check((loss, grads, ref, ref_grads), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_all_rows_ignored(backend, reduction):
    x, w, b, _, cw = make_case(10, 8, 30, torch.float32)
    target = torch.full((10,), -100, device=DEVICE)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = linear_cross_entropy(
        *leaves[:2],
        target,
        leaves[2],
        class_weight=cw,
        label_smoothing=0.2,
        z_loss=1e-2,
        reduction=reduction,
        backend=backend,
        chunk_size=3,
    )
    loss.sum().backward()
    assert torch.all(loss == 0)
    for t in leaves:
        assert torch.all(t.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", ["x", "w", "wb"])
def test_partial_gradients(backend, needs):
    x, w, b, target, _ = make_case(16, 8, 40, torch.float32, seed=4)
    leaves = {"x": x.clone(), "w": w.clone(), "b": b.clone()}
    for name in needs:
        leaves[name].requires_grad_()
    linear_cross_entropy(
        leaves["x"], leaves["w"], target, leaves["b"], backend=backend, chunk_size=5
    ).backward()
    refs = {k: v.double().requires_grad_(k in needs) for k, v in (("x", x), ("w", w), ("b", b))}
    reference(refs["x"], refs["w"], target, refs["b"]).backward()
    for name in "xwb":
        if name in needs:
            close(leaves[name].grad, refs[name].grad, torch.float32)
        else:
            assert leaves[name].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_holds_all_logits(backend, monkeypatch):
    """The CE rows function only ever sees chunk-sized logits, and each chunk once per pass."""
    seen = []
    real = ce_mod.ROW_BACKENDS[backend]

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setitem(ce_mod.ROW_BACKENDS, backend, spy)
    x, w, b, target, _ = make_case(23, 8, 50, torch.float32)
    check(run_both(x, w, b, target, backend, "mean", chunk_size=6), torch.float32)
    assert seen == [(6, 50), (6, 50), (6, 50), (5, 50)]


def test_pick_chunk_size():
    cpu = torch.device("cpu")
    assert lce_mod.pick_chunk_size(1000, 8, 50, torch.float32, cpu, chunk_size=7) == 7
    with pytest.raises(ValueError):
        lce_mod.pick_chunk_size(1000, 8, 50, torch.float32, cpu, chunk_size=0)
    # Default CPU budget: 64 MiB of fp32 logits -> 2**24 / 32000 = 524 rows -> 512 (128-multiple).
    assert lce_mod.pick_chunk_size(10**6, 64, 32000, torch.float32, cpu) == 512
    assert lce_mod.pick_chunk_size(100, 64, 32000, torch.float32, cpu) == 100
    budget = 50 * 4 * 100
    assert lce_mod.pick_chunk_size(10**6, 8, 50, torch.float32, cpu, chunk_bytes=budget) == 100
    bf16_rows = lce_mod.pick_chunk_size(10**6, 8, 50, torch.bfloat16, cpu, chunk_bytes=budget)
    assert bf16_rows == 200 - 200 % 128


def test_weight_gradient_accumulates_in_fp32():
    """1 + 64 * 2**-10 = 1.0625 exactly in fp32; a bf16 accumulator would stay at 1."""
    acc = torch.ones(1, 1, device=DEVICE)
    a = torch.full((1, 1), 2.0**-5, dtype=torch.bfloat16, device=DEVICE)
    b = torch.full((1, 1), 2.0**-5, dtype=torch.bfloat16, device=DEVICE)
    for _ in range(64):
        lce_mod.accumulate_fp32(acc, a, b)
    assert acc.item() == 1.0625


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_many_chunks_weight_gradient(backend):
    """48 one-row chunks each add 1/40 to dW[v != 0]: exact 1.2 in fp32, drifts in bf16.

    x = 1 and W = b = 0 make softmax uniform, so dW[v, :] = sum_n (1/V - [y_n == v]).
    """
    n, h, v = 48, 8, 40
    x = torch.ones(n, h, dtype=torch.bfloat16, device=DEVICE)
    w = torch.zeros(v, h, dtype=torch.bfloat16, device=DEVICE)
    b = torch.zeros(v, dtype=torch.bfloat16, device=DEVICE)
    target = torch.zeros(n, dtype=torch.long, device=DEVICE)
    _, grads, _, ref_grads = run_both(x, w, b, target, backend, "sum", chunk_size=1)
    for g, r in zip(grads[1:], ref_grads[1:]):  # dW and db, both accumulated across chunks
        torch.testing.assert_close(g.double(), r, rtol=8e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_raises(backend):
    x, w, b, target, _ = make_case(6, 4, 10, torch.float32)
    x.requires_grad_()
    loss = linear_cross_entropy(x, w, target, b, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_argument_errors():
    x, w, b, target, _ = make_case(4, 6, 10, torch.float32)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(x, w[:, :5], target, b)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(x, w, target, b[:3])
    with pytest.raises(TypeError, match="dtype"):
        linear_cross_entropy(x, w.double(), target, b)
    with pytest.raises(ValueError, match="target shape"):
        linear_cross_entropy(x, w, target[:2], b)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, target, b, reduction="avg")


@pytest.mark.gpu
def test_gpu_accumulate_mode_is_fp32_gemm():
    """On CUDA the fp32 dW accumulation should not need the slow fp32 upcast."""
    mode = lce_mod.accumulate_mode(torch.device("cuda"))
    assert mode in ("addmm_out_dtype", "mm_out_dtype"), mode


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_bf16_matches_and_saves_memory():
    n, h, v = 4096, 1024, 32768
    x, w, b, target, _ = make_case(n, h, v, torch.bfloat16, seed=8, ignore_every=9)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(*leaves[:2], target, leaves[2], chunk_size=512, label_smoothing=0.1)
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    # The fp32 dW (v*h*4) is the floor; full fp32 logits alone would be n*v*4 = 512 MiB.
    assert peak < v * h * 4 + 3 * n * v * 2 // 8 + 128 * 2**20, peak  # slack: cuBLAS workspace
    refs = [t.double().requires_grad_() for t in (x, w, b)]
    reference(refs[0], refs[1], target, refs[2], ls=0.1).backward()
    close(
        loss.detach(), reference(x.double(), w.double(), target, b.double(), ls=0.1), torch.bfloat16
    )
    for g, r in zip((t.grad for t in leaves), (t.grad for t in refs)):
        close(g, r, torch.bfloat16)
