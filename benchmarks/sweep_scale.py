"""Sweep scale benchmark: the sweep machinery's cost as a study grows, and many workers at once.

``growth``: one ``python -m engine.train -m search=tpe`` command of ``--trials`` (1,000) trials
of a sub-second run (digits + linear, one epoch) on one worker. With one worker the trials run
back to back, so trial *i*'s overhead is the time between the previous trial's end and its own
end that was not spent inside ``engine.train.run``::

    overhead_i = (datetime_complete_i - datetime_complete_{i-1}) - user_attrs["run_seconds"]_i

compared over trials 1-100 and the last 100 (ratio; the bound is 2x). It is split three ways
from the trial's own records: *before the claim* (previous trial's end to this one's start: the
worker loop's reads and the claim), *start to end minus ``seconds``* (``load_study``, building
the trial, recording, the HPARAMS session, ``tell``), and *``seconds`` minus ``run_seconds``*
(the suggest calls, the first of which makes TPE's relative draw; composing the config,
``.hydra/``). The two windows run minutes apart, so fresh sweeps of 100 trials run one after
another beside the long one (``control_K``), and the ratio is also given against them: trials
of a small study that ended in the same minutes, under the same load. Then, timed in this
process on the study the sweep left (100 against 1,000 trials, in turn): TPE's ``study.ask()``
on an in-memory study of the same trials, the journal's replay, the worker loop's storage
reads and claim on copies of the journal cut where the sweep stood, and the sweep command's own
polling and reports (they share the cores with the worker).

``inprocess``: ``engine.search.worker.run_worker`` in this process on copies of that journal,
6 trials from 100 finished and 6 from 900 finished, in turn, 10 times; then the same under cProfile, to
name what grew.

``concurrent``: ``--workers`` (16) processes on one study of ``--trials`` (200) trials, on a
journal file and on PostgreSQL: (a) ``claims``: a harness process each, looping over
``engine.search.storage.claim`` and completing each trial at once with a trivial value, every
claim timed; (b) ``workers``: the real sweep command with ``search.n_workers=16`` (16
``python -m engine.search.worker`` processes started together), claim latency read from the
study as each worker's previous trial end to its next trial start. Both check that every trial
number finished exactly once, none is left running or waiting, and no trial was claimed twice.

    python benchmarks/sweep_scale.py growth                  # 1,000 trials (about 10 minutes)
    python benchmarks/sweep_scale.py growth --trials 150     # quick
    python benchmarks/sweep_scale.py growth --keep DIR       # keep the sweeps in DIR
    python benchmarks/sweep_scale.py growth --reuse DIR      # analyse them again
    python benchmarks/sweep_scale.py inprocess --reuse DIR   # run_worker at 100 vs 900, cProfile
    python benchmarks/sweep_scale.py concurrent --postgres postgresql://u@host/db
    python benchmarks/sweep_scale.py concurrent --storages journal --how claims
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from engine.search import storage as st  # noqa: E402
from engine.search.samplers import make_sampler, trial_seed  # noqa: E402
from engine.search.spec import Spec  # noqa: E402

WORKLOAD = [
    "data=digits",
    "model=linear",
    "trainer.max_epochs=1",
    "trainer.progress=none",
    # One torch thread per trial: on a shared 2-core machine two threads per trial made the
    # runs 10x slower whenever other processes were runnable (OpenMP threads waiting on each
    # other); the sweep machinery's own work is single-threaded Python either way.
    "trainer.num_threads=1",
]
FINISHED_CODES = {TrialState.COMPLETE.value, TrialState.PRUNED.value, TrialState.FAIL.value}


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}" if a > 0 else "n/a"


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --------------------------------------------------------------------------------------------
# growth: the sweep


def storage_override(url: str) -> str:
    """``search.storage`` for a sweep command: a URL with a password goes through the
    environment (``${oc.env:...}``), never onto a command line that ``ps`` shows."""
    from engine.redact import has_secret

    return "${oc.env:" + st.STORAGE_ENV + "}" if has_secret(url) else url


def storage_env(url: str | None) -> dict[str, str]:
    """The environment of a child process: the storage URL in ``$ENGINE_SEARCH_STORAGE``."""
    return dict(os.environ, **({st.STORAGE_ENV: url} if url else {}))


def study_name(sweep_dir: Path) -> str:
    """The study of a sweep dir on a shared storage: unique per benchmark run."""
    return f"{sweep_dir.parent.name}-{sweep_dir.name}"


def sweep_command(sweep_dir: Path, trials: int, storage: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "engine.train", "-m", "search=tpe"]
    cmd += [f"search.n_trials={trials}", "search.n_workers=1", *WORKLOAD]
    if storage:
        cmd += [f"search.storage={storage_override(storage)}"]
        cmd += [f"search.study_name={study_name(sweep_dir)}"]
    return cmd + [f"hydra.sweep.dir={sweep_dir}"]


def start_sweep(
    sweep_dir: Path, trials: int, log_path: Path, storage: str | None = None
) -> subprocess.Popen:
    cmd = sweep_command(sweep_dir, trials, storage)
    with log_path.open("w") as log:
        return subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=storage_env(storage)
        )


def run_sweeps(
    base: Path, trials: int, window: int, control: bool, storage: str | None
) -> tuple[float, list[Path]]:
    """The long sweep, and (``control``) fresh sweeps of ``window`` trials one after another
    beside it while it runs, in the same minutes: the same load on both. Returns the long
    sweep's wall time and the control sweep dirs."""
    print("$ " + " ".join(sweep_command(base / "sweep", trials, storage)[1:]), flush=True)
    t0 = time.perf_counter()
    long = start_sweep(base / "sweep", trials, base / "sweep.log", storage)
    controls: list[Path] = []
    wall = None
    while wall is None:
        if control:
            d = base / f"control_{len(controls)}"
            p = start_sweep(d, window, base / f"control_{len(controls)}.log", storage)
            controls.append(d)
            while p.poll() is None:
                time.sleep(0.2)
                if wall is None and long.poll() is not None:
                    wall = time.perf_counter() - t0
            if p.returncode != 0:
                raise SystemExit(f"control sweep {d} failed (exit {p.returncode})")
            print(f"control sweep {len(controls)} done", flush=True)
        else:
            long.wait()
        if wall is None and long.poll() is not None:
            wall = time.perf_counter() - t0
    if long.returncode != 0:
        raise SystemExit(f"the sweep failed (exit {long.returncode}); see {base / 'sweep.log'}")
    return wall, controls


