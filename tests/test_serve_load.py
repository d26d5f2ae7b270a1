"""The serving load benchmark runs end to end: both servers start, answer under load, stop."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_short_load_run_prints_the_table_and_both_servers_answer_without_5xx(tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "serve_load.py"),
            "--seconds=1",
            "--warmup=0.5",
            "--concurrency=1,8",
            "--servers=ours,naive",
            "--order=servers",
            f"--json={out}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "server  concurrency" in done.stdout
    assert "goal " in done.stdout
    results = json.loads(out.read_text())["results"]
    assert {(r["server"], r["concurrency"]) for r in results} == {
        ("ours", 1),
        ("ours", 8),
        ("naive", 1),
        ("naive", 8),
    }
    for r in results:
        assert "failed" not in r, r
        assert r["ok"] > 0 and r["server_errors"] == 0 and r["overloaded"] == 0, r
