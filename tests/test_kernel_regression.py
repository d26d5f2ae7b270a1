"""kernels.regression: Triton kernel (interpreter on CPU) and PyTorch fallback against a float64
numpy reference, including the large-mean case where the naive sum-of-squares formula fails."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel launch

import numpy as np
import pytest

from kernels import regression as kr

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(kr.triton is None, reason="triton not importable")
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]


# fp32 block sums: 1e-6 relative, and 1e-6 absolute for the target mean of N(0, 1) data
TOL = dict(rtol=1e-6, atol=1e-6)


def reference_state(preds, target):
    """[n, mean, m2, sse, sae] in float64 numpy, two-pass (exact enough as a reference)."""
    p = preds.detach().cpu().double().numpy().ravel()
    t = target.detach().cpu().double().numpy().ravel()
    mean = t.mean()
    e = p - t
    return np.array([t.size, mean, ((t - mean) ** 2).sum(), (e * e).sum(), np.abs(e).sum()])


def accumulate(backend, batches):
    st = kr.RegressionStats(DEVICE)
    for p, t in batches:
        kr.regression_stats(p.to(DEVICE), t.to(DEVICE), st, backend=backend)
    return st.state.cpu().numpy()


def make(n, seed, *, loc=0.0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = loc + scale * torch.randn(n, generator=g, dtype=torch.float64)
    p = t + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return p.to(dtype), t.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 7, 2048, 5000])  # single element, < one block, exact block, tail
def test_single_batch_matches_reference(backend, n):
    p, t = make(n, n)
    np.testing.assert_allclose(accumulate(backend, [(p, t)]), reference_state(p, t), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_merge_equals_one_batch(backend):
    p, t = make(6000, 1, loc=5.0, scale=3.0)
    sizes = [1, 999, 2048, 5, 2947]
    batches = list(zip(p.split(sizes), t.split(sizes)))
    np.testing.assert_allclose(accumulate(backend, batches), reference_state(p, t), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    p, t = make(3000, 2, dtype=dtype)
    np.testing.assert_allclose(accumulate(backend, [(p, t)]), reference_state(p, t), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_flattened_and_integer_targets(backend):
    g = torch.Generator().manual_seed(3)
    t = torch.randint(-50, 50, (300, 1), generator=g)
    p = t.squeeze(1).float() + torch.randn(300, generator=g)
    np.testing.assert_allclose(accumulate(backend, [(p, t)]), reference_state(p, t), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_is_stable_in_the_kernel(backend):
    """Targets ~ 1e6 + N(0, 1) in fp32: the block shift keeps the fp32 arithmetic exact."""
    p, t = make(40_000, 4, loc=1e6)
    got, ref = (
        accumulate(backend, [(p[:25_000], t[:25_000]), (p[25_000:], t[25_000:])]),
        reference_state(p, t),
    )
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    r2, r2_ref = 1 - got[3] / got[2], 1 - ref[3] / ref[2]
    assert abs(r2 - r2_ref) < 1e-6


def test_large_mean_ten_million_samples():
    """R^2 at 1e7 samples, targets ~ 1e6 + N(0, 1), streamed in 10 batches (fallback path),
    against float64 numpy; the naive fp32 E[y^2] - E[y]^2 formula would be useless here."""
    p, t = make(10_000_000, 5, loc=1e6)
    batches = list(zip(p.chunk(10), t.chunk(10)))
    got, ref = accumulate("torch", batches), reference_state(p, t)
    np.testing.assert_allclose(got, ref, rtol=1e-9)
    r2, r2_ref = 1 - got[3] / got[2], 1 - ref[3] / ref[2]
    assert abs(r2 - r2_ref) < 1e-9
    t32 = t.float()
    naive_tss = float((t32 * t32).sum() - t32.sum() ** 2 / t32.numel())
    assert abs(naive_tss - ref[2]) > 0.5 * ref[2]  # the cancellation this design avoids


def test_merge_moments_chan_formula():
    parts = []
    chunks = [make(n, 10 + n, loc=100.0 * n)[1] for n in (3, 50, 1)]
    for c in chunks:
        parts.append(torch.tensor(reference_state(c, c)))
    parts.append(torch.zeros(5, dtype=torch.float64))  # an empty rank/state contributes nothing
    merged = kr.merge_moments(torch.stack(parts)).numpy()
    everything = torch.cat(chunks)
    np.testing.assert_allclose(
        merged, reference_state(everything, everything), rtol=1e-12, atol=1e-9
    )


def test_empty_batch_and_errors():
    st = kr.RegressionStats()
    kr.regression_stats(torch.empty(0), torch.empty(0), st)
    assert st.state.tolist() == [0.0] * 5
    with pytest.raises(ValueError, match="targets"):
        kr.regression_stats(torch.zeros(3), torch.zeros(4), st)
    st.state.fill_(1.0)
    st.reset()
    assert st.state.sum() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_equals_fallback_and_never_syncs(dtype):
    p, t = make(3_000_000, 7, loc=1e4, dtype=dtype)
    p, t = p.cuda(), t.cuda()
    states = {}
    for backend in ("triton", "torch"):
        st = kr.RegressionStats("cuda")
        kr.regression_stats(p, t, st, backend=backend)  # warm-up / compile
        st.reset()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            kr.regression_stats(p, t, st, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        states[backend] = st.state.cpu().numpy()
    np.testing.assert_allclose(states["triton"], states["torch"], rtol=1e-6)
