"""kernels.classification: Triton kernel (interpreter on CPU) and PyTorch fallback against an
independent reference (stable sort for ranks, softmax for confidences, bincount for counts).

Counts must match exactly; confidence sums to 1e-6 relative.
"""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before the first kernel launch (kernels.classification jits lazily, so
    # an earlier import of the package by another test module does not matter).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess
import sys

import pytest

from kernels import classification as kc

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(kc.triton is None, reason="triton not importable")
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]


# ---- independent reference ------------------------------------------------------------
def reference_stats(x, t, num_classes, *, top_k=5, ece_bins=15, ignore_index=None, dense_max=256):
    """A ClassificationStats filled by straightforward, differently-written torch code."""
    ref = kc.ClassificationStats(
        num_classes, top_k=top_k, ece_bins=ece_bins, dense_max_classes=dense_max
    )
    x, t = x.cpu(), t.cpu().reshape(-1).long()
    kept = torch.ones_like(t, dtype=torch.bool) if ignore_index is None else t != ignore_index
    ok = (t >= 0) & (t < num_classes)
    logits = x.is_floating_point()
    if not logits:
        pred = x.reshape(-1).long()
        ok &= (pred >= 0) & (pred < num_classes)
    valid = kept & ok
    ref.counts[ref.off_invalid] = int((kept & ~ok).sum())
    t = t[valid]
    if logits:
        xf = (x.double() if x.dtype == torch.float64 else x.float())[valid]
        pred = xf.argmax(1)
        order = torch.sort(xf, dim=1, descending=True, stable=True).indices
        rank = (order == t[:, None]).int().argmax(1)
        conf = torch.softmax(xf, dim=1).max(1).values.float()
        bins = torch.bucketize(conf, torch.linspace(0, 1, ece_bins + 1), right=True) - 1
        ref.rank_hist()[:] = torch.bincount(rank[rank < top_k], minlength=top_k)[:top_k]
        ref.ece_count()[:] = torch.bincount(bins, minlength=ece_bins + 1)
        ref.ece_correct()[:] = torch.bincount(bins[pred == t], minlength=ece_bins + 1)
        ref.conf_sum[: ece_bins + 1] = torch.zeros(ece_bins + 1, dtype=torch.float64).index_add_(
            0, bins, conf.double()
        )
    else:
        pred = pred[valid]
    c = num_classes
    if ref.dense:
        ref.confusion()[:] = torch.bincount(t * c + pred, minlength=c * c).view(c, c)
    else:
        ref.counts[:c] = torch.bincount(t[pred == t], minlength=c)
        ref.counts[c : 2 * c] = torch.bincount(pred, minlength=c)
        ref.counts[2 * c : 3 * c] = torch.bincount(t, minlength=c)
    return ref


def run(
    backend, x, t, num_classes, *, top_k=5, ece_bins=15, ignore_index=None, dense_max=256, updates=1
):
    st = kc.ClassificationStats(
        num_classes, top_k=top_k, ece_bins=ece_bins, dense_max_classes=dense_max, device=DEVICE
    )
    for _ in range(updates):
        kc.classification_stats(
            x.to(DEVICE), t.to(DEVICE), st, ignore_index=ignore_index, backend=backend
        )
    return st


def assert_same(st, ref, updates=1):
    assert torch.equal(st.counts[:-1].cpu(), updates * ref.counts[:-1]), (st.counts, ref.counts)
    torch.testing.assert_close(
        st.conf_sum[:-1].cpu(), updates * ref.conf_sum[:-1], rtol=1e-6, atol=1e-9
    )


def logits(n, c, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, generator=g) * scale).to(dtype)


def targets(n, c, seed):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed + 1))