def load_trials(journal: Path) -> list[optuna.trial.FrozenTrial]:
    storage = st.open_storage(str(journal))
    (summary,) = storage.get_all_studies()
    sid = storage.get_study_id_from_name(summary.study_name)
    return sorted(storage.get_all_trials(sid), key=lambda t: t.number)


def sweep_trials(sweep_dir: Path, storage: str | None) -> list[optuna.trial.FrozenTrial]:
    """A sweep's trials: from its journal, or from its study on ``storage``."""
    if not storage:
        return load_trials(sweep_dir / st.JOURNAL)
    opened = st.open_storage(storage)
    sid = opened.get_study_id_from_name(study_name(sweep_dir))
    return sorted(opened.get_all_trials(sid), key=lambda t: t.number)


def per_trial(trials: list[optuna.trial.FrozenTrial]) -> list[dict[str, float]]:
    """Overhead of each trial after the first, and its three parts (module docstring)."""
    rows = []
    for prev, t in zip(trials, trials[1:]):
        gap = (t.datetime_complete - prev.datetime_complete).total_seconds()
        run = float(t.user_attrs["run_seconds"])
        seconds = float(t.user_attrs["seconds"])
        span = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append(
            {
                "number": t.number,
                "end": t.datetime_complete,
                "gap": gap,
                "run": run,
                "overhead": gap - run,
                "claim": (t.datetime_start - prev.datetime_complete).total_seconds(),
                "study": span - seconds,
                "compose": seconds - run,
            }
        )
    return rows


def window_stats(rows: list[dict[str, float]], key: str) -> tuple[float, float]:
    values = [r[key] for r in rows]
    return statistics.fmean(values), statistics.median(values)


# --------------------------------------------------------------------------------------------
# growth: the pieces, timed on the sweep's own study


def journal_lines(journal: Path) -> list[str]:
    return journal.read_text().splitlines(keepends=True)


def cut_after_finished(lines: list[str], k: int) -> list[str]:
    """The journal as it stood when its k-th trial finished."""
    done = 0
    for i, line in enumerate(lines):
        log = json.loads(line)
        if log["op_code"] == 6 and log.get("state") in FINISHED_CODES:
            done += 1
            if done == k:
                return lines[: i + 1]
    raise ValueError(f"the journal has fewer than {k} finished trials")


def first_trials(lines: list[str], n: int) -> list[str]:
    """The journal of the first n trials alone (a sweep of n trials): the study's entries, the
    first n trial creations and every entry about those trials (one study: trial id = number)."""
    kept, created = [], 0
    for line in lines:
        log = json.loads(line)
        if log["op_code"] == 4:
            created += 1
            if created <= n:
                kept.append(line)
        elif "trial_id" not in log or log["trial_id"] < n:
            kept.append(line)
    return kept


def write_journal(lines: list[str], path: Path) -> Path:
    path.write_text("".join(lines))
    Path(str(path) + ".lock").unlink(missing_ok=True)
    return path


class Timer:
    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    def add(self, key: str, seconds: float) -> None:
        self.samples.setdefault(key, []).append(seconds)

    def median(self, key: str) -> float:
        return statistics.median(self.samples[key])

    def min(self, key: str) -> float:
        return min(self.samples[key])


def time_tpe(
    study: optuna.Study,
    spec: Spec,
    dists: dict,
    number: int | None,
    timer: Timer,
    key: str,
    sampler: optuna.samplers.BaseSampler | None = None,
) -> None:
    """One ``study.ask`` with the sweep's distributions and a fresh sampler, as a worker builds
    one per trial (TPE's relative sampling over the intersection search space + the suggests),
    or with ``sampler``, kept from the previous ask; the asked trial is then told failed (TPE
    leaves failed trials out)."""
    study.sampler = sampler or make_sampler(
        spec.sampler, trial_seed(spec.seed, number or 0), spec.n_trials
    )
    t0 = time.perf_counter()
    trial = study.ask(dists)
    timer.add(key, time.perf_counter() - t0)
    study.tell(trial, state=TrialState.FAIL)


def time_replay(path: Path, timer: Timer, key: str) -> None:
    t0 = time.perf_counter()
    storage = st.open_storage(str(path))
    (summary,) = storage.get_all_studies()
    storage.get_all_trials(storage.get_study_id_from_name(summary.study_name), deepcopy=False)
    timer.add(key, time.perf_counter() - t0)


