"""kernels.cross_entropy against a float64 PyTorch reference, both backends.

Without a GPU the Triton kernels run in Triton's CPU interpreter. ``TRITON_INTERPRET=1`` is set
below before anything imports triton, and only when CUDA is absent, so on a GPU machine the
same tests run the real compiled kernels. (kernels._common also JIT-decorates lazily, so the
variable only has to be set before the first launch, whatever the import order.)
Shapes stay tiny (N <= 64, C <= 300): the interpreter is slow.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels._common as common  # noqa: E402
from kernels import cross_entropy  # noqa: E402
from kernels._common import tl  # noqa: E402

# importlib: the package attribute kernels.cross_entropy is the function, not the module.
ce_mod = importlib.import_module("kernels.cross_entropy")
DEFAULT_MAX_BLOCK = ce_mod.MAX_BLOCK
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = common.HAS_TRITON and (DEVICE == "cuda" or common.interpret_mode())
# "torch" runs the fallback's closed-form autograd Function; "torch-small" the path that small
# inputs take in normal runs (torch's own loss + our divisor and z-loss): both must match.
BACKENDS = [
    "torch",
    pytest.param("torch", id="torch-small"),
    pytest.param("triton", marks=pytest.mark.skipif(not TRITON_OK, reason="no triton/interpreter")),
]
# (rtol, atol relative to the largest reference magnitude)
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (3e-3, 2e-3)}


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch):
    # BLOCK=64 makes C=257 span five blocks with a ragged tail: exercises the online softmax.
    monkeypatch.setattr(ce_mod, "MAX_BLOCK", 64)


@pytest.fixture(autouse=True)
def _torch_path(request, monkeypatch):
    """Test shapes are all "small": send plain "torch" cases through the chunked Function."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "torch-small" not in callspec.id:
        monkeypatch.setattr(ce_mod, "SMALL_TORCH_ELEMENTS", -1)


# --------------------------------------------------------------------------- reference


def reference(logits, target, weight=None, ignore_index=-100, ls=0.0, z=0.0, reduction="mean"):
    """Float64 torch.nn.functional.cross_entropy (class dim last) plus the z-loss term."""
    c = logits.shape[-1]
    x, t = logits.double().reshape(-1, c), target.reshape(-1)
    w = None if weight is None else weight.double()
    ce = F.cross_entropy(
        x, t, weight=w, ignore_index=ignore_index, label_smoothing=ls, reduction=reduction
    )
    valid = t != ignore_index
    z_rows = z * torch.logsumexp(x, dim=-1) ** 2 * valid
    if reduction == "none":
        return (ce + z_rows).reshape(target.shape)
    if reduction == "sum":
        return ce + z_rows.sum()
    divisor = valid.sum() if w is None else (w[t.clamp(min=0)] * valid).sum()
    return ce + z_rows.sum() / divisor


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=atol * scale)


def make_case(n, c, dtype, seed=0, ignore_every=0, ignore_index=-100, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, c, generator=g) * scale).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    if ignore_every:
        target[::ignore_every] = ignore_index
    weight = torch.rand(c, generator=g) + 0.1
    return logits.to(DEVICE), target.to(DEVICE), weight.to(DEVICE)


def upstream(loss, reduction, seed=1):
    """A non-uniform grad_output for "none", a non-unit scalar otherwise."""
    if reduction == "none":
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(loss.shape, generator=g) + 0.5).to(loss.device, loss.dtype)
    return torch.tensor(1.7, device=loss.device, dtype=loss.dtype)


def run_both(logits, target, backend, reduction="mean", weight=None, **opts):
    """(ours loss, ours grad, reference loss, reference grad) with the same upstream gradient."""
    x = logits.detach().requires_grad_()  # keeps the strides (clone would not, for views)
    loss = cross_entropy(x, target, weight=weight, reduction=reduction, backend=backend, **opts)
    go = upstream(loss, reduction)
    loss.backward(go)
    x64 = logits.double().requires_grad_()
    ref = reference(
        x64,
        target,
        weight,
        -100 if opts.get("ignore_index", -100) is None else opts.get("ignore_index", -100),
        opts.get("label_smoothing", 0.0),
        opts.get("z_loss", 0.0),
        reduction,
    )
    ref.backward(go.double())
    return loss, x.grad, ref.detach(), x64.grad


OPTION_SETS = {
    "plain": {},
    "weight": {"weight": True},
    "smooth_ignore": {"label_smoothing": 0.1, "ignore_index": -1, "ignore_every": 3},
    "weight_smooth_ignore": {"weight": True, "label_smoothing": 0.2, "ignore_every": 4},
    "z_loss": {"z_loss": 1e-3},
    # None: every row counts (what the trainer passes for classifier labels).
    "no_ignore": {"ignore_index": None},
    "no_ignore_everything": {
        "ignore_index": None,
        "weight": True,
        "label_smoothing": 0.1,
        "z_loss": 1e-2,
    },
    "everything": {
        "weight": True,
        "label_smoothing": 0.1,
        "z_loss": 1e-2,
        "ignore_index": 5,
        "ignore_every": 5,
    },
}


