"""What the engine's training loop costs over a bare PyTorch loop, per epoch.

Both sides train the same model (built by engine.models from the same config and seed) on the
same in-memory data, in one process, alternating rounds so drift in the machine hits both alike:

- raw: index-sliced batches from a randperm, AdamW, a val accuracy pass per epoch, nothing logged.
- engine: ``Trainer.fit`` exactly as ``python -m engine.train`` runs it, with its default
  TensorBoard logging, per-epoch metrics (acc, precision, recall, f1, top5, ece, val loss),
  NaN guard and atomic checkpoints (last.pt every epoch, best.pt on improvement) all on. The
  recipe is matched to the raw loop: constant lr (sched=none) and no gradient clipping.

An epoch's time runs from the end of the previous epoch to the end of this one's checkpoint, so it
includes everything the engine does between batches. The first epoch of each round is a warm-up
and is left out; the ratio is median(engine epoch) / median(raw epoch).

    python benchmarks/trainer_overhead.py                 # both workloads, 2 threads
    python benchmarks/trainer_overhead.py --workload digits --rounds 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from engine.config import register_configs
from engine.data import build_dataset
from engine.models import build_model
from engine.train import build_job, seed_everything

CONF = Path(__file__).resolve().parents[1] / "conf"

WORKLOADS = {
    "digits": ["data=digits", "model=mlp"],
    "synthetic50k": [
        "data=synthetic",
        "data.n_samples=50000",
        "data.n_features=64",
        "data.n_classes=10",
        "model=mlp",
    ],
}
# Same recipe as the raw loop; logging, metrics and checkpointing stay at their defaults.
MATCHED_RECIPE = ["sched=none", "trainer.grad_clip=0", "trainer.device=cpu", "trainer.resume=never"]


def compose_config(workload: str, epochs: int):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = WORKLOADS[workload] + MATCHED_RECIPE + [f"trainer.max_epochs={epochs}"]
        return compose(config_name="train", overrides=overrides)


def raw_epochs(cfg, epochs: int) -> list[float]:
    """A plain PyTorch loop: what a careful user writes by hand."""
    seed_everything(cfg.trainer.seed)
    data = build_dataset(cfg.data)
    model = build_model(cfg.model, data.info)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    x, y = data.train.x, data.train.y
    vx, vy = data.val.x, data.val.y
    bs = cfg.data.batch_size
    times = []
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(vx[i : i + 1024]).argmax(1) == vy[i : i + 1024]).sum())
                for i in range(0, len(vx), 1024)
            )
        _ = correct / len(vx)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def engine_epochs(cfg, epochs: int) -> list[float]:
    times: list[float] = []
    marks = [0.0]

    def on_epoch_end(epoch: int, metrics: dict[str, float], final: bool = False) -> None:
        now = time.perf_counter()
        times.append(now - marks[0])
        marks[0] = now

    with tempfile.TemporaryDirectory() as tmp:
        job = build_job(cfg, Path(tmp), epoch_callback=on_epoch_end)
        job.trainer.progress = "none"
        marks[0] = time.perf_counter()
        job.trainer.fit()
        job.logger.close()
        assert (Path(tmp) / "checkpoints" / "last.pt").exists()
        assert any((Path(tmp) / "tb").iterdir())
    return times


def measure(workload: str, epochs: int, rounds: int) -> dict[str, list[float]]:
    cfg = compose_config(workload, epochs)
    results: dict[str, list[float]] = {"raw": [], "engine": []}
    for _ in range(rounds):
        results["raw"] += raw_epochs(cfg, epochs)[1:]
        results["engine"] += engine_epochs(cfg, epochs)[1:]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument(
        "--epochs", type=int, default=0, help="epochs per round (default: per workload)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.disable(logging.INFO)
    register_configs()
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    default_epochs = {"digits": 12, "synthetic50k": 4}
    summary = []
    for name in names:
        epochs = args.epochs or default_epochs[name]
        times = measure(name, epochs, args.rounds)
        raw_ms = [1000 * t for t in times["raw"]]
        eng_ms = [1000 * t for t in times["engine"]]
        print(
            f"\n## {name}: {epochs} epochs x {args.rounds} rounds, {args.threads} threads (first epoch of each round left out)"
        )
        print(f"raw    epoch ms: {' '.join(f'{t:.1f}' for t in raw_ms)}")
        print(f"engine epoch ms: {' '.join(f'{t:.1f}' for t in eng_ms)}")
        ratio = statistics.median(eng_ms) / statistics.median(raw_ms)
        summary.append((name, statistics.median(raw_ms), statistics.median(eng_ms), ratio))
    print("\n| workload | raw ms/epoch (median) | engine ms/epoch (median) | engine/raw |")
    print("| --- | --- | --- | --- |")
    for name, raw, eng, ratio in summary:
        print(f"| {name} | {raw:.1f} | {eng:.1f} | {ratio:.3f} |")
    for name, _, _, ratio in summary:
        print(f"ratio engine/raw {name}: {ratio:.3f}")


if __name__ == "__main__":
    main()
