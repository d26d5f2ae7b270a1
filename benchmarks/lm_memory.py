"""Peak memory of the language-model job with and without the fused loss, side by side.

Runs the real CLI twice in fresh processes (so neither inherits the other's allocator state):

    python -m engine.train data=text model=transformer trainer.max_epochs=1 trainer.device=cpu
    ... the same with loss.fused=false

and reads each process's peak resident set size from the kernel (``os.wait4``), plus its wall
time and validation loss (from metrics.json; the two should agree, as the fused loss computes the
same function). Also measures a process that only imports the engine, to show the part of the
peak that training adds.

    python benchmarks/lm_memory.py                       # the defaults of conf/data/text.yaml
    python benchmarks/lm_memory.py data.vocab_size=32768 data.batch_size=64
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE = [
    "data=text",
    "model=transformer",
    "trainer.max_epochs=1",
    "trainer.device=cpu",
    "trainer.progress=none",
]


def measure(args: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MiB, wall seconds, exit status) of one fresh process."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        sys.stderr.write(proc.stderr.read().decode()[-2000:])
    return usage.ru_maxrss / 1024, wall, status


def main() -> None:
    extra = sys.argv[1:]
    rows = []
    imports_only, _, _ = measure(
        [sys.executable, "-c", "import engine.train, kernels, engine.metrics"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name, switch in (("fused", []), ("unfused", ["loss.fused=false"])):
            run_dir = Path(tmp) / name
            cmd = [
                sys.executable,
                "-m",
                "engine.train",
                *BASE,
                *extra,
                *switch,
                f"hydra.run.dir={run_dir}",
            ]
            peak, wall, status = measure(cmd)
            if status != 0:
                raise SystemExit(f"{name} run failed: {' '.join(cmd)}")
            val_loss = json.loads((run_dir / "metrics.json").read_text())["val/loss"]
            rows.append((name, peak, peak - imports_only, wall, val_loss))
    print(f"command: python -m engine.train {' '.join(BASE + extra)} [loss.fused=false]")
    print(f"import-only process peak: {imports_only:.0f} MiB\n")
    print("| loss | peak RSS MiB | above imports MiB | wall s | val/loss |")
    print("| --- | --- | --- | --- | --- |")
    for name, peak, above, wall, val_loss in rows:
        print(f"| {name} | {peak:.0f} | {above:.0f} | {wall:.1f} | {val_loss:.4f} |")
    fused, unfused = rows
    print(f"\npeak ratio fused/unfused: {fused[1] / unfused[1]:.3f}")
    print(f"training memory ratio (above imports) fused/unfused: {fused[2] / unfused[2]:.3f}")


if __name__ == "__main__":
    main()
