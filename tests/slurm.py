"""A real SLURM cluster for the tests: the ``slurm_cluster`` fixture and small helpers.

The cluster is the one-node cluster of ``scripts/slurm_local.sh start`` (CI starts it in
``.ci/run``); the fixture only checks that it answers, and skips the test with the reason when it
does not. With ``ENGINE_SLURM_AUTOSTART=1`` it starts the cluster itself instead.

Which cluster: ``$SLURM_CONF`` when set, else ``$ENGINE_SLURM_DIR/slurm.conf`` (default
``/tmp/engine-slurm/slurm.conf``). Never an unrelated ``/etc/slurm/slurm.conf``: the tests submit,
signal, cancel and requeue jobs, which is no business on a real cluster. The fixture puts the path
into ``os.environ["SLURM_CONF"]`` for the session, so every subprocess (``sbatch`` from submitit,
``python -m engine.train`` with a SLURM launcher, the jobs themselves) finds the same cluster.

Use::

    from slurm import sbatch, sacct_state, wait_for

    def test_x(slurm_cluster, tmp_path):          # slurm_cluster: the slurm.conf path
        job = sbatch("--wrap", "true", "-o", str(tmp_path / "out"))
        wait_for(lambda: sacct_state(job) == "COMPLETED", 30, what=f"job {job} to complete")
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"
SKIP_PREFIX = "no SLURM cluster"

T = TypeVar("T")


def _conf_path() -> Path:
    if os.environ.get("SLURM_CONF"):
        return Path(os.environ["SLURM_CONF"])
    return Path(os.environ.get("ENGINE_SLURM_DIR", "/tmp/engine-slurm")) / "slurm.conf"


def run(*args: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    """Run one SLURM command (``sbatch``, ``squeue``, ...) against the test cluster."""
    env = dict(os.environ, SLURM_CONF=str(_conf_path()))
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited with {proc.returncode}: {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc


def _problem() -> str | None:
    """Why the cluster cannot run the tests, or None when it can."""
    conf = _conf_path()
    if not conf.is_file():
        return f"{conf} does not exist"
    # A stopped cluster of scripts/slurm_local.sh, said at once (sinfo would retry for 10 s).
    if (conf.parent / ".engine-slurm").exists() and not (
        conf.parent / "run" / "slurmctld.pid"
    ).exists():
        return f"the cluster in {conf.parent} is stopped"
    try:
        info = run("sinfo", "-h", "-N", "-o", "%N %T", timeout=15, check=False)
        if info.returncode != 0:
            return f"sinfo failed: {info.stderr.strip()}"
        # idle or mixed; allocated too: a healthy node whose CPUs another test is using.
        states = [
            line.split()[-1].rstrip("*~#") for line in info.stdout.splitlines() if line.strip()
        ]
        if not any(state in {"idle", "mixed", "allocated", "completing"} for state in states):
            return f"no usable node (sinfo: {', '.join(states) or 'no nodes'})"
        acct = run(
            "sacct", "-n", "-X", "-o", "JobID", "-S", "now-1minutes", timeout=15, check=False
        )
        if acct.returncode != 0:
            return f"sacct failed (accounting is off): {acct.stderr.strip()}"
    except FileNotFoundError as err:
        return f"{err.filename} is not installed"
    except subprocess.TimeoutExpired as err:
        return f"{err.cmd[0]} did not answer within {err.timeout:.0f} s"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Path]:
    """The running test cluster's slurm.conf; skips the test when there is none."""
    problem = _problem()
    if problem and os.environ.get("ENGINE_SLURM_AUTOSTART") == "1":
        started = subprocess.run(
            ["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300
        )
        if started.returncode == 0:
            problem = _problem()
        else:
            problem = f"scripts/slurm_local.sh start failed: {started.stderr.strip()[:500]}"
    if problem:
        pytest.skip(f"{SKIP_PREFIX}: {problem}; start one with scripts/slurm_local.sh start")
    conf = _conf_path()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(conf))
        yield conf


def sbatch(*args: str) -> str:
    """Submit a batch job (``sbatch ARGS``); return its job id."""
    out = run("sbatch", "--parsable", *args).stdout.strip()
    return out.split(";")[0]  # "<id>;<cluster>" on multi-cluster set-ups


def squeue_jobs() -> list[tuple[str, str, str]]:
    """The jobs in the queue, as (job id, state, name), e.g. ("12", "RUNNING", "train")."""
    out = run("squeue", "-h", "-o", "%i|%T|%j").stdout
    return [tuple(line.split("|", 2)) for line in out.splitlines() if line.strip()]


def sacct_fields(job_id: str, *fields: str) -> dict[str, str]:
    """Accounting fields of a job's allocation (not its steps); {} until sacct knows the job."""
    out = run("sacct", "-n", "-P", "-X", "-j", str(job_id), "-o", ",".join(fields)).stdout
    lines = [line for line in out.splitlines() if line.strip()]
    # A requeued job has one line per run; the last one is the current run.
    return dict(zip(fields, lines[-1].split("|"))) if lines else {}


def sacct_state(job_id: str) -> str:
    """The job's state in accounting: "PENDING", "RUNNING", "COMPLETED", "CANCELLED", ...; "" if
    not recorded yet. "CANCELLED by 0" comes back as "CANCELLED". Accounting hears of a change a
    moment after slurmctld: for "is it running now", ask squeue_jobs()."""
    state = sacct_fields(job_id, "State").get("State", "")
    return state.split()[0] if state else ""


def scancel(job_id: str, signal: str | None = None, *, batch: bool = False) -> None:
    """Cancel a job, or with ``signal`` (e.g. "USR2") only signal it: by default its steps (what
    ``srun`` started); with ``batch=True`` the batch shell (and its children) instead."""
    args = ["scancel"]
    if signal:
        args.append(f"--signal={signal}")
    if batch:
        args.append("--batch")
    run(*args, str(job_id))


def wait_for(
    predicate: Callable[[], T], timeout: float, *, what: str = "", interval: float = 0.2
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that; fail the test with
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


def pytest_terminal_summary(terminalreporter):
    """One line at the end of the run that says the SLURM tests did not run, and why (also listed
    one by one by -ra)."""
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = {}
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if reason.startswith(SKIP_PREFIX):
            reasons[reason] = reasons.get(reason, 0) + 1
    for reason, count in reasons.items():
        terminalreporter.write_line(f"SLURM: {count} test(s) skipped: {reason}", yellow=True)