def time_worker_step(snapshot: Path, tmp: Path, timer: Timer, tag: str) -> None:
    """One pass of ``worker.run_worker``'s loop on a copy of the journal as it stood, up to and
    including what ``run_trial`` does before and after the run (no training): the reads at the
    top of the loop, the claim, ``load_study`` + ``get_trials`` + building the trial (TPE's
    relative draw on the real storage), the suggests, and recording + ``tell``."""
    path = tmp / f"step_{tag}.journal"
    shutil.copyfile(snapshot, path)
    Path(str(path) + ".lock").unlink(missing_ok=True)
    storage = st.open_storage(str(path))
    (summary,) = storage.get_all_studies()
    name = summary.study_name
    sid = storage.get_study_id_from_name(name)
    storage.get_all_trials(sid, deepcopy=False)  # the replay: once per worker, not per trial

    t0 = time.perf_counter()
    spec = st.load_spec(storage, sid)
    t1 = time.perf_counter()
    trials = storage.get_all_trials(sid, deepcopy=False)
    st.budget(trials)
    st.failures_in_a_row(trials, spec.session)
    t2 = time.perf_counter()
    frozen = st.claim(storage, sid)
    t3 = time.perf_counter()
    assert frozen is not None, "no waiting trial in the snapshot"
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(spec.sampler, trial_seed(spec.seed, frozen.number), spec.n_trials),
    )
    trial_id = storage.get_trial_id_from_study_id_trial_number(sid, frozen.number)
    study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    trial = optuna.Trial(study, trial_id)
    trial.set_user_attr("run_dir", "x")
    trial.set_user_attr("worker_index", 0)
    t4 = time.perf_counter()
    for p in spec.params().values():
        p.suggest(trial)
    t5 = time.perf_counter()
    for key in ("metrics", "seconds", "run_seconds", "shown_value"):
        trial.set_user_attr(key, 0.5)
    study.tell(trial, [0.5])
    t6 = time.perf_counter()
    timer.add(f"spec {tag}", t1 - t0)
    timer.add(f"reads {tag}", t2 - t1)
    timer.add(f"claim {tag}", t3 - t2)
    timer.add(f"prelude {tag}", t4 - t3)
    timer.add(f"suggest {tag}", t5 - t4)
    timer.add(f"record {tag}", t6 - t5)
    timer.add(f"step {tag}", t6 - t0)


def time_driver(snapshot: Path, sweep_dir: Path, tmp: Path, timer: Timer, tag: str) -> None:
    """The sweep command's poll (every 0.1 s: read the trials, print new lines, count) and its
    reports (summary.csv, best.yaml, the study TensorBoard run: every 10 s while trials end)."""
    import contextlib
    import io

    from engine.search.driver import Progress
    from engine.search.summary import write_all

    storage = st.open_storage(str(snapshot))
    (summary,) = storage.get_all_studies()
    sid = storage.get_study_id_from_name(summary.study_name)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    spec = st.load_spec(storage, sid)
    spec.sweep_dir = str(sweep_dir)
    progress = Progress(study, spec, sweep_dir)
    with contextlib.redirect_stdout(io.StringIO()):
        progress.update(storage.get_all_trials(sid, deepcopy=False))  # every line, once
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        trials = storage.get_all_trials(sid, deepcopy=False)
        progress.update(trials)
        st.budget(trials)
    t1 = time.perf_counter()
    out = tmp / f"report_{tag}"
    out.mkdir(exist_ok=True)
    # Written elsewhere; the best trial's config is read from its folder (its run_dir attr).
    write_all(study, spec, out)
    t2 = time.perf_counter()
    timer.add(f"poll {tag}", t1 - t0)
    timer.add(f"report {tag}", t2 - t1)


def postgres_copies(url: str, snapshots: dict[str, Path]) -> dict[str, tuple[Any, int, str]]:
    """The journal snapshots copied into PostgreSQL studies (the RDB storage a cluster uses)."""
    rdb = st.open_storage(url)
    copies = {}
    for tag, path in snapshots.items():
        source = st.open_storage(str(path))
        (summary,) = source.get_all_studies()
        name = f"scale_{tag}_{os.getpid()}_{time.time_ns() % 10**9}"
        t0 = time.perf_counter()
        optuna.copy_study(
            from_study_name=summary.study_name,
            from_storage=source,
            to_storage=rdb,
            to_study_name=name,
        )
        print(f"copied the {tag} snapshot into PostgreSQL in {time.perf_counter() - t0:.0f} s")
        copies[tag] = (rdb, rdb.get_study_id_from_name(name), name)
    return copies


def pieces(
    journal: Path, sweep_dir: Path, n_small: int, reps: int, postgres: str | None = None
) -> tuple[Timer, int, int]:
    trials = load_trials(journal)
    n = len(trials)
    n_large = n - 1  # the claim needs a trial still waiting
    storage = st.open_storage(str(journal))
    (summary,) = storage.get_all_studies()
    spec = st.load_spec(storage, storage.get_study_id_from_name(summary.study_name))
    lines = journal_lines(journal)
    timer = Timer()
    with tempfile.TemporaryDirectory(prefix="sweep_scale_") as tmp_name:
        tmp = Path(tmp_name)
        snap = {
            "small": write_journal(cut_after_finished(lines, n_small), tmp / "small.journal"),
            "large": write_journal(cut_after_finished(lines, n_large), tmp / "large.journal"),
        }
        whole = {
            "small": write_journal(first_trials(lines, n_small), tmp / "first.journal"),
            "large": write_journal(lines, tmp / "all.journal"),
        }
        finished = [t for t in trials if t.state == TrialState.COMPLETE]
        dists = finished[-1].distributions
        mem = {}
        for tag, k in (("small", n_small), ("large", n)):
            mem[tag] = optuna.create_study(
                storage=optuna.storages.InMemoryStorage(), directions=spec.directions
            )
            mem[tag].add_trials(copy.deepcopy(finished[:k]))
        kept = {}
        for tag in mem:  # one sampler kept across asks: its intersection space is incremental
            kept[tag] = make_sampler(spec.sampler, spec.seed, spec.n_trials)
            mem[tag].sampler = kept[tag]
            mem[tag].tell(mem[tag].ask(dists), state=TrialState.FAIL)
        pg = postgres_copies(postgres, snap) if postgres else {}
        for rep in range(reps):
            order = ("small", "large") if rep % 2 == 0 else ("large", "small")
            for tag in order:
                if pg:
                    rdb, sid, _ = pg[tag]
                    t0 = time.perf_counter()
                    rdb.get_all_trials(sid, deepcopy=False)
                    t1 = time.perf_counter()
                    rdb.get_all_trials(sid, deepcopy=False, states=(TrialState.WAITING,))
                    timer.add(f"pg_all {tag}", t1 - t0)
                    timer.add(f"pg_waiting {tag}", time.perf_counter() - t1)
                time_tpe(mem[tag], spec, dists, n + rep, timer, f"tpe {tag}")
                time_tpe(mem[tag], spec, dists, None, timer, f"tpe_kept {tag}", kept[tag])
                t0 = time.perf_counter()
                optuna.search_space.IntersectionSearchSpace(include_pruned=True).calculate(mem[tag])
                timer.add(f"intersection {tag}", time.perf_counter() - t0)
                time_replay(whole[tag], timer, f"replay {tag}")
                time_worker_step(snap[tag], tmp, timer, tag)
                time_driver(snap[tag], sweep_dir, tmp, timer, tag)
        for rdb, _, name in pg.values():
            optuna.delete_study(study_name=name, storage=rdb)
    return timer, n_small, n_large


