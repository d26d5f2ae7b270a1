"""A closed-loop HTTP load generator for ``benchmarks/serve_load.py``, run in its own process
so it never shares the server's event loop (or, pinned, its core).

    python benchmarks/loadgen.py --url http://127.0.0.1:8080/predict --bodies bodies.json \
        --concurrency 64 --seconds 10 [--warmup 2] [--timeout 5]

C clients, each with its own keep-alive connection (an aiohttp session with a one-connection
pool), each sending its next request as soon as its last one is answered. The clients run for
``--warmup`` seconds unmeasured (connections opened, server caches warm), then for
``--seconds`` measured: a request belongs to the measurement when it was sent inside that
window, and each client waits for its last one (at most ``--timeout``) before stopping, so a
slow answer is measured, not cut off; a timeout that ends inside the window counts even when
its request was sent in the warm-up (at 512 clients on a slow server that is most of them). A request that takes longer than ``--timeout`` is
counted as a timeout and never retried. Only 127.0.0.1 (or localhost) URLs are accepted.

``--bodies`` is a JSON list of request bodies (strings); client k starts at body k and steps
by C, so concurrent requests carry different rows. The result is one JSON object on stdout:
counts by outcome, latency percentiles over every answered request (any HTTP status), the
2xx per second, and the client's own CPU use (near 1.0 means the client, not the server, may
be the limit).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

import aiohttp

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ERROR_PAUSE_S = 0.05  # after a refused connection: no hot loop against a server that died


@dataclass
class Tally:
    """What the measured requests got; latencies in seconds, one per answered request."""

    latencies: list[float] = field(default_factory=list)
    ok: int = 0  # 2xx
    overloaded: int = 0  # 503
    client_errors: int = 0  # other 4xx
    server_errors: int = 0  # other 5xx
    timeouts: int = 0
    connection_errors: int = 0
    last_answer: float = 0.0


@dataclass
class Result:
    concurrency: int
    seconds: float  # from the window's start to the last measured answer
    rps: float  # 2xx per second
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    ok: int
    overloaded: int
    client_errors: int
    server_errors: int
    timeouts: int
    connection_errors: int
    client_cpu: float  # the load generator's CPU seconds per wall second in the window


def percentile(sorted_values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in [0, 100]) of an ascending list."""
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100)
    return sorted_values[int(rank) - 1]


async def one_client(
    url: str,
    bodies: list[bytes],
    first: int,
    step: int,
    window: tuple[float, float],
    timeout: float,
    tally: Tally,
) -> None:
    start, end = window
    connector = aiohttp.TCPConnector(limit=1)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        index = first
        while (sent := time.perf_counter()) < end:
            body = bodies[index % len(bodies)]
            index += step
            status = None
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    status = response.status
                outcome = "answered"
            except TimeoutError:
                outcome = "timeout"
            except (aiohttp.ClientError, OSError):
                outcome = "error"
            done = time.perf_counter()
            # Answers count when their request was sent inside the window (the warm-up's are
            # the connections' start); a timeout counts whenever it ends inside the window, so
            # a server that never answers the warm-up's requests is not measured as "no load".
            if sent >= start or (outcome == "timeout" and done >= start):
                _count(tally, outcome, status, done - sent, done)
            if outcome == "error":
                await asyncio.sleep(ERROR_PAUSE_S)


def _count(tally: Tally, outcome: str, status: int | None, latency: float, done: float) -> None:
    if outcome == "timeout":
        tally.timeouts += 1
        return
    if outcome == "error":
        tally.connection_errors += 1
        return
    tally.latencies.append(latency)
    tally.last_answer = max(tally.last_answer, done)
    if 200 <= status < 300:
        tally.ok += 1
    elif status == 503:
        tally.overloaded += 1
    elif status >= 500:
        tally.server_errors += 1
    else:
        tally.client_errors += 1


async def drive(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, warmup: float, timeout: float
) -> Result:
    tally = Tally()
    now = time.perf_counter()
    window = (now + warmup, now + warmup + seconds)
    clients = [
        one_client(url, bodies, k, concurrency, window, timeout, tally) for k in range(concurrency)
    ]

    async def cpu_at(moment: float) -> float:
        await asyncio.sleep(max(0.0, moment - time.perf_counter()))
        return time.process_time()

    cpu_start, cpu_end, *_ = await asyncio.gather(cpu_at(window[0]), cpu_at(window[1]), *clients)
    lat = sorted(tally.latencies)
    elapsed = max(tally.last_answer, window[1]) - window[0]
    ms = (lambda v: round(v * 1000, 3)) if lat else (lambda v: None)
    return Result(
        concurrency=concurrency,
        seconds=round(elapsed, 3),
        rps=round(tally.ok / elapsed, 1),
        p50_ms=ms(percentile(lat, 50)) if lat else None,
        p99_ms=ms(percentile(lat, 99)) if lat else None,
        max_ms=ms(lat[-1]) if lat else None,
        ok=tally.ok,
        overloaded=tally.overloaded,
        client_errors=tally.client_errors,
        server_errors=tally.server_errors,
        timeouts=tally.timeouts,
        connection_errors=tally.connection_errors,
        client_cpu=round((cpu_end - cpu_start) / seconds, 3),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="closed-loop HTTP load on a loopback URL")
    parser.add_argument("--url", required=True)
    parser.add_argument("--bodies", required=True, help="a JSON file: a list of request bodies")
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    host = urlsplit(args.url).hostname
    if host not in LOOPBACK:
        print(
            f"error: --url {args.url}: only loopback (127.0.0.1) URLs are driven.", file=sys.stderr
        )
        sys.exit(2)
    if args.concurrency < 1 or args.seconds <= 0 or args.warmup < 0 or args.timeout <= 0:
        print(
            "error: --concurrency >= 1, --seconds > 0, --warmup >= 0, --timeout > 0.",
            file=sys.stderr,
        )
        sys.exit(2)
    with open(args.bodies) as f:
        bodies = [b.encode() for b in json.load(f)]
    # One process of C sockets: lift the soft open-files limit towards the hard one if needed.
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < args.concurrency + 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.concurrency + 1024), hard))
    except (ImportError, ValueError, OSError):
        pass
    job = drive(args.url, bodies, args.concurrency, args.seconds, args.warmup, args.timeout)
    try:  # the faster event loop where it is installed (uvicorn[standard] brings it)
        import uvloop
    except ImportError:
        uvloop = None
    result = uvloop.run(job) if uvloop is not None else asyncio.run(job)
    print(json.dumps(asdict(result)), flush=True)


if __name__ == "__main__":
    main()
