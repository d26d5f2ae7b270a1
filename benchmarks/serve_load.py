"""``python -m engine.serve`` against a naive FastAPI endpoint, under closed-loop load.

    python benchmarks/serve_load.py [--run <digits run dir>] [--seconds 10] \
        [--concurrency 1,8,64,512] [--device cpu|cuda] [--json out.json]

Both servers serve the same digits MLP run (a tiny one, ``trainer.max_epochs=1``, is trained
into a temporary folder when ``--run`` is not given) on 127.0.0.1:

- ours: ``python -m engine.serve model=<run> serve.port=<p> serve.threads=<t>`` with its
  defaults otherwise (dynamic batching, bounded queue, metrics, prediction log into a temp dir);
- naive: ``benchmarks/naive_serve.py``, one ``Predictor.predict`` call on a pandas frame per
  request (see its docstring), the peer the goals compare with;
- naive-array: the same endpoint with ``--input array`` (a NumPy array into the model, no
  pandas), a leaner peer measured beside them.

For each concurrency level, one server at a time is started, driven by
``benchmarks/loadgen.py`` in its own process (C keep-alive connections, each client sending its
next request when its last is answered; a warm-up, then ``--seconds`` measured; a request over
``--timeout`` is a timeout, never retried), then stopped with SIGTERM; ours and naive alternate
level by level (``--order interleaved``), so a slow minute of the machine hits both alike.
Each request carries one real row of the run's test split, varied from request to request.

CPU placement: the server and the load generator would compete for this machine's cores, so
the server is pinned to ``--server-cpus`` (default core 0) and the client to ``--client-cpus``
(default core 1), the same for both servers; torch runs ``--threads`` (default 1) threads in
both. The run prints one table, the ratios at each level and the goals of issue #14, met or
missed with their numbers. It exits 0 whatever the numbers (it is a measurement); it exits 2
on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tqdm import tqdm

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SERVERS = ("ours", "naive", "naive-array")
PEERS = ("naive", "naive-array")  # what ours is compared with; the goals are against "naive"
READY_PATH = "/v2/health/ready"
READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0
BODIES = 512  # distinct request bodies, drawn from the test split (repeated when it is smaller)

# Issue #14's goals, on 2 CPU cores.
GOAL_LEVEL = 64
GOAL_RPS_RATIO = 2.0
GOAL_P99_MS = 25.0
OVERLOAD_LEVEL = 512


class UsageError(Exception):
    pass


@dataclass
class Setup:
    run: Path
    device: str
    threads: int
    server_cpus: set[int] | None
    client_cpus: set[int] | None
    seconds: float
    warmup: float
    timeout: float
    bodies: Path
    work: Path
    ours_args: list[str]


# --------------------------------------------------------------------------------------------
# Inputs: the run and the request bodies


def train_tiny_run(folder: Path) -> Path:
    run = folder / "digits_run"
    command = [
        sys.executable,
        "-m",
        "engine.train",
        "data=digits",
        "model=mlp",
        "trainer.progress=none",
        "trainer.num_threads=1",
        "trainer.device=cpu",
        "data.batch_size=128",
        "trainer.max_epochs=1",
        f"hydra.run.dir={run}",
    ]
    print(f"training a tiny digits run into {run} ...", file=sys.stderr)
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise UsageError(f"training the digits run failed:\n{done.stderr[-2000:]}")
    return run


def write_bodies(run: Path, path: Path) -> int:
    """One ``{"rows": [row]}`` body per test row of the run's own split (raw values, as the
    training CSV had them); returns how many distinct rows there are."""
    from engine.data import split_table
    from engine.predictor import run_config, run_info

    info = run_info(run)
    if info.task != "classification":
        raise UsageError(f"--run {run}: a classification run (digits) is needed, not {info.task}.")
    table = split_table(run_config(run).data)
    names = table.info.feature_names or [f"x{i}" for i in range(table.x.shape[1])]
    rows = table.x[table.test]
    bodies = []
    for i in range(BODIES):
        row = rows[i % len(rows)]
        bodies.append(json.dumps({"rows": [dict(zip(names, row.tolist()))]}))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(bodies))
    tmp.replace(path)
    return len(rows)


# --------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(which: str, setup: Setup, port: int) -> list[str]:
    if which == "ours":
        return [
            sys.executable,
            "-m",
            "engine.serve",
            f"model={setup.run}",
            f"device={setup.device}",
            f"serve.port={port}",
            f"serve.threads={setup.threads}",
            f"serve.log_dir={setup.work / 'serve_logs'}",
            *setup.ours_args,
        ]
    return [
        sys.executable,
        str(HERE / "naive_serve.py"),
        f"--run={setup.run}",
        f"--device={setup.device}",
        f"--port={port}",
        f"--threads={setup.threads}",
        f"--input={'array' if which == 'naive-array' else 'frame'}",
    ]


def pinned(cpus: set[int] | None):
    """A ``preexec_fn`` placing the child on ``cpus`` before it starts any thread."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def wait_ready(process: subprocess.Popen, port: int, log: Path) -> None:
    url = f"http://127.0.0.1:{port}{READY_PATH}"
    end = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"exited with code {process.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"not ready after {READY_TIMEOUT_S:.0f} s:\n{tail(log)}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------