# --------------------------------------------------------------------------------------------
# growth: the command


def control_rows(
    controls: list[Path], since: dt.datetime, until: dt.datetime, storage: str | None
) -> list[dict]:
    """The control sweeps' trials (after each one's first) that ended in [since, until]."""
    rows = []
    for d in controls:
        done = [t for t in sweep_trials(d, storage) if t.datetime_complete is not None]
        rows += [r for r in per_trial(done) if since <= r["end"] <= until]
    return rows


def growth(args: argparse.Namespace) -> str:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = dt.datetime.now(dt.timezone.utc)
    wall, w = None, args.window
    if args.reuse:
        base = Path(args.reuse).resolve()
        controls = sorted(base.glob("control_*[0-9]"), key=lambda p: int(p.name.split("_")[1]))
    else:
        base = Path(args.keep).resolve() if args.keep else Path(tempfile.mkdtemp(prefix="scale_"))
        base.mkdir(parents=True, exist_ok=True)
        if (base / "sweep").exists():
            raise SystemExit(f"{base / 'sweep'} exists; pass --reuse {base} to analyse it")
        wall, controls = run_sweeps(base, args.trials, w, not args.no_control, args.storage)
    sweep_dir = base / "sweep"
    journal = sweep_dir / st.JOURNAL
    trials = sweep_trials(sweep_dir, args.storage)
    states = Counter(t.state.name for t in trials)
    slots, partial = len(trials), ""
    if states != Counter({"COMPLETE": len(trials)}):
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if not args.reuse or [t.number for t in done] != list(range(len(done))):
            raise SystemExit(f"not every trial completed: {dict(states)}")
        partial = f" (stopped after {len(done)} of its {len(trials)} trials)"
        trials = done
    n = len(trials)
    if len({t.user_attrs["worker"]["pid"] for t in trials}) != 1:
        raise SystemExit("more than one worker ran trials: the gaps are not back to back")
    rows = per_trial(trials)
    first, last = rows[:w], rows[-w:]
    windows = []
    for win in (first, last):
        since = trials[win[0]["number"] - 1].datetime_complete
        windows.append(control_rows(controls, since, win[-1]["end"], args.storage))
    if args.storage and not args.keep and not args.reuse:
        opened = st.open_storage(args.storage)
        for d in [sweep_dir, *controls]:
            optuna.delete_study(study_name=study_name(d), storage=opened)
    timer = None
    if not args.storage:
        timer, n_small, n_large = pieces(journal, sweep_dir, w, args.reps, args.postgres)

    lo, hi = (
        f"{first[0]['number']}-{first[-1]['number']}",
        f"{last[0]['number']}-{last[-1]['number']}",
    )
    out = [
        f"workload: `python -m engine.train -m search=tpe search.n_trials={slots} "
        f"search.n_workers=1 {' '.join(WORKLOAD)}"
        + (f" search.storage={redact_mask(args.storage)}" if args.storage else "")
        + "` (the preset's 4-param space), "
        f"{cores()} CPU cores, torch {torch_version()}, optuna {optuna.__version__}",
        f"started {started:%Y-%m-%d %H:%M} UTC"
        + (f", long sweep wall {wall:.0f} s" if wall else "")
        + partial
        + (f"; {len(controls)} control sweeps of {w} trials ran beside it" if controls else ""),
        "",
        f"| per trial, mean / median ms | trials {lo} | trials {hi} | ratio of means "
        "| ratio of medians |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    labels = [
        ("overhead", "**overhead** = gap between ends - run_seconds"),
        ("claim", "- before the claim: previous end -> start (loop reads, claim)"),
        ("study", "- start -> end - seconds (load_study, Trial(), record, HPARAMS, tell)"),
        ("compose", "- seconds - run_seconds (suggests incl. TPE's draw, compose, .hydra/)"),
        ("run", "run_seconds (inside engine.train.run)"),
    ]
    stats = {}
    for key, label in labels:
        m1, d1 = window_stats(first, key)
        m2, d2 = window_stats(last, key)
        stats[key] = (m1, m2, d1, d2)
        out.append(
            f"| {label} | {ms(m1)} / {ms(d1)} | {ms(m2)} / {ms(d2)} | {ratio(m1, m2)} "
            f"| {ratio(d1, d2)} |"
        )
    control = [bool(c) for c in windows] == [True, True]
    if control:
        c = [window_stats(rows_, "overhead") for rows_ in windows]
        r = [window_stats(rows_, "run") for rows_ in windows]
        out.append(
            f"| control: overhead of fresh {w}-trial sweeps' trials ending in the same minutes "
            f"(n = {len(windows[0])}, {len(windows[1])}) | {ms(c[0][0])} / {ms(c[0][1])} "
            f"| {ms(c[1][0])} / {ms(c[1][1])} | {ratio(c[0][0], c[1][0])} "
            f"| {ratio(c[0][1], c[1][1])} |"
        )
        out.append(
            f"| control: run_seconds, same trials | {ms(r[0][0])} / {ms(r[0][1])} "
            f"| {ms(r[1][0])} / {ms(r[1][1])} | {ratio(r[0][0], r[1][0])} "
            f"| {ratio(r[0][1], r[1][1])} |"
        )
    m1, m2, d1, d2 = stats["overhead"]
    out += [
        "",
        f"bound, overhead of the last {w} / the first {w} trials <= 2: ratio of means "
        f"{m2 / m1:.2f}, of medians {d2 / d1:.2f}: **{'met' if m2 <= 2 * m1 else 'NOT met'}** "
        "(on means)",
    ]
    if control:
        adj_mean = (m2 / c[1][0]) / (m1 / c[0][0])
        adj_median = (d2 / c[1][1]) / (d1 / c[0][1])
        out.append(
            f"against the control in the same minutes (long / control, last window over first "
            f"window): means {adj_mean:.2f}, medians {adj_median:.2f}: "
            f"**{'met' if adj_mean <= 2 else 'NOT met'}** (on means)"
        )
    if timer is None:
        return "\n".join(out)
    out += [
        "",
        f"| piece, timed here ({args.reps} times, sizes in turn), min / median ms "
        f"| at {n_small} trials | at {n_large} trials | ratio of mins | ratio of medians |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    pieces_rows = [
        ("tpe", f"TPE `study.ask()`, in-memory study of {n_small} / {n} complete trials"),
        ("intersection", "- of which `IntersectionSearchSpace.calculate`, a fresh one"),
        ("tpe_kept", "TPE `study.ask()`, the same, one sampler kept across asks"),
        ("replay", f"journal replay: open + `get_all_trials`, a journal of {n_small} / {n} trials"),
        ("spec", "worker loop: `load_spec`"),
        ("reads", "worker loop: `get_all_trials` + `budget` + `failures_in_a_row`"),
        ("claim", "`storage.claim`"),
        ("prelude", "run_trial: `load_study` + `get_trials(RUNNING)` + `Trial()`"),
        ("suggest", "the 4 `suggest` calls (TPE's relative draw runs in the first)"),
        ("record", "record: 4 `set_user_attr` + `tell`"),
        ("step", "**worker step: the 6 rows above**"),
        *(
            [
                ("pg_all", "PostgreSQL: the loop's `get_all_trials` (the same study, copied)"),
                ("pg_waiting", "PostgreSQL: the claim's `get_all_trials(WAITING)`"),
            ]
            if args.postgres
            else []
        ),
        ("poll", "sweep command: one poll (every 0.1 s)"),
        ("report", "sweep command: reports (every 10 s while trials end)"),
    ]
    for key, label in pieces_rows:
        a, b = timer.median(f"{key} small"), timer.median(f"{key} large")
        lo_, hi_ = timer.min(f"{key} small"), timer.min(f"{key} large")
        out.append(
            f"| {label} | {ms(lo_)} / {ms(a)} | {ms(hi_)} / {ms(b)} | {ratio(lo_, hi_)} "
            f"| {ratio(a, b)} |"
        )
    out += [
        "",
        f"worker-step and sweep-command rows: on a copy of the sweep's journal cut where the "
        f"sweep stood after {n_small} and after {n_large} finished trials (all {n} slots are "
        f"enqueued from the start, so both hold {n} trials; the claim needs one still waiting); "
        f"journal appends are fsynced (ext4).",
    ]
    return "\n".join(out)


