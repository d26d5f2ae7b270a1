"""Prediction latency and throughput of a loaded model on its device, per batch size."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.predictor import Predictor


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU's model name from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def _batch(x: torch.Tensor, size: int) -> torch.Tensor:
    # A batch larger than the rows at hand repeats them: the model's cost depends on the
    # shape, not on which rows fill it.
    reps = -(-size // len(x))
    return x.repeat(reps, *([1] * (x.dim() - 1)))[:size].to(x.device)


def measure(
    predictor: Predictor, x: torch.Tensor, batch_sizes: list[int], warmup: int, iters: int
) -> dict[str, Any]:
    """Per batch size: warm-up calls, then ``iters`` timed ones (synchronised on CUDA):
    p50 / p90 / p99 milliseconds per batch and rows per second at the median."""
    device = predictor.device
    cuda = device.type == "cuda"
    rows = []
    for size in batch_sizes:
        batch = _batch(x, size).to(device)
        with torch.inference_mode():
            for _ in range(warmup):
                predictor.model(batch)
            if cuda:
                torch.cuda.synchronize(device)
            times = []
            for _ in range(iters):
                start = time.perf_counter()
                predictor.model(batch)
                if cuda:
                    torch.cuda.synchronize(device)
                times.append((time.perf_counter() - start) * 1e3)
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        rows.append(
            {
                "batch_size": size,
                "p50_ms": float(p50),
                "p90_ms": float(p90),
                "p99_ms": float(p99),
                "rows_per_s": float(size / (p50 / 1e3)),
            }
        )
    return {
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "precision": "fp32",
        "warmup": warmup,
        "iters": iters,
        "batches": rows,
    }
