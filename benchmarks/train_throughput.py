"""Training throughput: the engine's loop against a raw PyTorch loop and Lightning, one process.

All three train the same model (engine.models, same config and seed), with the same loss
(engine.losses.Objective: our Triton kernels on CUDA), the same fused AdamW and the same
autocast, on the same on-device data, in alternating rounds so drift in the machine hits all
alike:

- raw: index-sliced batches from a randperm on the device, forward, backward, step; no NaN guard,
  no logging, no checkpoints, no metrics. What a careful user writes by hand.
- engine: ``Trainer.fit`` exactly as ``python -m engine.train`` runs it: TensorBoard, the NaN
  guard, per-epoch evaluation with every metric, atomic checkpoints. Its "steps" time is the
  training pass alone (the trainer's own ``throughput/samples_per_s``); "epoch" adds the
  evaluation and the checkpoint.
- lightning: a ``LightningModule`` around the same model and objective, ``Trainer(logger=False,
  enable_checkpointing=False)``, its "steps" time from the train-epoch hooks (when lightning is
  importable; it is in the GPU image, not a dependency of ours).

The first epoch of each round is a warm-up (Triton's JIT, cuDNN's autotuning) and is left out;
every figure is a median over the remaining epochs. Items are samples (digits rows) or tokens
(text). "raw/engine" is the raw loop's rate over the engine's, which is the engine's time over
the raw loop's: the goal is at most 1.05. ``--count-syncs`` (CUDA) also runs one engine epoch under
``torch.cuda.set_sync_debug_mode("warn")`` and reports the synchronising calls per step between
its second and its last step (the log interval is set past the epoch; the goal is 0).

    python benchmarks/train_throughput.py --device cuda --count-syncs --out tables.md
    python benchmarks/train_throughput.py --device cpu --quick      # the rehearsal
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import register_configs  # noqa: E402
from engine.train import build_job  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf"

WORKLOADS = {
    "digits": ["data=digits", "model=mlp"],
    "text": ["data=text", "model=transformer"],
}
# Larger text sizes on a GPU: a model a sweep would train, not the CPU default's toy.
GPU_SIZES = {"text": ["model.hidden=512", "model.depth=4", "model.heads=8", "data.seq_len=256"]}
QUICK_SIZES = {"text": ["data.max_tokens=40000"]}
# The raw loop's recipe: a constant lr and no clipping (the engine's guard stays on).
MATCHED = ["sched=none", "trainer.grad_clip=0", "trainer.resume=never", "trainer.progress=none"]


def compose_config(workload: str, device: str, epochs: int, quick: bool, extra: list[str]):
    sizes = (QUICK_SIZES if quick else GPU_SIZES if device == "cuda" else {}).get(workload, [])
    overrides = [*WORKLOADS[workload], *sizes, *MATCHED, *extra]
    overrides += [f"trainer.device={device}", f"trainer.max_epochs={epochs}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def items_per_sample(job) -> int:
    x = job.trainer.train_loader.split.x
    return int(x.shape[1]) if job.cfg.data.name == "text" else 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_epochs(cfg) -> tuple[list[float], list[float], int, int]:
    """(train-pass seconds, whole-epoch seconds) per epoch, samples per epoch, items/sample."""
    steps, whole, marks = [], [], [0.0]

    def on_epoch_end(epoch, metrics, final=False):
        now = time.perf_counter()
        whole.append(now - marks[0])
        marks[0] = now
        steps.append(samples[0] / metrics["throughput/samples_per_s"])

    with tempfile.TemporaryDirectory() as tmp:
        job = build_job(cfg, Path(tmp), epoch_callback=on_epoch_end, hparams_session=False)
        samples = [len(job.trainer.train_loader.split)]
        per = items_per_sample(job)
        marks[0] = time.perf_counter()
        job.trainer.fit()
        job.logger.close()
    return steps, whole, samples[0], per


def built_trainer(cfg):
    """The trainer ``build_job`` gives the engine's run: the very model, objective, optimizer and
    on-device data, for the other loops to use without the engine's."""
    with tempfile.TemporaryDirectory() as tmp:
        job = build_job(cfg.copy(), Path(tmp), hparams_session=False)
        job.logger.close()
    return job.trainer