# One measurement: a server up, one load level, the server down


def measure(which: str, concurrency: int, setup: Setup) -> dict:
    port = free_port()
    log = setup.work / f"{which}_c{concurrency}.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            server_command(which, setup, port),
            cwd=setup.work,  # anything a server writes by default lands in the temp dir
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=pinned(setup.server_cpus),
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    try:
        wait_ready(process, port, log)
        client = subprocess.run(
            [
                sys.executable,
                str(HERE / "loadgen.py"),
                f"--url=http://127.0.0.1:{port}/predict",
                f"--bodies={setup.bodies}",
                f"--concurrency={concurrency}",
                f"--seconds={setup.seconds}",
                f"--warmup={setup.warmup}",
                f"--timeout={setup.timeout}",
            ],
            capture_output=True,
            text=True,
            preexec_fn=pinned(setup.client_cpus),
            timeout=setup.warmup + setup.seconds + 4 * setup.timeout + 60,
        )
        if client.returncode != 0:
            raise RuntimeError(f"the load generator failed:\n{client.stderr[-2000:]}")
        result = json.loads(client.stdout.strip().splitlines()[-1])
        if process.poll() is not None:
            result["note"] = f"the server exited during the load (code {process.returncode})"
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        result = {"concurrency": concurrency, "failed": str(err)}
    finally:
        stop(process)
    result["server"] = which
    return result


# --------------------------------------------------------------------------------------------
# Report