# ---- cases --------------------------------------------------------------------------
CASES = {
    "random_c7": lambda: (logits(150, 7, 0), targets(150, 7, 0), 7, {}),
    "binary_c2": lambda: (logits(100, 2, 1), targets(100, 2, 1), 2, {}),
    "c1": lambda: (logits(20, 1, 2), torch.zeros(20, dtype=torch.long), 1, {}),
    "c20_dense_global_atomics": lambda: (logits(120, 20, 3), targets(120, 20, 3), 20, {}),
    "c20_per_class": lambda: (logits(120, 20, 3), targets(120, 20, 3), 20, {"dense_max": 10}),
    "c3000_per_class": lambda: (logits(12, 3000, 4), targets(12, 3000, 4), 3000, {}),
    "top_k_gt_c": lambda: (logits(60, 3, 5), targets(60, 3, 5), 3, {"top_k": 5}),
    "ece_bins_7_top1": lambda: (
        logits(80, 9, 6, scale=1.0),
        targets(80, 9, 6),
        9,
        {"ece_bins": 7, "top_k": 1},
    ),
    "int_targets_int32": lambda: (logits(50, 6, 7), targets(50, 6, 7).int(), 6, {}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference(backend, case):
    x, t, c, kw = CASES[case]()
    ref_kw = {k: v for k, v in kw.items()}
    assert_same(run(backend, x, t, c, **kw), reference_stats(x, t, c, **ref_kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    x, t = logits(90, 12, 8, dtype=dtype), targets(90, 12, 8)
    assert_same(run(backend, x, t, 12), reference_stats(x, t, 12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_in_logits_follow_lower_index_rule(backend):
    """Integer logits: many exact ties. Rank = #greater + #equal at a lower index, i.e. the
    position in a *stable* descending sort; top-1 hits must equal argmax hits."""
    g = torch.Generator().manual_seed(9)
    x = torch.randint(0, 3, (160, 10), generator=g).float()
    x[:10] = 1.0  # rows that are all equal
    t = targets(160, 10, 9)
    st = run(backend, x, t, 10)
    assert_same(st, reference_stats(x, t, 10))
    assert st.rank_hist()[0] == st.confusion().diagonal().sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_tie_example(backend):
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0]] * 3)
    t = torch.tensor([1, 2, 0])
    st = run(backend, x, t, 4, top_k=4)
    # target 1: rank 0 (first max); target 2: rank 1 (tied with lower index 1); target 0: rank 2
    assert st.rank_hist().tolist() == [1, 1, 1, 0]
    assert st.confusion()[:, 1].sum() == 3  # argmax picks index 1 for every row


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [3, -100])
def test_ignore_index_and_invalid_targets(backend, ignore_index):
    x, t = logits(140, 8, 10), targets(140, 8, 10)
    t[::4] = ignore_index
    t[1::9] = 8  # out of range, not ignored -> invalid
    t[2::11] = -1
    st = run(backend, x, t, 8, ignore_index=ignore_index)
    assert_same(st, reference_stats(x, t, 8, ignore_index=ignore_index))
    assert st.n_invalid() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored(backend):
    x, t = logits(40, 5, 11), torch.full((40,), -100)
    st = run(backend, x, t, 5, ignore_index=-100)
    assert st.counts[:-1].sum() == 0 and st.conf_sum[:-1].sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dense_max", [256, 4])
def test_index_predictions(backend, dense_max):
    c = 6
    p, t = targets(100, c, 12), targets(100, c, 13)
    p[::10] = c  # invalid prediction
    t[5::10] = -100
    st = run(backend, p, t, c, ignore_index=-100, dense_max=dense_max)
    assert_same(st, reference_stats(p, t, c, ignore_index=-100, dense_max=dense_max))
    assert st.rank_hist().sum() == 0 and st.ece_count().sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_several_updates_accumulate_and_reset(backend):
    x, t = logits(70, 5, 14), targets(70, 5, 14)
    st = run(backend, x, t, 5, updates=3)
    assert_same(st, reference_stats(x, t, 5), updates=3)
    st.reset()
    assert st.counts[:-1].sum() == 0 and st.conf_sum[:-1].sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base, t = logits(64, 18, 15), targets(128, 9, 15)
    x = base[:, ::2]  # [64, 9] with stride(1) == 2
    t = t[::2]
    assert_same(run(backend, x, t, 9), reference_stats(x, t, 9))


def test_dense_and_per_class_agree():
    x, t = logits(300, 30, 16), targets(300, 30, 16)
    dense = run("torch", x, t, 30)
    sparse = run("torch", x, t, 30, dense_max=8)
    assert dense.dense and not sparse.dense and sparse.confusion() is None
    for a, b in zip(dense.per_class(), sparse.per_class()):
        assert torch.equal(a, b)
    assert dense.n_valid() == sparse.n_valid() == 300


def test_large_c_fallback_many_rows():
    x, t = logits(2000, 3000, 17, dtype=torch.bfloat16), targets(2000, 3000, 17)
    assert_same(run("torch", x, t, 3000), reference_stats(x, t, 3000))


def test_fallback_tie_count_paths_agree():
    """The CPU path (find tied rows, then count) equals the sync-free dense count used on GPU."""
    g = torch.Generator().manual_seed(18)
    x = torch.randint(0, 4, (500, 16), generator=g).float()
    t = torch.randint(0, 16, (500,), generator=g)
    x_t = x.gather(1, t[:, None])
    greater = (x > x_t).sum(1)
    cpu = kc._tie_count(x, x_t, t, greater, 16, torch.empty_like(x))
    assert torch.equal(cpu, kc._dense_tie_count(x, x_t, t))
    assert cpu.sum() > 0


@requires_triton
def test_persistent_loop_over_row_blocks():
    """Fewer programs than row blocks: each program strides over several blocks."""
    x, t = logits(700, 3, 19), targets(700, 3, 19)  # BLOCK_N = 128 -> 6 blocks
    st = kc.ClassificationStats(3, device=DEVICE)
    kc._triton_update(x.to(DEVICE), t.to(DEVICE), st, None, max_programs=2)
    assert_same(st, reference_stats(x, t, 3))


@requires_triton
def test_launch_config_bounds_registers():
    st_small, st_big = kc.ClassificationStats(10), kc.ClassificationStats(32000)
    small = kc._launch_config(10, True, st_small)
    assert small["LOCAL_CM"] and small["BLOCK_N"] * small["CC_POW2"] <= 16384
    big = kc._launch_config(32000, True, st_big)
    assert not big["DENSE"] and big["BLOCK_C"] == 1024 and big["BLOCK_N"] * big["BLOCK_C"] <= 4096


# ---- API and backend selection ------------------------------------------------------
def test_backend_selection(monkeypatch):
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="backend"):
        kc.classification_stats(x, t, kc.ClassificationStats(3), backend="cuda")
    if kc.triton is not None:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            kc.classification_stats(x, t, kc.ClassificationStats(3), backend="triton")
        # auto never picks the interpreter for CPU tensors: the kernel is not even jitted
        monkeypatch.setattr(kc, "_triton_update", None)
        st = kc.ClassificationStats(3)
        kc.classification_stats(x, t, st, backend="auto")
        assert st.n_valid() == 4


def test_input_validation():
    st = kc.ClassificationStats(4)
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        kc.classification_stats(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), st)
    with pytest.raises(TypeError, match="integer"):
        kc.classification_stats(torch.randn(5, 4), torch.zeros(5), st)
    with pytest.raises(ValueError, match="targets"):
        kc.classification_stats(torch.randn(5, 4), torch.zeros(6, dtype=torch.long), st)
    with pytest.raises(ValueError):
        kc.ClassificationStats(0)