def in_process(args: argparse.Namespace) -> str:
    """``engine.search.worker.run_worker`` in this process on copies of the long sweep's journal
    cut after ``--window`` and after ``n - 100`` finished trials, ``--chunk`` trials each (the
    copy's spec gets ``n_trials`` = finished + chunk), the two sizes in turn: the same worker
    code, CLI-free, the same minutes for both. Then one chunk of each under cProfile."""
    import cProfile
    import pstats

    from engine.search.worker import run_worker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = dt.datetime.now(dt.timezone.utc)
    journal = Path(args.reuse).resolve() / "sweep" / st.JOURNAL
    lines = journal_lines(journal)
    n = len(load_trials(journal))
    sizes = {"small": args.window, "large": n - args.window}
    rows: dict[str, list] = {"small": [], "large": []}
    profiles: dict[str, pstats.Stats] = {}
    with tempfile.TemporaryDirectory(prefix="sweep_scale_") as tmp_name:
        tmp = Path(tmp_name)
        for rep in range(args.reps + args.profile_reps):
            profiled = rep >= args.reps
            for tag in ("small", "large") if rep % 2 == 0 else ("large", "small"):
                k = sizes[tag]
                d = tmp / f"{tag}_{rep}"
                d.mkdir()
                path = write_journal(cut_after_finished(lines, k), d / st.JOURNAL)
                storage = st.open_storage(str(path))
                (summary,) = storage.get_all_studies()
                sid = storage.get_study_id_from_name(summary.study_name)
                spec = st.load_spec(storage, sid)
                spec.n_trials, spec.sweep_dir = k + args.chunk, str(d)
                st.save_spec(storage, sid, spec)
                del storage
                prof = cProfile.Profile() if profiled else None
                if prof:
                    prof.enable()
                ran = run_worker(str(path), summary.study_name, threads=2, quiet=True)
                if prof:
                    prof.disable()
                    if tag in profiles:
                        profiles[tag].add(prof)
                    else:
                        profiles[tag] = pstats.Stats(prof)
                assert ran == args.chunk, (ran, args.chunk)
                trials = load_trials(path)[k : k + args.chunk]
                if not profiled:
                    rows[tag] += per_trial(trials)  # the chunk's first trial has no predecessor
    out = [
        f"in-process `run_worker`, {args.chunk} trials per chunk at {sizes['small']} and at "
        f"{sizes['large']} finished trials of the {n}-trial sweep's journal, {args.reps} chunks "
        f"each in turn; started {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"| per trial, mean / median ms | from {sizes['small']} finished | from "
        f"{sizes['large']} finished | ratio of means | ratio of medians |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("overhead", "**overhead** = gap between ends - run_seconds"),
        ("claim", "- before the claim"),
        ("study", "- start -> end - seconds"),
        ("compose", "- seconds - run_seconds"),
        ("run", "run_seconds"),
    ):
        m1, d1 = window_stats(rows["small"], key)
        m2, d2 = window_stats(rows["large"], key)
        out.append(
            f"| {label} | {ms(m1)} / {ms(d1)} | {ms(m2)} / {ms(d2)} | {ratio(m1, m2)} "
            f"| {ratio(d1, d2)} |"
        )
    out += [
        "",
        f"cProfile, {args.profile_reps} more chunks each, in turn: cumulative ms per trial of "
        "the functions whose time grew most (the profiler's own cost included; the chunk's "
        "one journal replay at the worker's start, `open_storage`, is spread over its trials):",
        "",
        "| function | small | large | large - small |",
        "| --- | ---: | ---: | ---: |",
    ]
    cum: dict[str, dict[str, float]] = {}
    for tag, stats in profiles.items():
        for (file, line, func), (_, _, _, ct, _) in stats.stats.items():
            name = f"{Path(file).name}:{line}({func})"
            per_trial_ms = ct / (args.chunk * args.profile_reps)
            cum.setdefault(name, {"small": 0.0, "large": 0.0})[tag] += per_trial_ms
    grown = sorted(cum.items(), key=lambda kv: kv[1]["large"] - kv[1]["small"], reverse=True)
    for name, v in grown[: args.top]:
        out.append(
            f"| `{name}` | {ms(v['small'])} | {ms(v['large'])} | {ms(v['large'] - v['small'])} |"
        )
    return "\n".join(out)


