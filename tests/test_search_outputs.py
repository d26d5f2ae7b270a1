"""A sweep's report files: best.yaml gives back exactly the values the trial ran with (a literal
``${`` included), and summary.csv / best.yaml stay whole when two writers rewrite them at once."""

from __future__ import annotations

import csv
import itertools
import threading

import numpy as np
import optuna
import pytest
import yaml
from omegaconf import OmegaConf

from engine.search.space import Param
from engine.search.spec import Spec
from engine.search.summary import escape_interpolations, write_best_yaml, write_csv

FAST = ["data.batch_size=128", "trainer.progress=none", "trainer.num_threads=1"]


def _read_back(text: str) -> str:
    """The value OmegaConf gives for ``text`` written as a YAML value and loaded again."""
    cfg = OmegaConf.create(OmegaConf.to_yaml({"a": "A", "value": text}))
    return cfg.value


@pytest.mark.parametrize(
    "text",
    [
        "${a}",
        "\\${a}",
        "x\\\\${a}",
        "\\\\\\${a}",
        "$",
        "${",
        "${}",
        "a${b",
        "${${a}}",
        "\\",
        "a\\b",
        "a\\\\b",
        "C:\\data\\${run}\\",
        "$${oc.env:HOME}",
        "",
    ],
)
def test_an_escaped_string_reads_back_as_itself(text):
    assert _read_back(escape_interpolations(text)) == text


def test_every_short_string_of_the_tricky_characters_reads_back_as_itself():
    pieces = ["\\", "$", "{", "}", "a", "${"]
    texts = ["".join(c) for n in range(1, 5) for c in itertools.product(pieces, repeat=n)]
    yaml_text = OmegaConf.to_yaml({"a": "A", "values": [escape_interpolations(t) for t in texts]})
    back = OmegaConf.to_container(OmegaConf.create(yaml_text), resolve=True)["values"]
    assert [(t, b) for t, b in zip(texts, back) if t != b] == []


@pytest.mark.slow
def test_best_yaml_keeps_a_literal_dollar_brace_in_a_file_name(cli, tmp_path):
    """A CSV whose file name holds ``${``: the user escapes it on the command line; every trial
    reads that file, and so must best.yaml's config."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(160, 4))
    label = (x[:, 0] + x[:, 1] > 0).astype(int)
    data = tmp_path / "rows_${day}.csv"
    with data.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["a", "b", "c", "d", "label"])
        out.writerows([*row, y] for row, y in zip(x.round(4).tolist(), label.tolist()))
    escaped = str(data).replace("${", "\\${")
    s = tmp_path / "S"
    result = cli(
        "-m",
        "search=grid",
        "optim.lr=choice(1e-2,3e-2)",
        "model.hidden=16",
        "data=csv",
        f"data.path={escaped}",
        "data.target=label",
        "trainer.max_epochs=2",
        *FAST,
        f"hydra.sweep.dir={s}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with (s / "summary.csv").open() as f:
        assert [r["state"] for r in csv.DictReader(f)] == ["complete"] * 2

    shown = cli("--config-dir", str(s), "--config-name", "best", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr
    assert yaml.safe_load(shown.stdout)["data"]["path"] == escaped  # as the user wrote it
    resolved = cli("--config-dir", str(s), "--config-name", "best", "--cfg", "job", "--resolve")
    assert resolved.returncode == 0, resolved.stderr
    assert yaml.safe_load(resolved.stdout)["data"]["path"] == str(data)


def _trials(n: int, value: float) -> list[optuna.trial.FrozenTrial]:
    dist = {"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1.0)}
    trials = []
    for number in range(n):
        t = optuna.trial.create_trial(
            params={"optim.lr": 1e-3 * (number + 1)},
            distributions=dist,
            value=value + number,
            user_attrs={"metrics": {"val/acc": value, "test/acc": value}},
        )
        t.number = number
        trials.append(t)
    return trials


def test_two_writers_of_one_sweeps_summary_never_clash(tmp_path):
    """Two sweep commands on one sweep dir (one resuming while another ends) rewrite the same
    summary.csv and best.yaml; each write must be whole, and none may fail."""
    lr = Param(name="optim.lr", key="optim.lr", kind="float", low=1e-4, high=1.0)
    spec = Spec(
        sweep_dir=str(tmp_path),
        config_dir="",
        config_name="train",
        space={"optim.lr": lr.to_dict()},
    )
    for number in range(5):  # the trial configs best.yaml is made from
        hydra_dir = tmp_path / f"trial_{number}" / ".hydra"
        hydra_dir.mkdir(parents=True)
        (hydra_dir / "config.yaml").write_text(f"optim:\n  lr: {number}\nsearch: {{}}\n")
    runs = {3: _trials(3, 0.5), 5: _trials(5, 0.25)}  # writer -> its trials (3 or 5 rows)
    summary, best = tmp_path / "summary.csv", tmp_path / "best.yaml"
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(trials: list[optuna.trial.FrozenTrial]) -> None:
        try:
            for _ in range(100):
                write_csv(summary, trials, spec)
                write_best_yaml(best, trials[-1], spec, tmp_path)
        except BaseException as err:
            errors.append(err)

    def reader() -> None:
        try:
            while not done.is_set():
                if summary.exists():
                    with summary.open(newline="") as f:
                        table = list(csv.DictReader(f))
                    assert len(table) in runs, len(table)
                    assert [int(r["number"]) for r in table] == list(range(len(table)))
                if best.exists():
                    config = yaml.safe_load(best.read_text())
                    assert config["defaults"] == ["train", "_self_"]
                    assert config["optim"]["lr"] in (2, 4)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(t,)) for t in runs.values()]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors, errors[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "best.yaml",
        "summary.csv",
    ]
