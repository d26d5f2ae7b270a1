"""engine.metrics against torchmetrics itself (values to 1e-6 relative), edge cases, and the
DDP reduction with two gloo processes."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel launch

import json
import math
import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.functional.classification.calibration_error import _ce_compute
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

from engine.metrics import ClassificationMetrics, RegressionMetrics
from kernels import classification as kc

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
requires_triton = pytest.mark.skipif(kc.triton is None, reason="triton not importable")
BACKENDS = ["torch", pytest.param("triton", marks=requires_triton)]
TOL = dict(rel_tol=1e-6, abs_tol=1e-7)  # abs only matters for values that are ~0


# ---- helpers ------------------------------------------------------------------------
def tm_classification(num_classes, *, top_k=5, ignore_index=None, ece_bins=15, scores=True):
    metrics = {
        "acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index),
        "precision": MulticlassPrecision(num_classes, average="macro", ignore_index=ignore_index),
        "recall": MulticlassRecall(num_classes, average="macro", ignore_index=ignore_index),
        "f1": MulticlassF1Score(num_classes, average="macro", ignore_index=ignore_index),
    }
    if scores and num_classes > top_k:
        metrics[f"top{top_k}"] = MulticlassAccuracy(
            num_classes, top_k=top_k, average="micro", ignore_index=ignore_index
        )
    if scores:
        metrics["ece"] = MulticlassCalibrationError(
            num_classes, n_bins=ece_bins, norm="l1", ignore_index=ignore_index
        )
    return MetricCollection(metrics)


def reference(batches, num_classes, **kw):
    scores = batches[0][0].is_floating_point()
    coll = tm_classification(num_classes, scores=scores, **kw)
    for x, t in batches:
        coll.update(x.float() if scores else x, t)  # torchmetrics would round bf16 softmax to bf16
    values = {k: float(v) for k, v in coll.compute().items()}
    if scores:
        values["ece"] = _tm_ece_float64(coll["ece"], values["ece"])
    return values


def _tm_ece_float64(metric, ece_fp32):
    """torchmetrics' own ``_ce_compute`` on its own (fp32) confidences and bin edges, but summed
    in float64: its fp32 per-bin sums are only ~1e-6 accurate, the level we test at."""
    conf, acc = torch.cat(metric.confidences), torch.cat(metric.accuracies)
    if conf.numel() == 0:
        return math.nan
    edges = torch.linspace(0, 1, metric.n_bins + 1, dtype=torch.float32).double()  # exact widening
    ece = float(_ce_compute(conf.double(), acc.double(), edges, norm="l1"))
    assert math.isclose(ece, ece_fp32, rel_tol=1e-5, abs_tol=1e-6)
    return ece


def ours(batches, num_classes, backend="torch", **kw):
    m = ClassificationMetrics(num_classes, backend=backend, **kw)
    for x, t in batches:
        m.update(x.to(DEVICE), t.to(DEVICE))
    return m.compute()


def assert_values(got, want):
    assert set(got) == set(want), (got, want)
    for key in want:
        a, b = got[key], want[key]
        assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, **TOL), (key, a, b)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_batches(num_classes, sizes, seed, *, scale=3.0, dtype=torch.float32, ignore_index=None):
    """Random logits; for 16-bit dtypes a per-row permutation of well-separated values, so that
    rounding creates no exact ties (with ties only torch.topk's unspecified choice differs)."""
    g = gen(seed)
    out = []
    for n in sizes:
        if dtype in (torch.bfloat16, torch.float16):
            perm = torch.rand(n, num_classes, generator=g).argsort(1).float()
            x = ((perm - num_classes / 2) * (8.0 / num_classes)).to(dtype)
        else:
            x = (torch.randn(n, num_classes, generator=g) * scale).to(dtype)
        t = torch.randint(0, num_classes, (n,), generator=g)
        if ignore_index is not None:
            t[torch.rand(n, generator=g) < 0.2] = ignore_index
        out.append((x, t))
    return out


# ---- classification vs torchmetrics -------------------------------------------------
CASES = {
    "c10_three_updates": (10, [100, 57, 43], {}, {}),
    "binary": (2, [150, 50], {}, {}),
    "c100": (100, [180], {}, {}),
    "c300_per_class": (300, [200], {}, {}),
    "ignore_in_range": (12, [120, 80], {"ignore_index": 0}, {"ignore_index": 0}),
    "ignore_outside": (12, [120, 80], {"ignore_index": -100}, {"ignore_index": -100}),
    "top_k_3_bins_10": (8, [150], {"top_k": 3, "ece_bins": 10}, {}),
    "c5_top5_key_absent": (5, [100], {}, {}),
    "bf16": (20, [150], {}, {"dtype": torch.bfloat16}),
    "fp16": (20, [150], {}, {"dtype": torch.float16}),
    "fp64": (20, [150], {}, {"dtype": torch.float64}),
    "confident_conf_one": (6, [200], {}, {"scale": 40.0}),  # many rows with confidence == 1.0
    "flat_logits": (7, [200], {}, {"scale": 0.05}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_torchmetrics(case, backend):
    c, sizes, metric_kw, data_kw = CASES[case]
    batches = random_batches(c, sizes, seed=len(case), **data_kw)
    assert_values(ours(batches, c, backend, **metric_kw), reference(batches, c, **metric_kw))


def test_c3000_fallback_matches_torchmetrics():
    batches = random_batches(3000, [1500, 500], seed=1, scale=1.0)
    assert_values(ours(batches, 3000), reference(batches, 3000))


@requires_triton
def test_c3000_kernel_matches_torchmetrics():
    batches = random_batches(3000, [40], seed=2, scale=1.0)
    assert_values(ours(batches, 3000, "triton"), reference(batches, 3000))


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_class_present(backend):
    g = gen(3)
    x = torch.randn(120, 6, generator=g) * 2
    t = torch.full((120,), 4)
    assert_values(ours([(x, t)], 6, backend), reference([(x, t)], 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_in_logits(backend):
    """Integer logits (many exact ties). Everything but top-k equals torchmetrics (argmax
    picks the first max in both); top-k follows the documented lower-index rule, checked
    against a stable descending sort (torch.topk's choice among ties is unspecified)."""
    g = gen(4)
    x = torch.randint(0, 3, (300, 9), generator=g).float()
    x[:20] = 1.0
    t = torch.randint(0, 9, (300,), generator=g)
    got, want = ours([(x, t)], 9, backend), reference([(x, t)], 9)
    assert_values(
        {k: v for k, v in got.items() if k != "top5"},
        {k: v for k, v in want.items() if k != "top5"},
    )
    order = torch.sort(x, dim=1, descending=True, stable=True).indices[:, :5]
    assert got["top5"] == pytest.approx(
        (order == t[:, None]).any(1).double().mean().item(), rel=1e-12
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_predictions(backend):
    g = gen(5)
    p, t = torch.randint(0, 7, (200,), generator=g), torch.randint(0, 7, (200,), generator=g)
    t[::7] = -100
    got = ours([(p, t)], 7, backend, ignore_index=-100)
    assert set(got) == {"acc", "precision", "recall", "f1"}  # no scores: no top-k, no ece
    assert_values(got, reference([(p, t)], 7, ignore_index=-100))


def test_mixed_logits_and_indices_drop_score_metrics():
    m = ClassificationMetrics(7)
    ((x, t),) = random_batches(7, [50], seed=6)
    m.update(x, t)
    m.update(x.argmax(1), t)
    assert set(m.compute()) == {"acc", "precision", "recall", "f1"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_row_ignored(backend):
    x = torch.randn(30, 8, generator=gen(7))
    t = torch.full((30,), -100)
    got, want = (
        ours([(x, t)], 8, backend, ignore_index=-100),
        reference([(x, t)], 8, ignore_index=-100),
    )
    assert_values(got, want)
    assert got["acc"] == 0.0 and got["top5"] == 0.0 and math.isnan(got["ece"])


def test_no_update_at_all():
    got = ClassificationMetrics(8).compute()
    assert got["acc"] == got["f1"] == got["top5"] == 0.0 and math.isnan(got["ece"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_class(backend):
    """torchmetrics refuses num_classes=1; ours applies the same formulas."""
    x = torch.randn(25, 1, generator=gen(8))
    got = ours([(x, torch.zeros(25, dtype=torch.long))], 1, backend)
    assert got == {"acc": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "ece": 0.0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_raises_at_compute(backend):
    m = ClassificationMetrics(4, ignore_index=-1, backend=backend)
    target = torch.tensor([0, 1, -1, 4, 2, 3]).to(DEVICE)
    m.update(torch.randn(6, 4).to(DEVICE), target)  # counted as invalid, no sync here
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        m.compute()


def test_reset_and_update_after_compute():
    b = random_batches(10, [80, 80], seed=9)
    m = ClassificationMetrics(10)
    m.update(*b[0])
    first = m.compute()
    assert_values(first, reference(b[:1], 10))
    m.update(*b[1])  # compute() must not have changed the local state
    assert_values(m.compute(), reference(b, 10))
    m.reset()
    m.update(*b[1])
    assert_values(m.compute(), reference(b[1:], 10))


def test_topk_accuracy_every_k():
    b = random_batches(12, [200], seed=10, scale=1.0)
    m = ClassificationMetrics(12, top_k=5)
    m.update(*b[0])
    m.compute()
    for k in range(1, 6):
        want = MulticlassAccuracy(12, top_k=k, average="micro")(b[0][0], b[0][1]).item()
        assert m.topk_accuracy(k) == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError):
        m.topk_accuracy(6)
    m.update(b[0][0].argmax(1), b[0][1])  # index predictions: no ranks for those rows
    assert math.isnan(m.topk_accuracy(1))


def test_state_accessors():
    from sklearn.metrics import confusion_matrix

    ((x, t),) = random_batches(6, [300], seed=11)
    m = ClassificationMetrics(6)
    m.update(x, t)
    m.compute()
    cm = m.confusion_matrix()
    assert (
        cm.tolist()
        == confusion_matrix(t.numpy(), x.argmax(1).numpy(), labels=list(range(6))).tolist()
    )
    counts = m.per_class_counts()
    assert torch.equal(counts["tp"], cm.diagonal())
    assert torch.equal(counts["fp"], cm.sum(0) - cm.diagonal())
    hist = m.calibration_histogram()
    assert hist["count"].shape == (16,) and hist["count"].sum() == 300
    assert hist["correct"].sum() == cm.diagonal().sum()
    assert hist["conf_sum"].sum().item() == pytest.approx(
        torch.softmax(x, 1).max(1).values.sum().item(), rel=1e-6
    )
    assert m.num_classes == 6
    big = ClassificationMetrics(300)
    big.update(torch.randn(5, 300), torch.arange(5))
    assert big.confusion_matrix() is None and big.per_class_counts()["tp"].shape == (300,)


def test_device_handling():
    m = ClassificationMetrics(3)
    assert m._stats is None  # nothing allocated before the first update
    m.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]))
    assert m._stats.device.type == "cpu"
    m2 = ClassificationMetrics(3).to("cpu")
    assert m2._stats.device.type == "cpu"
    m2.update(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]))
    assert m2.compute()["acc"] >= 0.0


def test_constructor_validation():
    with pytest.raises(ValueError):
        ClassificationMetrics(0)
    with pytest.raises(ValueError):
        ClassificationMetrics(5, top_k=0)


# ---- regression ---------------------------------------------------------------------
def tm_regression(batches):
    coll = MetricCollection(
        {"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()}
    )
    for p, t in batches:
        coll.update(p.reshape(-1), t.reshape(-1))
    out = {k: float(v) for k, v in coll.compute().items()}
    out["rmse"] = math.sqrt(out["mse"])
    return out


def reg_batches(sizes, seed, loc=0.0):
    g = gen(seed)
    out = []
    for n in sizes:
        t = loc + torch.randn(n, generator=g) * 2
        out.append((t + torch.randn(n, generator=g) * 0.5, t))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_matches_torchmetrics(backend):
    batches = reg_batches([500, 1, 3000], seed=12, loc=3.0)
    m = RegressionMetrics(backend=backend)
    for p, t in batches:
        m.update(p.to(DEVICE), t.to(DEVICE))
    got = m.compute()
    assert list(got) == ["mse", "rmse", "mae", "r2"]
    assert_values(got, tm_regression(batches))


def test_regression_column_vector_output():
    ((p, t),) = reg_batches([100], seed=13)
    m = RegressionMetrics()
    m.update(p[:, None], t)
    assert_values(m.compute(), tm_regression([(p, t)]))


def test_regression_edge_cases():
    m = RegressionMetrics()
    assert all(math.isnan(v) for v in m.compute().values())  # no data
    m.update(torch.tensor([1.0]), torch.tensor([2.0]))
    got = m.compute()
    assert got["mse"] == 1.0 and got["mae"] == 1.0 and math.isnan(got["r2"])  # torchmetrics raises
    perfect = torch.linspace(0, 1, 50)
    m.reset()
    m.update(perfect, perfect)
    assert_values(m.compute(), tm_regression([(perfect, perfect)]))  # r2 = 1
    m.reset()
    m.update(perfect, torch.full((50,), 3.0))  # constant target, wrong predictions: r2 = 0
    assert_values(m.compute(), tm_regression([(perfect, torch.full((50,), 3.0))]))


# ---- DDP ----------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_data():
    cls = random_batches(11, [90, 60, 70, 40], seed=20, ignore_index=-100)
    reg = reg_batches([300, 200, 77], seed=21, loc=1e5)
    return cls, reg


def _ddp_worker(rank, world, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    calls = {"all_reduce": 0, "all_gather": 0}
    for name in calls:
        original = getattr(dist, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    cls, reg = _ddp_data()
    results = {}
    m = ClassificationMetrics(11, ignore_index=-100)
    for x, t in cls[rank::world]:  # rank 0: batches 0, 2; rank 1: batches 1, 3
        m.update(x, t)
    results["cls"] = m.compute()
    results["cls_calls"] = dict(calls)
    results["cm"] = m.confusion_matrix().tolist()
    idle = ClassificationMetrics(11, ignore_index=-100)  # rank 1 never updates
    if rank == 0:
        for x, t in cls:
            idle.update(x, t)
    results["cls_idle"] = idle.compute()
    r = RegressionMetrics()
    for p, t in reg[rank::world]:
        r.update(p, t)
    before = dict(calls)
    results["reg"] = r.compute()
    results["reg_calls"] = {k: calls[k] - before[k] for k in calls}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_ranks_equal_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    cls, reg = _ddp_data()
    single = ClassificationMetrics(11, ignore_index=-100)
    for x, t in cls:
        single.update(x, t)
    want_cls = single.compute()
    want_reg = RegressionMetrics()
    for p, t in reg:
        want_reg.update(p, t)
    want_reg = want_reg.compute()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert_values(got["cls"], want_cls)
        assert_values(got["cls_idle"], want_cls)
        assert got["cm"] == single.confusion_matrix().tolist()  # accessors see all ranks
        assert got["cls_calls"] == {"all_reduce": 1, "all_gather": 0}  # ONE collective
        assert_values(got["reg"], want_reg)
        assert got["reg_calls"] == {"all_reduce": 0, "all_gather": 1}
    p, t = (torch.cat(v).double() for v in zip(*reg))  # large-mean targets: float64 reference
    assert want_reg["r2"] == pytest.approx(
        1 - ((p - t) ** 2).sum().item() / ((t - t.mean()) ** 2).sum().item(), rel=1e-9
    )
