"""Speed, memory and accuracy of kernels.cross_entropy / kernels.linear_cross_entropy.

    python benchmarks/kernels_loss.py                  # full grid on CUDA, small sizes on CPU
    python benchmarks/kernels_loss.py --quick --out outputs/loss_tables.md

Cases (one setup function per kind, shared by the speed, memory and error measurements)
    CE      logits [N, V] + target [N]. CUDA: N in {8192, 16384}, V in {32000, 32768, 128256,
            131072, 262144}, bf16 and fp32. CPU: N=2048, V in {8192, 32000}, fp32.
    linear  x [N, H], W [V, H], target [N]. CUDA: N=8192, H in {2048, 4096},
            V in {128256, 262144}, bf16. CPU: N=1024, H=256, V=32000, fp32.
Modes: "forward" (inputs need no grad) and "forward+backward" (``loss.backward()`` included).

Providers: ours (kernels.*, Triton on CUDA, the torch fallback on CPU), torch eager,
torch.compile (CUDA by default, ``--compile`` on CPU: Inductor's CPU build is slow) and
Liger-Kernel when importable (CUDA). The linear table adds "bare matmuls": x @ W^T, plus
dlogits @ W and dlogits^T @ x for forward+backward, the floor any fused head pays.

Columns
    ms         median of --reps runs after --warmup runs (the first runs pay Triton's JIT and
               torch.compile; they are never timed). CUDA events on GPU, perf_counter on CPU.
    GB/s       CE only, byte model: logits read once (forward), or read twice + gradient
               written once (forward+backward); % of 4.8 TB/s (H200 peak) and of 4.3 TB/s
               (a realistic ceiling) on CUDA.
    extra MiB  peak memory above what was allocated before the step (inputs): CUDA via
               torch.cuda.max_memory_allocated; CPU via the peak of the process RSS sampled
               every 0.5 ms by a thread (Linux only, approximate: allocator caching and short
               spikes can hide a little).
    err        max |loss - ref| and max |grad - ref| against float64, with reduction="sum", on
               the first --err-rows rows (fresh inputs, so in-place providers are fine);
               not measured for torch.compile (a new shape would recompile).
The summary lines give the acceptance ratios: ours vs torch.compile and Liger (speed), % of
4.3 TB/s, linear peak memory vs eager (target <= 1/8) and time vs bare matmuls (<= 1.3x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kernels import cross_entropy, linear_cross_entropy  # noqa: E402

PEAK_TBS, REAL_TBS = 4.8, 4.3
MODES = ("forward", "forward+backward")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    kind: str  # "ce" | "linear"
    n: int
    v: int
    h: int = 0
    dtype: str = "fp32"


@dataclass
class Result:
    ms: float = float("nan")
    extra_mib: float = float("nan")
    err_loss: float = float("nan")
    err_grad: float = float("nan")
    note: str = ""


# --------------------------------------------------------------------------- case grids


def cases_for(device: str, quick: bool, dtypes, vocabs=None, linear_vocabs=None) -> list[Case]:
    if device == "cuda":
        ns, vs = (
            ((8192,), (32000, 128256, 262144))
            if quick
            else ((8192, 16384), (32000, 32768, 128256, 131072, 262144))
        )
        hs, lvs = ((4096,), (128256,)) if quick else ((2048, 4096), (128256, 262144))
        vs, lvs = tuple(vocabs or vs), tuple(linear_vocabs or lvs)
        ce_dtypes = dtypes or (("bf16",) if quick else ("bf16", "fp32"))
        lin_dtypes = dtypes or ("bf16",)
        ce = [Case("ce", n, v, 0, d) for d in ce_dtypes for n in ns for v in vs]
        return ce + [Case("linear", 8192, v, h, d) for d in lin_dtypes for h in hs for v in lvs]
    cpu_dtypes = dtypes or ("fp32",)
    ce = [
        Case("ce", 2048, v, 0, d) for d in cpu_dtypes for v in ((8192,) if quick else (8192, 32000))
    ]
    return ce + [Case("linear", 1024, 32000, 256, d) for d in cpu_dtypes]


# --------------------------------------------------------------------------- setup and providers


def setup(
    case: Case, device: str, requires_grad: bool, rows: int | None = None, seed: int = 0
) -> dict:
    """The inputs of one case (optionally only the first `rows` rows), shared by all measurements."""
    n = case.n if rows is None else min(rows, case.n)
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    target = torch.randint(0, case.v, (n,), device=device, generator=g)
    if case.kind == "ce":
        logits = (torch.randn(n, case.v, device=device, generator=g) * 2).to(dtype)
        return {"logits": logits.requires_grad_(requires_grad), "target": target}
    x = torch.randn(n, case.h, device=device, generator=g).to(dtype)
    w = (torch.randn(case.v, case.h, device=device, generator=g) * case.h**-0.5).to(dtype)
    return {
        "x": x.requires_grad_(requires_grad),
        "w": w.requires_grad_(requires_grad),
        "target": target,
    }


def _liger_classes():
    try:
        from liger_kernel.transformers import (
            LigerCrossEntropyLoss,
            LigerFusedLinearCrossEntropyLoss,
        )
    except Exception:  # optional dependency; any import problem just drops the provider
        return None
    return LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss


def _eager_ce(logits, target, reduction="mean"):
    return F.cross_entropy(logits, target, reduction=reduction)


def _eager_linear(x, w, target, reduction="mean"):
    return F.cross_entropy(x @ w.t(), target, reduction=reduction)


_COMPILED: dict = {}


def _compiled(kind: str):
    if kind not in _COMPILED:
        fn = _eager_ce if kind == "ce" else _eager_linear
        _COMPILED[kind] = torch.compile(fn, dynamic=False)
    return _COMPILED[kind]


def loss_fn(provider: str, kind: str):
    """provider -> callable(inputs, reduction) returning the loss."""
    if provider == "ours" and kind == "ce":
        return lambda i, r="mean": cross_entropy(i["logits"], i["target"], reduction=r)
    if provider == "ours":
        return lambda i, r="mean": linear_cross_entropy(i["x"], i["w"], i["target"], reduction=r)
    if provider == "eager" and kind == "ce":
        return lambda i, r="mean": _eager_ce(i["logits"], i["target"], r)
    if provider == "eager":
        return lambda i, r="mean": _eager_linear(i["x"], i["w"], i["target"], r)
    if provider == "compile" and kind == "ce":
        return lambda i, r="mean": _compiled("ce")(i["logits"], i["target"], r)
    if provider == "compile":
        return lambda i, r="mean": _compiled("linear")(i["x"], i["w"], i["target"], r)
    if provider == "liger":
        ce_cls, lin_cls = _liger_classes()
        if kind == "ce":
            return lambda i, r="mean": ce_cls(reduction=r)(i["logits"], i["target"])
        return lambda i, r="mean": lin_cls(reduction=r)(i["w"], i["x"], i["target"])
    raise ValueError(f"unknown provider {provider!r}")


def make_step(provider: str, case: Case, inputs: dict, mode: str):
    """One timed iteration: forward, or forward + backward with the grads reset first."""
    if provider == "bare":
        return _bare_matmul_step(inputs, mode)
    fn = loss_fn(provider, case.kind)
    if mode == "forward":
        return lambda: fn(inputs)

    def step():
        clear_grads(inputs)
        fn(inputs).backward()

    return step


def clear_grads(inputs: dict) -> None:
    for t in inputs.values():
        t.grad = None


def _bare_matmul_step(inputs: dict, mode: str):
    x, w = inputs["x"].detach(), inputs["w"].detach()
    if mode == "forward":
        return lambda: x @ w.t()
    dlogits = torch.randn(x.shape[0], w.shape[0], device=x.device).to(x.dtype)

    def step():
        x @ w.t()
        dlogits @ w
        dlogits.t() @ x

    return step


# --------------------------------------------------------------------------- measurements


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(step, device: str, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class RssPeak:
    """Peak RSS above the level at entry, sampled by a thread (Linux /proc only)."""

    def __init__(self, interval_s: float = 5e-4):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval_s)

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def extra(self) -> int:
        return self.peak - self.base


def extra_memory_mib(step, inputs: dict, device: str) -> float:
    """Peak memory of one step above what is allocated before it (the inputs, no grads)."""
    clear_grads(inputs)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not os.path.exists("/proc/self/statm"):
        return float("nan")
    with RssPeak() as rss:
        step()
    return rss.extra / 2**20


def reference(case: Case, inputs: dict):
    """Float64 sum-reduced loss and input gradients of the same rows."""
    leaves = {
        k: v.detach().double().requires_grad_(v.requires_grad)
        for k, v in inputs.items()
        if k != "target"
    }
    fn = _eager_ce if case.kind == "ce" else _eager_linear
    loss = fn(*leaves.values(), inputs["target"], "sum")
    if any(t.requires_grad for t in leaves.values()):
        loss.backward()
    return loss.detach(), {k: t.grad for k, t in leaves.items()}


def max_errors(provider: str, case: Case, mode: str, device: str, rows: int) -> tuple[float, float]:
    inputs = setup(case, device, mode != "forward", rows=rows, seed=1)
    ref_loss, ref_grads = reference(case, inputs)
    leaves = {k: v for k, v in inputs.items() if k != "target"}
    fresh = {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in leaves.items()}
    fresh["target"] = inputs["target"]
    loss = loss_fn(provider, case.kind)(fresh, "sum")
    err_grad = float("nan")
    if mode != "forward":
        loss.backward()
        err_grad = max(
            float((fresh[k].grad.double() - g).abs().max()) for k, g in ref_grads.items()
        )
    return float((loss.double() - ref_loss).abs()), err_grad


def measure(provider: str, case: Case, mode: str, device: str, args) -> Result:
    res = Result()
    try:
        inputs = setup(case, device, mode != "forward")
        step = make_step(provider, case, inputs, mode)
        res.ms = time_ms(step, device, args.warmup, args.reps)
        if provider != "bare":
            res.extra_mib = extra_memory_mib(step, inputs, device)
        del inputs, step
        if provider not in ("bare", "compile"):
            res.err_loss, res.err_grad = max_errors(provider, case, mode, device, args.err_rows)
    except Exception as exc:  # one failing provider (OOM, missing op) must not end the run
        res.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return res


# --------------------------------------------------------------------------- tables


def _fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x != x else format(x, spec)  # NaN -> "-"


def ce_bytes(case: Case, mode: str) -> int:
    elt = DTYPES[case.dtype].itemsize
    return case.n * case.v * elt * (1 if mode == "forward" else 3)


def ce_table(rows, mode: str, device: str) -> str:
    head = "| N | V | provider | ms | GB/s |"
    head += " % 4.8 TB/s | % 4.3 TB/s |" if device == "cuda" else ""
    head += " extra MiB | err loss | err grad | note |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for case, provider, r in rows:
        gbs = ce_bytes(case, mode) / (r.ms * 1e6)
        cells = [str(case.n), str(case.v), provider, _fmt(r.ms), _fmt(gbs, ".0f")]
        if device == "cuda":
            cells += [
                _fmt(100 * gbs / (PEAK_TBS * 1e3), ".1f"),
                _fmt(100 * gbs / (REAL_TBS * 1e3), ".1f"),
            ]
        cells += [
            _fmt(r.extra_mib, ".0f"),
            _fmt(r.err_loss, ".2e"),
            _fmt(r.err_grad, ".2e"),
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def linear_table(rows) -> str:
    head = "| N | H | V | provider | ms | x bare matmuls | extra MiB | mem / eager | err loss | err grad | note |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    by_case = {}
    for case, provider, r in rows:
        by_case.setdefault(case, {})[provider] = r
    for case, provider, r in rows:
        bare, eager = by_case[case].get("bare"), by_case[case].get("eager")
        ratio = r.ms / bare.ms if bare else float("nan")
        mem = r.extra_mib / eager.extra_mib if eager and provider != "bare" else float("nan")
        cells = [
            str(case.n),
            str(case.h),
            str(case.v),
            provider,
            _fmt(r.ms),
            _fmt(ratio, ".2f"),
            _fmt(r.extra_mib, ".0f"),
            _fmt(mem, ".3f"),
            _fmt(r.err_loss, ".2e"),
            _fmt(r.err_grad, ".2e"),
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(groups: dict, device: str) -> list[str]:
    """The acceptance ratios, one line per case and mode."""
    out = []
    for (kind, mode, _dtype), rows in groups.items():
        by_case = {}
        for case, provider, r in rows:
            by_case.setdefault(case, {})[provider] = r
        for case, res in by_case.items():
            ours = res.get("ours")
            if ours is None or ours.ms != ours.ms:
                continue
            label = (
                f"{kind} {mode} {case.dtype} N={case.n}"
                + (f" H={case.h}" if case.h else "")
                + f" V={case.v}:"
            )
            parts = [
                f"{p} / ours = {res[p].ms / ours.ms:.2f}x"
                for p in ("eager", "compile", "liger")
                if p in res and res[p].ms == res[p].ms
            ]
            if kind == "ce" and device == "cuda":
                gbs = ce_bytes(case, mode) / (ours.ms * 1e6)
                parts.append(f"ours at {100 * gbs / (REAL_TBS * 1e3):.1f}% of 4.3 TB/s")
            if kind == "linear":
                if "eager" in res and res["eager"].extra_mib == res["eager"].extra_mib:
                    ratio = ours.extra_mib / res["eager"].extra_mib
                    parts.append(
                        f"peak mem ours / eager = {ratio:.3f} (target <= 0.125: {'ok' if ratio <= 0.125 else 'MISSED'})"
                    )
                if "bare" in res:
                    ratio = ours.ms / res["bare"].ms
                    parts.append(
                        f"ours / bare matmuls = {ratio:.2f}x (target <= 1.3: {'ok' if ratio <= 1.3 else 'MISSED'})"
                    )
            out.append(" ".join([label, "; ".join(parts)]))
    return out


# --------------------------------------------------------------------------- main


def providers_for(kind: str, device: str, args) -> list[str]:
    names = ["ours", "eager"]
    if device == "cuda" or args.compile:
        names.append("compile")
    if device == "cuda" and _liger_classes() is not None:
        names.append("liger")
    if kind == "linear":
        names.append("bare")
    if args.providers:
        names = [p for p in names if p in args.providers]
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=[*MODES, "both"], default="both")
    p.add_argument("--kinds", nargs="+", choices=["ce", "linear"], default=["ce", "linear"])
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=None)
    p.add_argument(
        "--providers", nargs="+", default=None, help="subset of ours eager compile liger bare"
    )
    p.add_argument("--quick", action="store_true", help="a small subset of the grid")
    p.add_argument("--vocabs", type=int, nargs="+", help="CUDA: the cross-entropy V values")
    p.add_argument("--linear-vocabs", type=int, nargs="+", help="CUDA: the linear head's V values")
    p.add_argument("--compile", action="store_true", help="also torch.compile on CPU")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--err-rows", type=int, default=None, help="rows for the fp64 error check")
    p.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--out", default=None, help="also write the tables (markdown) here")
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.reps = args.reps if args.reps is not None else (30 if cuda else 5)
    args.err_rows = args.err_rows if args.err_rows is not None else (1024 if cuda else 256)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "cuda":
        for name in ("cache_size_limit", "recompile_limit"):  # one compile per shape
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 512)
    modes = MODES if args.mode == "both" else (args.mode,)
    groups: dict = {}
    for case in cases_for(device, args.quick, args.dtypes, args.vocabs, args.linear_vocabs):
        if case.kind not in args.kinds:
            continue
        for mode in modes:
            for provider in providers_for(case.kind, device, args):
                r = measure(provider, case, mode, device, args)
                groups.setdefault((case.kind, mode, case.dtype), []).append((case, provider, r))
                print(
                    f"  {case} {mode} {provider}: {_fmt(r.ms)} ms {r.note}",
                    file=sys.stderr,
                    flush=True,
                )
            if args.out:  # after every case: a run stopped by a time limit keeps what it measured
                write_report(args.out, report(groups, device))
    text = report(groups, device)
    print(text)
    if args.out:
        write_report(args.out, text)
    return 0


def report(groups: dict, device: str) -> str:
    text = [
        f"# loss kernels on {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'} "
        f"(torch {torch.__version__}, threads {torch.get_num_threads()})",
        "",
    ]
    for (kind, mode, dtype), rows in groups.items():
        text += [
            f"## {'cross entropy' if kind == 'ce' else 'linear + cross entropy'}, {mode}, {dtype}",
            "",
        ]
        text += [ce_table(rows, mode, device) if kind == "ce" else linear_table(rows), ""]
    text += ["## acceptance ratios", ""] + [f"- {line}" for line in summary(groups, device)]
    return "\n".join(text)


def write_report(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