def test_fallback_works_without_triton():
    """Block the triton import in a fresh interpreter: the package imports, auto -> torch."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels, kernels.classification as kc, kernels.regression as kr\n"
        "assert kc.triton is None\n"
        "st = kc.ClassificationStats(3)\n"
        "kc.classification_stats(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), st)\n"
        "assert st.n_valid() == 4\n"
        "try:\n"
        "    kc.classification_stats(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), st, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "rs = kr.RegressionStats(); kr.regression_stats(torch.randn(5), torch.randn(5), rs)\n"
        "assert rs.state[0] == 5\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


# ---- GPU only -----------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "c"), [(300_000, 10), (100_000, 100), (50_000, 1000), (4_000, 32000)]
)
def test_gpu_kernel_equals_fallback(n, c, dtype):
    """Compiled kernel vs the torch fallback on the same CUDA tensors (incl. per-class mode,
    global-atomic dense mode and the register-local confusion matrix)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(n, c, device="cuda", generator=g) * 3).to(dtype)
    t = torch.randint(0, c, (n,), device="cuda", generator=g)
    t[::17] = -100
    sts = {}
    for backend in ("triton", "torch"):
        sts[backend] = kc.ClassificationStats(c, device="cuda")
        kc.classification_stats(x, t, sts[backend], ignore_index=-100, backend=backend)
    assert torch.equal(sts["triton"].counts[:-1], sts["torch"].counts[:-1])
    torch.testing.assert_close(
        sts["triton"].conf_sum[:-1], sts["torch"].conf_sum[:-1], rtol=1e-6, atol=1e-6
    )


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_update_never_syncs(backend):
    x = torch.randn(5000, 300, device="cuda")
    t = torch.randint(0, 300, (5000,), device="cuda")
    st = kc.ClassificationStats(300, device="cuda")
    kc.classification_stats(x, t, st, backend=backend)  # warm-up: compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kc.classification_stats(x, t, st, ignore_index=-100, backend=backend)
        kc.classification_stats(x.argmax(1), t, st, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