def build(option_set, n, c, dtype, seed=0):
    spec = dict(OPTION_SETS[option_set])
    use_weight = spec.pop("weight", False)
    ignore_every = spec.pop("ignore_every", 0)
    logits, target, weight = make_case(
        n, c, dtype, seed, ignore_every, spec.get("ignore_index", -100)
    )
    return logits, target, (weight if use_weight else None), spec


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_matches_reference_fp32(backend, reduction, option_set):
    logits, target, weight, opts = build(option_set, 37, 257, torch.float32)
    loss, grad, ref, ref_grad = run_both(logits, target, backend, reduction, weight, **opts)
    assert loss.shape == ref.shape and loss.dtype == torch.float32
    close(loss, ref, torch.float32)
    close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("option_set", ["plain", "everything"])
def test_low_precision(backend, dtype, option_set):
    logits, target, weight, opts = build(option_set, 29, 200, dtype, seed=3)
    loss, grad, ref, ref_grad = run_both(logits, target, backend, "mean", weight, **opts)
    assert loss.dtype == dtype and grad.dtype == dtype
    close(loss, ref, dtype)
    close(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_gradient_near_softmax_one(backend):
    # p[y] = 1 - ~2e-3: in bf16, p - 1 would round to 0 or to -2**-8 (~100% error on the
    # target column); computed in fp32 and cast once it keeps bf16's relative precision.
    n, c = 8, 257
    logits = torch.zeros(n, c)
    target = torch.arange(n) * 7
    logits[torch.arange(n), target] = 11.0
    logits, target = logits.to(torch.bfloat16).to(DEVICE), target.to(DEVICE)
    _, grad, _, ref_grad = run_both(logits, target, backend, "sum")
    rows = torch.arange(n, device=DEVICE)
    hit, ref_hit = grad[rows, target].double(), ref_grad[rows, target]
    assert torch.all(ref_hit < 0)
    torch.testing.assert_close(hit, ref_hit, rtol=1e-2, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c", [1, 2, 64, 257, 300])
def test_odd_class_counts(backend, c):
    logits, target, weight = make_case(11, c, torch.float32, seed=c)
    for opts in ({}, {"label_smoothing": 0.3, "z_loss": 1e-3}):
        loss, grad, ref, ref_grad = run_both(logits, target, backend, "mean", weight, **opts)
        close(loss, ref, torch.float32)
        close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_block_size(backend, monkeypatch):
    monkeypatch.setattr(ce_mod, "MAX_BLOCK", DEFAULT_MAX_BLOCK)
    logits, target, weight, opts = build("everything", 9, 300, torch.float32)
    loss, grad, ref, ref_grad = run_both(logits, target, backend, "mean", weight, **opts)
    close(loss, ref, torch.float32)
    close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits(backend, dtype):
    logits, target, _ = make_case(16, 150, torch.float32, seed=7)
    logits[:, 0] = 1e4  # a huge logit (never a target below)
    logits[1::2, 1] = -1e4
    logits[::3, 2:40] = float("-inf")  # whole -inf blocks, away from the targets
    target = target.clamp(min=40)
    target[::4] = 0  # rows whose target is the huge logit: loss ~ 0, p ~ 1
    logits = logits.to(dtype)
    loss, grad, ref, ref_grad = run_both(logits, target, backend, "none", z_loss=1e-6)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    close(loss, ref, dtype)
    close(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_all_rows_ignored(backend, reduction):
    logits, _, weight = make_case(12, 70, torch.float32)
    target = torch.full((12,), -100, device=DEVICE)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(
        x,
        target,
        weight=weight,
        label_smoothing=0.1,
        z_loss=1e-2,
        reduction=reduction,
        backend=backend,
    )
    loss.sum().backward()
    assert torch.all(loss == 0), loss
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_three_dim_input(backend, reduction):
    logits, target, weight, opts = build("everything", 24, 130, torch.float32, seed=5)
    logits, target = logits.reshape(2, 12, 130), target.reshape(2, 12)
    loss, grad, ref, ref_grad = run_both(logits, target, backend, reduction, weight, **opts)
    assert loss.shape == ((2, 12) if reduction == "none" else ())
    assert grad.shape == (2, 12, 130)
    close(loss, ref, torch.float32)
    close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["row_slice", "row_step", "col_step", "transposed"])
def test_non_contiguous_logits(backend, layout):
    n, c = 10, 90
    base, target, _ = make_case(2 * n, 2 * c, torch.float32, seed=11)
    target = target[:n] % c
    views = {
        "row_slice": lambda b: b[:n, :c],  # row stride 2c: used as is
        "row_step": lambda b: b[::2, :c],  # row stride 4c: used as is
        "col_step": lambda b: b[:n, ::2],  # last dim strided: copied
        "transposed": lambda b: b.t().contiguous().t()[:n, :c],  # column-major: copied
    }
    logits = views[layout](base)
    target = torch.stack([target, target], dim=1)[:, 0]  # a strided target too
    loss, grad, ref, ref_grad = run_both(logits, target, backend, "none", label_smoothing=0.1)
    close(loss, ref, torch.float32)
    close(grad, ref_grad, torch.float32)


# --------------------------------------------------------------------------- memory behaviour


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_on_row_strided_view_has_no_hidden_copy(backend):
    n, c = 9, 100
    base, target, weight = make_case(n, c + 28, torch.float32, seed=2)
    target, weight = target % c, weight[:c]
    expected_loss, expected_grad, _, _ = run_both(base[:, :c], target, backend, "sum", weight)
    h = base.clone().requires_grad_()
    logits = h * 1.0  # non-leaf whose backward does not need its output
    view = logits[:, :c]  # row stride c + 28, unit column stride
    loss = cross_entropy(
        view, target, weight=weight, reduction="sum", backend=backend, inplace_grad=True
    )
    torch.testing.assert_close(loss, expected_loss)
    # The gradient (before the upstream factor) now sits in the caller's buffer itself.
    torch.testing.assert_close(logits.detach()[:, :c], expected_grad / 1.7)
    torch.testing.assert_close(logits.detach()[:, c:], base[:, c:])  # padding untouched
    loss.backward(torch.tensor(1.7))
    torch.testing.assert_close(h.grad[:, :c], expected_grad)
    assert torch.all(h.grad[:, c:] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_grad_guard_when_logits_are_saved_elsewhere(backend):
    logits, target, _ = make_case(8, 40, torch.float32)
    h = logits.clone().requires_grad_()
    capped = torch.tanh(h)  # tanh saves its output for backward
    loss = cross_entropy(capped, target, backend=backend, inplace_grad=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_raises_or_accumulates_correctly(backend, request):
    logits, target, _ = make_case(6, 20, torch.float32)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, target, backend=backend)
    loss.backward(retain_graph=True)
    if "torch-small" in request.node.callspec.id:  # torch's own backward may run twice
        first = x.grad.clone()
        loss.backward()
        torch.testing.assert_close(x.grad, 2 * first)
        return
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_upstream_gradient(backend):
    # loss.backward() with grad_output == 1: the Triton scale kernel skips every row.
    logits, target, weight, opts = build("everything", 16, 120, torch.float32, seed=9)
    x = logits.clone().requires_grad_()
    cross_entropy(x, target, weight=weight, backend=backend, **opts).backward()
    x64 = logits.double().requires_grad_()
    reference(
        x64, target, weight, opts["ignore_index"], opts["label_smoothing"], opts["z_loss"]
    ).backward()
    close(x.grad, x64.grad, torch.float32)


def test_torch_fallback_row_chunks(monkeypatch):
    monkeypatch.setitem(ce_mod.TORCH_CHUNK_BYTES, DEVICE, 4 * 3 * 130 * 5)  # 5 rows per chunk
    monkeypatch.setattr(ce_mod, "TORCH_CHUNK_MIN_ROWS", 1)
    logits, target, weight, opts = build("everything", 23, 130, torch.float32)
    loss, grad, ref, ref_grad = run_both(logits, target, "torch", "none", weight, **opts)
    close(loss, ref, torch.float32)
    close(grad, ref_grad, torch.float32)


def test_no_grad_needed_skips_gradient():
    logits, target, _ = make_case(5, 30, torch.float32)
    with torch.no_grad():
        loss = cross_entropy(logits, target, backend="torch")
    close(loss, reference(logits, target), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync(backend, monkeypatch):
    """No .item(), bool(tensor) or tolist() anywhere in forward + backward."""
    logits, target, weight, opts = build("everything", 12, 100, torch.float32)
    x = logits.clone().requires_grad_()

    def boom(*_args, **_kwargs):
        raise AssertionError("host sync: a tensor value was read on the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    for reduction in ("mean", "none"):
        loss = cross_entropy(x, target, weight=weight, reduction=reduction, backend=backend, **opts)
        loss.backward(torch.ones_like(loss))
    monkeypatch.undo()
    assert x.grad is not None


# --------------------------------------------------------------------------- API and backends


def test_argument_errors():
    logits, target, weight = make_case(4, 10, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="target shape"):
        cross_entropy(logits, target[:3])
    with pytest.raises(TypeError, match="integer"):
        cross_entropy(logits, target.float())
    with pytest.raises(ValueError, match="weight"):
        cross_entropy(logits, target, weight=weight[:5])
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="backend"):
        cross_entropy(logits, target, backend="cuda")


def test_backend_selection(monkeypatch):
    cpu = torch.zeros(2, 3)
    assert common.pick_backend(cpu, "auto") == "torch"
    assert common.pick_backend(cpu, "torch") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if common.HAS_TRITON:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            common.pick_backend(cpu, "triton")
    monkeypatch.setattr(common, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="not importable"):
        common.pick_backend(cpu, "triton")
    assert common.pick_backend(cpu, "auto") == "torch"


def _twice(x):
    return x * 2


def _twice_kernel(out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _twice(offs))


@pytest.mark.skipif(not common.HAS_TRITON, reason="triton not importable")
def test_lazy_jit_binds_the_helpers_of_the_current_mode(monkeypatch):
    """The kernel and its helpers are jitted once per TRITON_INTERPRET mode, and each launch
    finds the helpers of its own mode under their names (where Triton resolves callees)."""
    monkeypatch.setitem(globals(), "_twice", _twice)  # restored: the launches rebind it
    kernel = common.LazyJit(_twice_kernel, helpers=(_twice,))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernel[(1,)]  # jits for the compiler; nothing is launched without the call
    compiled = globals()["_twice"]
    assert isinstance(compiled, common.triton.runtime.JITFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = torch.zeros(8, dtype=torch.int32)
    kernel[(1,)](out, BLOCK=8)
    assert out.tolist() == [2 * i for i in range(8)]
    assert globals()["_twice"] is not compiled
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kernel[(1,)]
    assert globals()["_twice"] is compiled


def test_imports_and_falls_back_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, kernels\n"
        "x = torch.randn(4, 7, requires_grad=True)\n"
        "loss = kernels.cross_entropy(x, torch.tensor([0, 1, 2, 3]))\n"
        "loss.backward()\n"
        "ref = torch.nn.functional.cross_entropy(x, torch.tensor([0, 1, 2, 3]))\n"
        "assert torch.allclose(loss, ref), (loss, ref)\n"
        "assert not kernels._common.HAS_TRITON\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- int64 offsets


def test_row_offsets_beyond_int32():
    """Row 2 starts 2**31 + 128 elements in: int32 offset arithmetic would wrap around.

    The 4 GiB storage is only reserved: torch.empty does not touch the pages, and only the
    three rows are written, so this needs ~no real memory. Runs the Triton kernel (interpreter
    on CPU, compiled on GPU).
    """
    if not TRITON_OK:
        pytest.skip("no triton/interpreter")
    c, stride = 96, 2**30 + 64
    storage = torch.empty(2 * stride + c, dtype=torch.bfloat16, device=DEVICE)
    logits = storage.as_strided((3, c), (stride, 1))
    dense, target, _ = make_case(3, c, torch.bfloat16, seed=4)
    logits.copy_(dense)
    logits.requires_grad_()  # no clone: that would make it contiguous
    loss = cross_entropy(logits, target, reduction="none", backend="triton", label_smoothing=0.1)
    loss.backward(upstream(loss, "none"))
    _, _, ref, ref_grad = run_both(dense, target, "torch", "none", label_smoothing=0.1)
    close(loss, ref, torch.bfloat16)
    close(logits.grad, ref_grad, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_huge_bf16_logits():
    """N*C > 2**31 elements in bf16 on a real GPU (~4.3 GB logits + 4.3 GB gradient)."""
    n, c = 8200, 262144
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(n, c, device="cuda", dtype=torch.bfloat16, generator=g)
    target = torch.randint(0, c, (n,), device="cuda", generator=g)
    x = logits.requires_grad_()
    loss = cross_entropy(x, target, reduction="none", backend="triton", label_smoothing=0.1)
    loss.backward(torch.ones_like(loss))
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device="cuda")
    sub = logits.detach()[rows].double().requires_grad_()
    ref = reference(sub, target[rows], ls=0.1, reduction="none")
    ref.sum().backward()
    close(loss.detach()[rows], ref.detach(), torch.bfloat16)
    close(x.grad[rows], sub.grad, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_no_host_sync():
    logits, target, weight, opts = build("everything", 64, 32000, torch.bfloat16)
    x = logits.clone().requires_grad_()
    cross_entropy(x, target, weight=weight, backend="triton", **opts).backward(
        torch.tensor(2.0, device="cuda")
    )
    torch.cuda.synchronize()  # both kernels compiled outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = cross_entropy(x, target, weight=weight, backend="triton", **opts)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