COLUMNS = (
    ("server", "server", "{}"),
    ("concurrency", "concurrency", "{}"),
    ("rps", "rps", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("max_ms", "max ms", "{:.1f}"),
    ("ok", "2xx", "{}"),
    ("overloaded", "503", "{}"),
    ("server_errors", "5xx", "{}"),
    ("client_errors", "4xx", "{}"),
    ("timeouts", "timeouts", "{}"),
    ("connection_errors", "errors", "{}"),
    ("client_cpu", "client cpu", "{:.2f}"),
)


def table(results: list[dict]) -> str:
    rows = [[title for _, title, _ in COLUMNS]]
    for r in results:
        if "failed" in r:
            rows.append([r["server"], str(r["concurrency"]), "FAILED"] + [""] * (len(COLUMNS) - 3))
            continue
        rows.append(
            ["-" if r.get(key) is None else form.format(r[key]) for key, _, form in COLUMNS]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def by_level(results: list[dict]) -> dict[int, dict[str, dict]]:
    levels: dict[int, dict[str, dict]] = {}
    for r in results:
        levels.setdefault(r["concurrency"], {})[r["server"]] = r
    return levels


def ratios(results: list[dict]) -> list[str]:
    lines = []
    for level, pair in sorted(by_level(results).items()):
        ours = pair.get("ours", {})
        for peer in PEERS:
            if peer not in pair:
                continue
            other = pair[peer]
            if "rps" not in ours or "rps" not in other:
                lines.append(f"c={level}: ours vs {peer}: not comparable (a server failed)")
                continue
            rps = f"{ours['rps'] / other['rps']:.2f}x" if other["rps"] else "n/a (0 rps)"
            p99 = (
                f"{ours['p99_ms'] / other['p99_ms']:.2f}x"
                if ours.get("p99_ms") and other.get("p99_ms")
                else "n/a"
            )
            lines.append(f"c={level}: rps ours/{peer} {rps}, p99 ours/{peer} {p99}")
    return lines


def goals(results: list[dict]) -> list[tuple[str, bool | None, str]]:
    """(goal, met, the numbers) for each of issue #14's goals; met is None when not measured."""
    levels = by_level(results)
    out = []
    pair = levels.get(GOAL_LEVEL, {})
    ours, naive = pair.get("ours", {}), pair.get("naive", {})
    name = f"c={GOAL_LEVEL}: rps >= {GOAL_RPS_RATIO:g}x naive and p99 <= {GOAL_P99_MS:g} ms"
    if "rps" in ours and "rps" in naive and ours.get("p99_ms") is not None:
        ratio = ours["rps"] / naive["rps"] if naive["rps"] else float("inf")
        met = ratio >= GOAL_RPS_RATIO and ours["p99_ms"] <= GOAL_P99_MS
        out.append(
            (
                name,
                met,
                f"{ours['rps']:.0f} vs {naive['rps']:.0f} rps = {ratio:.2f}x, "
                f"p99 {ours['p99_ms']:.2f} ms",
            )
        )
    else:
        out.append((name, None, f"not measured (pass --concurrency with {GOAL_LEVEL})"))
    ours = levels.get(OVERLOAD_LEVEL, {}).get("ours", {})
    name = f"c={OVERLOAD_LEVEL}: no timeouts or connection errors (503s allowed)"
    if "ok" in ours:
        met = ours["timeouts"] == 0 and ours["connection_errors"] == 0
        out.append(
            (
                name,
                met,
                f"{ours['timeouts']} timeouts, {ours['connection_errors']} errors, "
                f"{ours['overloaded']} 503s, max {ours['max_ms']} ms",
            )
        )
    else:
        out.append((name, None, f"not measured (pass --concurrency with {OVERLOAD_LEVEL})"))
    below = [
        pair["ours"]
        for level, pair in sorted(levels.items())
        if level < OVERLOAD_LEVEL and "ok" in pair.get("ours", {})
    ]
    name = f"zero 5xx below overload (c < {OVERLOAD_LEVEL}), 503 included"
    if below:
        fives = {r["concurrency"]: r["overloaded"] + r["server_errors"] for r in below}
        met = not any(fives.values())
        out.append((name, met, ", ".join(f"c={c}: {n}" for c, n in fives.items())))
    else:
        out.append((name, None, "not measured"))
    return out


def describe(cpus: set[int] | None) -> str:
    return "unpinned" if not cpus else "core " + ",".join(str(c) for c in sorted(cpus))


# --------------------------------------------------------------------------------------------
# Command line


def cpu_set(text: str) -> set[int] | None:
    if text.lower() in ("none", ""):
        return None
    try:
        return {int(part) for part in text.split(",")}
    except ValueError:
        raise UsageError(f"CPU list {text!r}: use core numbers like 0 or 0,1, or none.") from None


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise UsageError(f"--concurrency {text!r}: use positive integers, e.g. 1,8,64,512.")
    return levels


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="engine.serve against a naive FastAPI endpoint, under load (loopback)"
    )
    parser.add_argument("--run", type=Path, help="a digits run dir (default: train a tiny one)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--timeout", type=float, default=5.0, help="per-request timeout, s")
    parser.add_argument("--concurrency", default="1,8,64,512")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both servers")
    parser.add_argument("--server-cpus", default="0", help="cores for the server, or none")
    parser.add_argument("--client-cpus", default="1", help="cores for the load generator")
    parser.add_argument(
        "--servers",
        default="ours,naive,naive-array",
        help="which to run, of ours, naive (Predictor.predict on a pandas frame: the goals' "
        "peer) and naive-array (naive_serve.py --input array)",
    )
    parser.add_argument(
        "--order",
        default="interleaved",
        choices=("interleaved", "servers"),
        help="interleaved: each server in turn at each level; servers: one server's levels "
        "after the other's",
    )
    parser.add_argument(
        "--ours-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra engine.serve argument, e.g. serve.max_wait_ms=1 (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    args = parser.parse_args(argv)
    args.levels = parse_levels(args.concurrency)
    args.server_cpu_set = cpu_set(args.server_cpus)
    args.client_cpu_set = cpu_set(args.client_cpus)
    have = os.sched_getaffinity(0)
    for option, cpus in (
        ("--server-cpus", args.server_cpu_set),
        ("--client-cpus", args.client_cpu_set),
    ):
        if cpus and not cpus <= have:
            raise UsageError(f"{option} {sorted(cpus)}: this machine offers cores {sorted(have)}.")
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.server_list or set(args.server_list) - set(SERVERS):
        raise UsageError(f"--servers {args.servers!r}: pick from {', '.join(SERVERS)}.")
    if args.seconds <= 0 or args.warmup < 0 or args.timeout <= 0 or args.threads < 0:
        raise UsageError("--seconds and --timeout must be > 0, --warmup and --threads >= 0.")
    if args.run is not None and not (args.run / ".hydra" / "config.yaml").is_file():
        raise UsageError(f"--run {args.run}: not a run dir (no .hydra/config.yaml in it).")
    return args


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.order == "servers":
        return [(s, c) for s in args.server_list for c in args.levels]
    return [(s, c) for c in args.levels for s in args.server_list]


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        work = Path(tmp)
        try:
            run = args.run.resolve() if args.run else train_tiny_run(work)
            bodies = work / "bodies.json"
            distinct = write_bodies(run, bodies)
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        setup = Setup(
            run=run,
            device=args.device,
            threads=args.threads,
            server_cpus=args.server_cpu_set,
            client_cpus=args.client_cpu_set,
            seconds=args.seconds,
            warmup=args.warmup,
            timeout=args.timeout,
            bodies=bodies,
            work=work,
            ours_args=args.ours_arg,
        )
        placement = (
            f"CPU placement: server {describe(setup.server_cpus)}, load generator "
            f"{describe(setup.client_cpus)} (the same for both servers); torch threads "
            f"{setup.threads or 'default'} in both; device {setup.device}"
        )
        print(placement, file=sys.stderr)
        results = []
        steps = plan(args)
        for which, level in tqdm(steps, desc="levels", file=sys.stderr, unit="level"):
            results.append(measure(which, level, setup))
    header = [
        f"serve_load: digits MLP ({run}), {distinct} test rows, one row per request",
        f"{args.seconds:g} s measured per level after {args.warmup:g} s warm-up, "
        f"timeout {args.timeout:g} s, order {args.order}; ours: engine.serve "
        f"{' '.join(args.ours_arg) or 'defaults'}; naive: benchmarks/naive_serve.py "
        "(--input frame; naive-array: --input array)",
        placement,
        f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
    ]
    print("\n".join(header))
    print()
    print(table(results))
    for r in results:
        if "failed" in r or "note" in r:
            print(f"\n{r['server']} at c={r['concurrency']}: {r.get('failed') or r['note']}")
    print()
    for line in ratios(results):
        print(line)
    print()
    checked = goals(results)
    for name, met, numbers in checked:
        verdict = "not measured" if met is None else ("MET" if met else "MISSED")
        print(f"goal {verdict}: {name}: {numbers}")
    if args.json:
        record = {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(
                [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]
            ),
            "header": header,
            "results": results,
            "goals": [{"goal": n, "met": m, "numbers": v} for n, m, v in checked],
        }
        tmp_json = args.json.with_name(args.json.name + ".tmp")
        tmp_json.write_text(json.dumps(record, indent=2))
        tmp_json.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
