"""Benchmark engine.metrics against torchmetrics on identical inputs, checking equal values.

Classification: ours (``ClassificationMetrics``) vs a torchmetrics ``MetricCollection`` of
MulticlassAccuracy (micro), MulticlassPrecision / Recall / F1Score (macro), top-5
MulticlassAccuracy and MulticlassCalibrationError (15 bins). Regression: ``RegressionMetrics``
vs MeanSquaredError, MeanAbsoluteError, R2Score (+ sqrt for RMSE).

Both sides are timed over the whole stream: reset, one ``update`` per batch, ``compute``
(which syncs). GPU: CUDA events after a warm-up, median of ``--repeats`` runs; CPU:
``perf_counter``, same protocol. Inputs too large to hold (8M x 32000 logits would be 512 GB
in bf16) are fed as a stream of batches cycling over a fixed set of buffers. GB/s counts
the logits read once plus the targets.

    python benchmarks/kernels_metrics.py                 # CPU: N=500k, C in {10, 100, 1000}
    python benchmarks/kernels_metrics.py --device cuda   # N in {1M, 8M}, C in {10, 1000, 32000}, fp32+bf16
"""

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torchmetrics import MetricCollection  # noqa: E402
from torchmetrics.classification import (  # noqa: E402
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score  # noqa: E402

from engine.metrics import ClassificationMetrics, RegressionMetrics  # noqa: E402

PEAKS_TBS = (4.8, 4.3)  # H200 HBM3e: spec peak, and a practically reachable copy bandwidth
BUFFER_BYTES = {"cpu": 512 << 20, "cuda": 8 << 30}  # distinct input buffers, cycled


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--n", type=int, nargs="+", help="rows per stream (default: CPU 500k; GPU 1M 8M)"
    )
    p.add_argument(
        "--classes", type=int, nargs="+", help="default: CPU 10 100 1000; GPU 10 1000 32000"
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        choices=["fp32", "bf16", "fp16"],
        help="default: CPU fp32; GPU fp32 bf16",
    )
    p.add_argument(
        "--batch", type=int, help="rows per update (default: CPU 50k; GPU fits the buffer, >= 64k)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up (median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="ours")
    p.add_argument(
        "--tm-max-elements", type=float, default=4e10, help="skip torchmetrics above N*C"
    )
    p.add_argument("--skip-regression", action="store_true")
    p.add_argument("--out", type=Path, help="also write the markdown tables here")
    return p.parse_args(argv)


# ---- timing -------------------------------------------------------------------------
def timed(fn, device, repeats, budget_s=20.0):
    """(result of the first call, median ms of the timed calls). The first call is the warm-up
    and provides the values to check; slow cases get fewer timed repeats so the CPU run stays
    within a few minutes, and a first call longer than ``budget_s / 2`` is the timing itself."""
    t0 = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    if first_s > budget_s / 2:  # e.g. torchmetrics at C=1000 on CPU: warm-up is negligible there
        return result, first_s * 1e3
    repeats = max(1, min(repeats, int(budget_s / first_s)))
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return result, statistics.median(times)


def stream(metric, buffers, n_rows, batch):
    """reset, update over ``n_rows`` rows taken batch by batch from the cycled buffers, compute."""
    metric.reset()
    done, i = 0, 0
    while done < n_rows:
        x, t = buffers[i % len(buffers)]
        rows = min(batch, n_rows - done)
        metric.update(x[:rows], t[:rows])
        done, i = done + rows, i + 1
    return metric.compute()


# ---- inputs -------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def classification_buffers(n_rows, classes, dtype, batch, device):
    """Distinct batches (cycled) within the buffer budget; logits ~ N(0, 2^2) plus a bump on
    the target so accuracy and calibration are non-trivial."""
    g = torch.Generator(device=device).manual_seed(0)
    per_batch = batch * classes * dtype.itemsize
    count = max(1, min(math.ceil(n_rows / batch), BUFFER_BYTES[device.type] // max(per_batch, 1)))
    out = []
    for _ in range(count):
        t = torch.randint(0, classes, (batch,), generator=g, device=device)
        x = torch.randn(batch, classes, generator=g, device=device) * 2
        x[torch.arange(batch, device=device), t] += 2.0
        out.append((x.to(dtype), t))
    return out


def regression_buffers(n_rows, batch, device):
    g = torch.Generator(device=device).manual_seed(1)
    count = max(1, min(math.ceil(n_rows / batch), BUFFER_BYTES[device.type] // (8 * batch)))
    out = []
    for _ in range(count):
        t = 10.0 + 3.0 * torch.randn(batch, generator=g, device=device)
        out.append((t + torch.randn(batch, generator=g, device=device), t))
    return out


# ---- reference collections ----------------------------------------------------------
def tm_classification(classes, device):
    metrics = {
        "acc": MulticlassAccuracy(classes, average="micro"),
        "precision": MulticlassPrecision(classes, average="macro"),
        "recall": MulticlassRecall(classes, average="macro"),
        "f1": MulticlassF1Score(classes, average="macro"),
        "ece": MulticlassCalibrationError(classes, n_bins=15, norm="l1"),
    }
    if classes > 5:
        metrics["top5"] = MulticlassAccuracy(classes, top_k=5, average="micro")
    return MetricCollection(metrics).to(device)


class TMRegression:
    """MetricCollection of MSE/MAE/R2 reporting rmse too, with our update/compute protocol."""

    def __init__(self, device):
        self.coll = MetricCollection(
            {"mse": MeanSquaredError(), "mae": MeanAbsoluteError(), "r2": R2Score()}
        ).to(device)

    def reset(self):
        self.coll.reset()

    def update(self, p, t):
        self.coll.update(p, t)

    def compute(self):
        out = {k: float(v) for k, v in self.coll.compute().items()}
        out["rmse"] = math.sqrt(out["mse"])
        return out


def max_rel_diff(ours, ref, keys):
    return max(abs(ours[k] - float(ref[k])) / max(abs(float(ref[k])), 1e-12) for k in keys)


def check(ours, ref, tolerances):
    """Assert per-key relative agreement; returns the max relative difference."""
    for key, tol in tolerances.items():
        a, b = ours[key], float(ref[key])
        assert abs(a - b) <= tol * max(abs(b), 1e-12), f"{key}: ours {a} vs torchmetrics {b}"
    return max_rel_diff(ours, ref, tolerances)


def classification_tolerances(dtype_name):
    # counts-based metrics: only fp32 rounding of torchmetrics' result. ECE: torchmetrics sums
    # confidences in fp32 (~1e-6..1e-5 over 1e5+ rows). 16-bit logits: torchmetrics rounds its
    # softmax to 16 bits and 16-bit logits have exact ties, where torch.topk's pick differs.
    tol = {"acc": 1e-6, "precision": 1e-6, "recall": 1e-6, "f1": 1e-6, "top5": 1e-5, "ece": 1e-4}
    if dtype_name != "fp32":
        tol.update(top5=1e-2, ece=5e-2)
    return tol


# ---- cases --------------------------------------------------------------------------
def run_classification(args, device, n_rows, classes, dtype_name, rows_out):
    dtype = DTYPES[dtype_name]
    batch = args.batch or default_batch(device, n_rows, classes, dtype)
    buffers = classification_buffers(n_rows, classes, dtype, batch, device)
    ours = ClassificationMetrics(classes, backend=args.backend).to(device)
    ours_values, ours_ms = timed(lambda: stream(ours, buffers, n_rows, batch), device, args.repeats)
    gbs = (n_rows * classes * dtype.itemsize + n_rows * 8) / ours_ms / 1e6
    name = f"cls N={n_rows:,} C={classes} {dtype_name} batch={batch:,}"
    if n_rows * classes > args.tm_max_elements:
        rows_out.append((name, ours_ms, None, None, gbs, None))
        return
    tm = tm_classification(classes, device)
    tm_values, tm_ms = timed(lambda: stream(tm, buffers, n_rows, batch), device, args.repeats)
    tols = {k: v for k, v in classification_tolerances(dtype_name).items() if k in tm_values}
    diff = check(ours_values, tm_values, tols)
    rows_out.append((name, ours_ms, tm_ms, tm_ms / ours_ms, gbs, diff))


def run_regression(args, device, n_rows, rows_out):
    batch = args.batch or (50_000 if device.type == "cpu" else min(n_rows, 1 << 24))
    buffers = regression_buffers(n_rows, batch, device)
    ours = RegressionMetrics(backend=args.backend).to(device)
    ours_values, ours_ms = timed(lambda: stream(ours, buffers, n_rows, batch), device, args.repeats)
    tm = TMRegression(device)
    tm_values, tm_ms = timed(lambda: stream(tm, buffers, n_rows, batch), device, args.repeats)
    diff = check(ours_values, tm_values, {"mse": 1e-5, "rmse": 1e-5, "mae": 1e-5, "r2": 1e-5})
    gbs = n_rows * 8 / ours_ms / 1e6
    rows_out.append(
        (f"reg N={n_rows:,} fp32 batch={batch:,}", ours_ms, tm_ms, tm_ms / ours_ms, gbs, diff)
    )


def default_batch(device, n_rows, classes, dtype):
    if device.type == "cpu":
        return min(n_rows, 50_000)
    fit = BUFFER_BYTES["cuda"] // (classes * dtype.itemsize)
    return min(n_rows, max(65_536, fit))


def table(title, rows, device):
    head = "| case | ours ms | torchmetrics ms | ratio (tm/ours) | ours GB/s |"
    rule = "|---|---|---|---|---|"
    if device.type == "cuda":
        head += " % of 4.8 TB/s | % of 4.3 TB/s |"
        rule += "---|---|"
    head += " max rel diff |"
    rule += "---|"
    lines = [f"### {title}", "", head, rule]
    for name, ours_ms, tm_ms, ratio, gbs, diff in rows:
        cells = [name, f"{ours_ms:.1f}", "skipped" if tm_ms is None else f"{tm_ms:.1f}"]
        cells += ["-" if ratio is None else f"{ratio:.1f}x", f"{gbs:.1f}"]
        if device.type == "cuda":
            cells += [f"{100 * gbs / (peak * 1e3):.1f}%" for peak in PEAKS_TBS]
        cells.append("-" if diff is None else f"{diff:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    gpu = device.type == "cuda"
    ns = args.n or ([1_000_000, 8_000_000] if gpu else [500_000])
    classes = args.classes or ([10, 1000, 32000] if gpu else [10, 100, 1000])
    dtypes = args.dtypes or (["fp32", "bf16"] if gpu else ["fp32"])
    cls_rows, reg_rows = [], []
    header = f"device: {torch.cuda.get_device_name() if gpu else 'cpu'}, torch {torch.__version__}, threads {args.threads}"

    def report() -> str:
        tables = [table("classification (acc, precision, recall, f1, top5, ece)", cls_rows, device)]
        if reg_rows:
            tables.append(table("regression (mse, rmse, mae, r2)", reg_rows, device))
        return header + "\n\n" + "\n\n".join(tables) + "\n"

    for n_rows in ns:
        for c in classes:
            for dt in dtypes:
                run_classification(args, device, n_rows, c, dt, cls_rows)
                print(
                    table(
                        "classification (acc, precision, recall, f1, top5, ece)",
                        cls_rows[-1:],
                        device,
                    ),
                    flush=True,
                )
                if args.out:  # after every row: a run stopped by a time limit keeps its rows
                    args.out.write_text(report())
        if not args.skip_regression:
            run_regression(args, device, n_rows, reg_rows)
    print("\n" + report())
    if args.out:
        args.out.write_text(report())


if __name__ == "__main__":
    main()