def redact_mask(url: str) -> str:
    from engine.redact import mask

    return mask(url)


def torch_version() -> str:
    from importlib.metadata import version

    return version("torch")


# --------------------------------------------------------------------------------------------
# concurrent: the claim harness


def claimer(args: argparse.Namespace) -> None:
    """One harness process: claim until none is waiting, completing each claim at once."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = st.open_storage(st.resolve_storage(args.storage))
    sid = storage.get_study_id_from_name(args.study)
    storage.get_all_trials(sid, deepcopy=False)
    Path(args.ready).touch()
    while not Path(args.go).exists():
        time.sleep(0.005)
    # Count the claim's WAITING -> RUNNING attempts (one per trial it tries until one is its
    # own): a thin wrapper on this process's storage object, the engine's code unchanged.
    attempts = [0]
    set_state = storage.set_trial_state_values

    def counted(*a: Any, **k: Any) -> bool:
        attempts[0] += 1
        return set_state(*a, **k)

    storage.set_trial_state_values = counted  # type: ignore[method-assign]
    pid, records, errors = os.getpid(), [], []
    while True:
        attempts[0] = 0
        t0 = time.perf_counter()
        frozen = st.claim(storage, sid)
        latency = time.perf_counter() - t0
        tries = attempts[0]
        if frozen is None:
            records.append({"number": None, "latency": latency, "attempts": tries})
            break
        trial_id = storage.get_trial_id_from_study_id_trial_number(sid, frozen.number)
        storage.set_trial_user_attr(trial_id, "claimer", pid)
        try:
            storage.set_trial_state_values(trial_id, TrialState.COMPLETE, [float(frozen.number)])
        except optuna.exceptions.UpdateFinishedTrialError as err:
            errors.append(f"trial {frozen.number}: {err}")
        records.append({"number": frozen.number, "latency": latency, "attempts": tries})
    Path(args.log).write_text(json.dumps({"pid": pid, "claims": records, "errors": errors}))


def new_study(storage_arg: str, name: str, n_trials: int, tmp: Path) -> None:
    """The study as the driver leaves it (``driver.prepare``): the spec stored in it and one
    WAITING slot per trial (``storage.top_up``)."""
    storage = st.open_storage(storage_arg)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    spec = Spec(
        sweep_dir=str(tmp), config_dir=str(REPO / "conf"), config_name="train",
        sampler="random", n_trials=n_trials, session=dt.datetime.now().isoformat(),
    )  # fmt: skip
    st.save_spec(storage, storage.get_study_id_from_name(name), spec)
    st.top_up(study, spec)


def run_claims(storage_arg: str, name: str, workers: int, trials: int, tmp: Path) -> dict:
    new_study(storage_arg, name, trials, tmp)
    logs = tmp / f"claims_{name}"
    logs.mkdir()
    go = logs / "go"
    procs = []
    for k in range(workers):
        cmd = [sys.executable, __file__, "_claimer", "--storage", redact_mask(storage_arg)]
        cmd += ["--study", name]
        cmd += ["--log", str(logs / f"{k}.json"), "--ready", str(logs / f"{k}.ready")]
        cmd += ["--go", str(go)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=storage_env(storage_arg)))
    while sum(1 for _ in logs.glob("*.ready")) < workers:
        if any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit("a claim harness process failed")
        time.sleep(0.05)
    t0 = time.perf_counter()
    go.touch()
    codes = [p.wait() for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        raise SystemExit(f"claim harness exit codes {codes}")
    results = [json.loads((logs / f"{k}.json").read_text()) for k in range(workers)]
    claimed = [
        (r["pid"], c["number"]) for r in results for c in r["claims"] if c["number"] is not None
    ]
    latencies = [c["latency"] for r in results for c in r["claims"] if c["number"] is not None]
    empty = [c["latency"] for r in results for c in r["claims"] if c["number"] is None]
    errors = [e for r in results for e in r["errors"]]
    tries = [c["attempts"] for r in results for c in r["claims"] if c["number"] is not None]
    storage = st.open_storage(storage_arg)
    sid = storage.get_study_id_from_name(name)
    final = storage.get_all_trials(sid, deepcopy=False)
    check = check_study(final, trials)
    by_number = Counter(n for _, n in claimed)
    dup_claims = sorted(n for n, c in by_number.items() if c > 1)
    pid_of = dict((n, pid) for pid, n in claimed)
    attr_mismatch = [t.number for t in final if t.user_attrs.get("claimer") != pid_of.get(t.number)]
    # The engine's own record of who runs the trial (what recovery checks), written before the
    # WAITING -> RUNNING write by every process that tried that trial.
    wrong_worker = [
        t.number
        for t in final
        if (t.user_attrs.get("worker") or {}).get("pid") != pid_of.get(t.number)
    ]
    problems = check["problems"] + errors
    if dup_claims:
        problems.append(f"claimed by two processes: {dup_claims}")
    if attr_mismatch:
        problems.append(f"claimer attr differs from the log: {attr_mismatch[:10]}")
    if len(claimed) != trials:
        problems.append(f"{len(claimed)} claims logged, {trials} expected")
    return {
        "dup": sum(c - 1 for c in by_number.values()),
        "attempts": (statistics.fmean(tries), max(tries)),
        "claims": len(claimed),
        "per_process": sorted(
            Counter({r["pid"]: 0 for r in results} | Counter(pid for pid, _ in claimed)).values()
        ),
        "wrong_worker": wrong_worker,
        "latencies": latencies,
        "empty": empty,
        "wall": wall,
        "problems": problems,
        **check,
    }


def check_study(final: list[optuna.trial.FrozenTrial], trials: int) -> dict:
    numbers = Counter(t.number for t in final)
    states = Counter(t.state.name for t in final)
    done = Counter(t.number for t in final if t.state == TrialState.COMPLETE)
    lost = [k for k in range(trials) if done[k] == 0]
    problems = []
    if sorted(numbers) != list(range(trials)) or any(c != 1 for c in numbers.values()):
        problems.append(f"trial numbers are not 0..{trials - 1} once each")
    if states != Counter({"COMPLETE": trials}):
        problems.append(f"states {dict(states)}")
    return {"states": dict(states), "n": len(final), "lost": lost, "problems": problems}


# --------------------------------------------------------------------------------------------
# concurrent: the real workers


TRIAL_START = re.compile(r"\btrial (\d+) on worker (\d+)")


def run_workers(storage: str | None, name: str, workers: int, trials: int, tmp: Path) -> dict:
    sweep_dir = tmp / f"workers_{name}"
    cmd = [sys.executable, "-m", "engine.train", "-m", "search=tpe", f"search.n_trials={trials}"]
    cmd += [f"search.n_workers={workers}", *WORKLOAD, f"hydra.sweep.dir={sweep_dir}"]
    if storage:
        cmd += [f"search.storage={storage_override(storage)}", f"search.study_name={name}"]
    log = tmp / f"workers_{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(
            cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=storage_env(storage)
        )
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"the sweep failed (exit {code}); see {log}")
    storage_arg = storage or str(sweep_dir / st.JOURNAL)
    opened = st.open_storage(storage_arg)
    study_name = name if storage else opened.get_all_studies()[0].study_name
    final = opened.get_all_trials(opened.get_study_id_from_name(study_name), deepcopy=False)
    check = check_study(final, trials)
    problems = list(check["problems"])
    # Each start of a trial writes one line "trial N on worker K" into its folder's train.log
    # (appended): a trial run twice would show two.
    starts: Counter = Counter()
    for path in sweep_dir.glob("trial_*/train.log"):
        for m in TRIAL_START.finditer(path.read_text()):
            starts[int(m.group(1))] += 1
    if sorted(starts) != list(range(trials)) or any(c != 1 for c in starts.values()):
        twice = sorted(n for n, c in starts.items() if c != 1)
        problems.append(f"train.log starts: {len(starts)} trials, not once each: {twice[:10]}")
    # Grouped by the index the running worker wrote itself (run_trial), not by the "worker"
    # attr, which a process that lost the claim race may have written last (see claims).
    by_index: dict[int, list] = {}
    for t in final:
        by_index.setdefault(t.user_attrs["worker_index"], []).append(t)
    pid_of_index = {
        k: Counter(t.user_attrs["worker"]["pid"] for t in ts).most_common(1)[0][0]
        for k, ts in by_index.items()
    }
    wrong_worker = [
        t.number
        for t in final
        if t.user_attrs["worker"]["pid"] != pid_of_index[t.user_attrs["worker_index"]]
    ]
    latencies = []
    for ts in by_index.values():
        ts.sort(key=lambda t: t.datetime_start)
        for prev, t in zip(ts, ts[1:]):
            latencies.append((t.datetime_start - prev.datetime_complete).total_seconds())
    text = log.read_text()
    if f"{workers} workers on CPU" not in text:
        problems.append(f"the sweep did not start {workers} workers")
    if storage:
        optuna.delete_study(study_name=name, storage=opened)
    return {
        "dup": sum(c - 1 for c in starts.values() if c > 1) + max(0, len(final) - trials),
        "claims": sum(starts.values()),
        "per_process": sorted(len(ts) for ts in by_index.values()),
        "wrong_worker": wrong_worker,
        "latencies": latencies,
        "empty": [],
        "wall": wall,
        "problems": problems,
        **check,
    }


def concurrent(args: argparse.Namespace) -> str:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = dt.datetime.now(dt.timezone.utc)
    postgres = args.postgres or os.environ.get("ENGINE_TEST_POSTGRES_URL")
    storages = args.storages.split(",")
    if "postgres" in storages and not postgres:
        raise SystemExit("PostgreSQL: pass --postgres URL (or set ENGINE_TEST_POSTGRES_URL)")
    out = [
        f"{args.workers} processes at once, {args.trials} trials, {cores()} CPU cores, optuna "
        f"{optuna.__version__}; started {started:%Y-%m-%d %H:%M} UTC",
        "",
        "| storage | how | trials run | per process, min-max | claim p50 / p99 / max ms "
        "| attempts per claim, mean / max | wall s | lost / duplicated | final states, check "
        "| `worker` attr names another process |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    failed = False
    with tempfile.TemporaryDirectory(prefix="sweep_scale_") as tmp_name:
        tmp = Path(tmp_name)
        for how in args.how.split(","):
            for kind in storages:
                stamp = f"scale_{os.getpid()}_{int(time.time() * 1000) % 10**8}"
                if how == "claims":
                    arg = postgres if kind == "postgres" else str(tmp / f"{stamp}.journal")
                    res = run_claims(arg, stamp, args.workers, args.trials, tmp)
                    if kind == "postgres":
                        optuna.delete_study(study_name=stamp, storage=st.open_storage(postgres))
                else:
                    res = run_workers(
                        postgres if kind == "postgres" else None,
                        stamp, args.workers, args.trials, tmp,
                    )  # fmt: skip
                lat = res["latencies"]
                ok = not res["problems"]
                failed = failed or not ok
                per = res["per_process"]
                tries = res.get("attempts")
                states = ", ".join(f"{v} {k}" for k, v in res["states"].items())
                out.append(
                    f"| {kind} | {how} | {res['claims']} | {per[0]}-{per[-1]} ({len(per)} "
                    f"processes) | {ms(quantile(lat, 0.5))} / {ms(quantile(lat, 0.99))} / "
                    f"{ms(max(lat))} | {f'{tries[0]:.1f} / {tries[1]}' if tries else '-'} "
                    f"| {res['wall']:.1f} | {len(res['lost'])} / {res['dup']} "
                    f"| {states}, {'ok' if ok else '; '.join(res['problems'])} "
                    f"| {len(res['wrong_worker'])} |"
                )
                print(out[-1], flush=True)
    out += [
        "",
        "claims: the harness times each `engine.search.storage.claim` call (one get of the "
        "waiting trials, the worker attr, the WAITING -> RUNNING write, a read back), then "
        "completes the trial with a trivial value; workers: the real sweep command's worker "
        "processes, latency = a worker's previous trial end to its next trial start (the "
        "loop's reads + the claim), from the study. Attempts: the claim's WAITING -> RUNNING "
        "writes until one was its own (counted by a wrapper on the harness's storage object).",
        "check: every number 0..N-1 exactly once and COMPLETE, none RUNNING or WAITING, the "
        "claiming pid recorded on each trial equals the one that logged the claim (claims), "
        "one start line per trial folder's train.log (workers).",
        "`worker` attr: the engine's record of the process running a trial (what recovery "
        "checks for a dead worker), compared with the process that claimed it (claims) or the "
        "one that ran it, by its worker index (workers).",
    ]
    if failed:
        print("\n".join(out))
        raise SystemExit("a check failed")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("growth", help="per-trial overhead over a long sweep")
    g.add_argument("--trials", type=int, default=1000)
    g.add_argument("--window", type=int, default=100)
    g.add_argument("--reps", type=int, default=11, help="repetitions of each timed piece")
    g.add_argument("--keep", help="run the sweeps in DIR (DIR/sweep, DIR/control_K) and keep them")
    g.add_argument("--reuse", help="analyse the sweeps a --keep DIR holds instead of running")
    g.add_argument("--no-control", action="store_true", help="no control sweeps beside it")
    g.add_argument("--postgres", help="also time the loop's reads on PostgreSQL (a URL)")
    g.add_argument(
        "--storage", help="run the sweeps on this search.storage (a URL; pass it again on --reuse)"
    )
    g.add_argument("--out", help="also write the markdown here")
    p = sub.add_parser("inprocess", help="run_worker in this process at two study sizes")
    p.add_argument("--reuse", required=True, help="a growth --keep DIR")
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--chunk", type=int, default=6, help="trials per run_worker call")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--profile-reps", type=int, default=2)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", help="also write the markdown here")
    c = sub.add_parser("concurrent", help="many workers on one study")
    c.add_argument("--workers", type=int, default=16)
    c.add_argument("--trials", type=int, default=200)
    c.add_argument("--storages", default="journal,postgres")
    c.add_argument("--how", default="claims,workers")
    c.add_argument("--postgres", help="a PostgreSQL URL (default: $ENGINE_TEST_POSTGRES_URL)")
    c.add_argument("--out", help="also write the markdown here")
    h = sub.add_parser("_claimer")
    for flag in ("--storage", "--study", "--log", "--ready", "--go"):
        h.add_argument(flag, required=True)
    args = parser.parse_args()
    if args.command == "_claimer":
        claimer(args)
        return
    commands = {"growth": growth, "inprocess": in_process, "concurrent": concurrent}
    text = commands[args.command](args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
