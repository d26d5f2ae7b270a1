import os

import pytest
import torch

# Keep the CPU test suite small and deterministic on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None):
    """Run ``python -m engine.train ARGS`` as a user would; return the CompletedProcess."""
    import os

    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "engine.train", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


def make_unwritable(folder: Path) -> bool:
    """Make ``folder`` refuse new files; False where this machine does not allow it."""
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits; the immutable attribute binds root too
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    probe = folder / ".probe"
    try:
        probe.write_text("x")
    except OSError:
        return True
    probe.unlink()
    return False


def make_writable(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


# The real SLURM cluster (tests/slurm.py): its `slurm_cluster` fixture for every test module, and
# the summary line that says when the SLURM tests were skipped, and why.
from slurm import pytest_terminal_summary, slurm_cluster  # noqa: E402,F401