def raw_epochs(cfg) -> list[float]:
    """The same model, loss and optimizer in a bare loop."""
    t = built_trainer(cfg)
    model, objective, optimizer, device = t.model, t.objective, t.optimizer, t.device
    x, y, bs = t.train_loader.split.x, t.train_loader.split.y, cfg.data.batch_size
    autocast = t._autocast
    times = []
    for _ in range(cfg.trainer.max_epochs):
        synchronize(device)
        start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), device=x.device)
        for i in range(0, len(x), bs):
            idx = order[i : i + bs]
            with autocast():
                loss = objective(model, x.index_select(0, idx), y.index_select(0, idx))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def lightning_epochs(cfg) -> list[float] | None:
    try:
        import lightning as L
    except ImportError:
        return None
    t = built_trainer(cfg)
    x, y, bs = t.train_loader.split.x, t.train_loader.split.y, cfg.data.batch_size
    times: list[float] = []

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = t.raw_model

        def training_step(self, batch, _):
            return t.objective(self.net, *batch)

        def configure_optimizers(self):
            return t.optimizer

        def on_train_epoch_start(self):
            synchronize(t.device)
            self._start = time.perf_counter()

        def on_train_epoch_end(self):
            synchronize(t.device)
            times.append(time.perf_counter() - self._start)

    class Batches(torch.utils.data.IterableDataset):  # on-device batches, as the others use
        def __iter__(self):
            order = torch.randperm(len(x), device=x.device)
            for i in range(0, len(x), bs):
                idx = order[i : i + bs]
                yield x.index_select(0, idx), y.index_select(0, idx)

    precision = {"bf16": "bf16-mixed", "fp16": "16-mixed"}.get(t.precision, "32-true")
    trainer = L.Trainer(
        accelerator="gpu" if t.device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=cfg.trainer.max_epochs,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None)
    trainer.fit(Module(), loader)
    return times


def count_syncs(cfg) -> tuple[int, int]:
    """(synchronising calls, steps watched) over one engine epoch, from its second step to the
    end of its last (the log interval is past the epoch, so no step is a log step)."""
    with tempfile.TemporaryDirectory() as tmp:
        job = build_job(cfg.copy(), Path(tmp), hparams_session=False)
        trainer = job.trainer
        total = len(trainer.train_loader)
        step, seen = trainer.optimizer_step, [0]

        def watched(*args):
            seen[0] += 1
            torch.cuda.set_sync_debug_mode("warn" if seen[0] > 1 else "default")
            step(*args)
            if seen[0] == total:
                torch.cuda.set_sync_debug_mode("default")

        trainer.optimizer_step = watched
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                trainer.train_epoch(0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        job.logger.close()
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    for w in syncs[:5]:
        print(f"  sync: {w.message} ({w.filename}:{w.lineno})", file=sys.stderr)
    return len(syncs), max(total - 1, 0)


def median_rate(items: int, seconds: list[float]) -> float:
    return items / statistics.median(seconds) if seconds else float("nan")


def measure(workload: str, args) -> dict:
    cfg = compose_config(workload, args.device, args.epochs, args.quick, args.override)
    runs: dict[str, list[float]] = {"raw": [], "steps": [], "epoch": [], "lightning": []}
    samples = per = 0
    for r in range(args.rounds):
        print(f"{workload}: round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        runs["raw"] += raw_epochs(cfg)[1:]
        steps, whole, samples, per = engine_epochs(cfg)
        runs["steps"] += steps[1:]
        runs["epoch"] += whole[1:]
        if not args.no_lightning:
            lit = lightning_epochs(cfg)
            runs["lightning"] += (lit or [])[1:]
    items = samples * per
    row = {k: median_rate(items, v) for k, v in runs.items()}
    row |= {"workload": workload, "items": "tokens" if per > 1 else "samples", "per_epoch": items}
    if args.count_syncs and args.device == "cuda":
        cfg_sync = compose_config(
            workload,
            args.device,
            1,
            args.quick,
            [*args.override, "trainer.log_every_n_steps=100000"],
        )
        row["syncs"], row["watched"] = count_syncs(cfg_sync)
    return row


def table(rows: list[dict], args) -> str:
    head = (
        f"Device: {device_name(args.device)}; torch {torch.__version__}; "
        f"{args.epochs} epochs x {args.rounds} rounds, first epoch of each round left out.\n\n"
        "| workload | items/epoch | raw /s | engine steps /s | engine epoch /s | lightning /s "
        "| raw/engine (steps) | raw/engine (epoch) | lightning/engine | syncs per step |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for r in rows:
        syncs = f"{r['syncs']} in {r['watched']} steps" if "syncs" in r else "not counted"
        lit = r["lightning"]
        cells = [
            f"{r['per_epoch']} {r['items']}",
            *(_number(r[k]) for k in ("raw", "steps", "epoch")),
            _number(lit, "not installed"),
            f"{r['raw'] / r['steps']:.3f}",
            f"{r['raw'] / r['epoch']:.3f}",
            _number(lit / r["steps"], "-", ".3f"),
            syncs,
        ]
        lines.append(f"| {r['workload']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def _number(value: float, missing: str = "-", spec: str = ".4g") -> str:
    return missing if math.isnan(value) else format(value, spec)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return "CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small text data: the CPU rehearsal")
    p.add_argument("--count-syncs", action="store_true", help="CUDA: count syncs per step")
    p.add_argument("--no-lightning", action="store_true")
    p.add_argument("--override", nargs="*", default=[], help="more config overrides for all")
    p.add_argument("--out", type=Path, help="also write the table (markdown) here")
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    register_configs()
    rows = []
    for workload in args.workloads:
        rows.append(measure(workload, args))
        text = table(rows, args)
        if args.out:  # after every workload: a later failure keeps what was measured
            args.out.write_text(text)
    print(text)
    for r in rows:
        print(f"ratio raw/engine {r['workload']}: {r['raw'] / r['steps']:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()
