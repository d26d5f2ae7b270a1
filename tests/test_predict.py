"""``python -m engine.predict``: batch predictions of a CSV file, streamed in chunks.

Tiny runs are trained once for the module (digits classification, diabetes regression) through
the real training CLI; the end-to-end paths run ``python -m engine.predict`` as a subprocess, the
error cases call its ``main`` (the same entry point, without a fresh interpreter per case).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from engine import predictor
from engine.data import split_table
from engine.predict.__main__ import main

FAST = [
    "trainer.progress=none",
    "trainer.num_threads=1",
    "data.batch_size=128",
    "trainer.max_epochs=1",
]
ROWS = 1797  # the digits data set
CHUNK = 500  # digits in 4 chunks: rows 1-500, 501-1000, 1001-1500, 1501-1797


def _env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)


def _run(module: str, *argv: str, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=REPO,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@dataclass
class Fixture:
    digits: Path  # run dir
    diabetes: Path  # run dir
    digits_csv: Path  # every digits row, raw, with an "id" column first
    diabetes_csv: Path
    db: Path  # a registry holding the digits run as digits-mlp@1, alias production
    store: Path


def _all_rows(run: Path) -> pd.DataFrame:
    """Every row of the run's data set, raw, under its training column names."""
    table = split_table(predictor.run_config(run).data)
    names = predictor.load_run(run).feature_names
    return pd.DataFrame(table.x, columns=names)


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Fixture:
    root = tmp_path_factory.mktemp("predict")
    digits, diabetes = root / "digits", root / "diabetes"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "engine.train", *FAST, *extra, f"hydra.run.dir={run}"],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run, extra in ((digits, []), (diabetes, ["data=diabetes"]))
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err

    frame = _all_rows(digits)
    # The digits pixels are integers 0..16: written as such, as a user's CSV would hold them.
    frame = frame.astype(int)
    frame.insert(0, "id", [f"{i:05d}" for i in range(len(frame))])
    digits_csv = root / "digits.csv"
    frame.to_csv(digits_csv, index=False)
    diabetes_csv = root / "diabetes.csv"
    _all_rows(diabetes).to_csv(diabetes_csv, index=False)

    db, store = root / "registry.db", root / "registry"
    location = [f"registry.storage={db}", f"registry.store={store}"]
    done = _run("engine.registry", "register", str(digits), "--name", "digits-mlp", *location)
    assert done.returncode == 0, done.stderr
    done = _run("engine.registry", "promote", "digits-mlp@1", "--alias", "production", *location)
    assert done.returncode == 0, done.stderr
    return Fixture(digits, diabetes, digits_csv, diabetes_csv, db, store)


def _predict(capsys, *argv: str) -> tuple[int, str]:
    """``main`` with these arguments: its exit code and what it wrote to stderr."""
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture
def existing(tmp_path) -> Path:
    """An output file already there, which a failed prediction must leave as it was."""
    path = tmp_path / "preds.parquet"
    path.write_bytes(b"an earlier result")
    return path


def _left_intact(existing: Path) -> None:
    assert existing.read_bytes() == b"an earlier result"
    assert sorted(p.name for p in existing.parent.iterdir() if p.name.endswith(".tmp")) == []


def _with_cell(tmp_path: Path, source: Path, column: str, row: int, value: str) -> Path:
    """A copy of the CSV ``source`` with one cell (1-based data ``row``) replaced, as text."""
    frame = pd.read_csv(source, dtype=str, keep_default_na=False)
    frame.loc[row - 1, column] = value
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    return path


# ---- what it writes ---------------------------------------------------------------------------


def test_the_predictions_equal_predictor_predict_on_the_whole_file(fx, tmp_path):
    out = tmp_path / "preds.parquet"
    done = _run(
        "engine.predict",
        f"model={fx.digits}",
        f"input={fx.digits_csv}",
        f"output={out}",
        f"chunk_rows={CHUNK}",
        "device=cpu",
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {ROWS} rows to {out}" in done.stdout.splitlines()[-1]

    got = pd.read_parquet(out)
    model = predictor.load_run(fx.digits)
    expected = model.predict(pd.read_csv(fx.digits_csv))
    names = model.info.class_names
    assert list(got.columns) == ["row", "label", "confidence", *(f"prob_{c}" for c in names)]
    assert got["row"].tolist() == list(range(1, ROWS + 1))
    assert got["label"].tolist() == expected.labels
    probs = got[[f"prob_{c}" for c in names]].to_numpy()
    np.testing.assert_allclose(probs, expected.probabilities, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got["confidence"], expected.confidence, rtol=0, atol=1e-6)


def test_several_chunks_give_the_same_as_one_chunk_and_are_written_one_by_one(fx, tmp_path, capsys):
    one, four = tmp_path / "one.parquet", tmp_path / "four.parquet"
    common = [f"model={fx.digits}", f"input={fx.digits_csv}", "device=cpu"]
    assert _predict(capsys, *common, f"output={one}", "chunk_rows=100000")[0] == 0
    assert _predict(capsys, *common, f"output={four}", f"chunk_rows={CHUNK}")[0] == 0
    pd.testing.assert_frame_equal(pd.read_parquet(four), pd.read_parquet(one))
    # Streamed: each chunk is its own row group, appended as it was predicted.
    groups = pq.ParquetFile(four).metadata
    assert groups.num_row_groups == 4
    assert [groups.row_group(i).num_rows for i in range(4)] == [500, 500, 500, 297]


def test_a_registered_model_predicts_what_its_run_dir_predicts(fx, tmp_path, capsys):
    by_name, by_dir = tmp_path / "name.parquet", tmp_path / "dir.parquet"
    code, err = _predict(
        capsys,
        "model=digits-mlp@production",
        f"registry.storage={fx.db}",
        f"registry.store={fx.store}",
        f"input={fx.digits_csv}",
        f"output={by_name}",
    )
    assert code == 0, err
    assert (
        _predict(capsys, f"model={fx.digits}", f"input={fx.digits_csv}", f"output={by_dir}")[0] == 0
    )
    pd.testing.assert_frame_equal(pd.read_parquet(by_name), pd.read_parquet(by_dir))


def test_the_registry_location_can_come_from_the_environment(fx, tmp_path):
    out = tmp_path / "preds.csv"
    done = _run(
        "engine.predict",
        "model=digits-mlp@1",
        f"input={fx.digits_csv}",
        f"output={out}",
        env=_env(ENGINE_REGISTRY_STORAGE=str(fx.db), ENGINE_REGISTRY_STORE=str(fx.store)),
    )
    assert done.returncode == 0, done.stderr
    assert "digits-mlp version 1" in done.stdout
    assert len(pd.read_csv(out)) == ROWS


def test_regression_values_are_in_the_target_units(fx, tmp_path, capsys):
    out = tmp_path / "preds.parquet"
    code, err = _predict(
        capsys,
        f"model={fx.diabetes}",
        f"input={fx.diabetes_csv}",
        f"output={out}",
        "chunk_rows=100",
    )
    assert code == 0, err
    got = pd.read_parquet(out)
    assert list(got.columns) == ["row", "value"]
    model = predictor.load_run(fx.diabetes)
    expected = model.predict(pd.read_csv(fx.diabetes_csv)).outputs
    np.testing.assert_allclose(got["value"], expected, rtol=1e-6)
    # The diabetes target (disease progression, 25..346, mean about 152), not standardised
    # values around 0: even an undertrained model answers in that range.
    assert 50 < got["value"].mean() < 300


def test_keep_copies_input_columns_beside_the_predictions_as_text(fx, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    code, err = _predict(
        capsys,
        f"model={fx.digits}",
        f"input={fx.digits_csv}",
        f"output={out}",
        "keep=[id,pixel_0_2]",
        f"chunk_rows={CHUNK}",
    )
    assert code == 0, err
    got = pd.read_csv(out, dtype={"id": str})
    assert list(got.columns[:4]) == ["row", "id", "pixel_0_2", "label"]
    source = pd.read_csv(fx.digits_csv, dtype={"id": str})
    assert got["id"].tolist() == source["id"].tolist()  # "00007" keeps its zeros
    assert got["pixel_0_2"].tolist() == source["pixel_0_2"].astype(float).tolist()


def test_csv_and_parquet_outputs_hold_the_same_predictions(fx, tmp_path, capsys):
    csv, parquet = tmp_path / "p.csv", tmp_path / "p.parquet"
    for out in (csv, parquet):
        assert (
            _predict(capsys, f"model={fx.digits}", f"input={fx.digits_csv}", f"output={out}")[0]
            == 0
        )
    a, b = pd.read_csv(csv), pd.read_parquet(parquet)
    assert a["label"].astype(str).tolist() == b["label"].tolist()
    np.testing.assert_allclose(a.drop(columns="label"), b.drop(columns="label"), rtol=1e-12)


def test_overwrite_true_replaces_an_existing_output(fx, existing, capsys):
    code, err = _predict(
        capsys,
        f"model={fx.digits}",
        f"input={fx.digits_csv}",
        f"output={existing}",
        "overwrite=true",
    )
    assert code == 0, err
    assert len(pd.read_parquet(existing)) == ROWS


# ---- what it refuses --------------------------------------------------------------------------


def test_an_existing_output_is_refused_and_left_as_it_was(fx, existing, capsys):
    code, err = _predict(
        capsys, f"model={fx.digits}", f"input={fx.digits_csv}", f"output={existing}"
    )
    assert code == 2
    assert err.startswith("error: ") and "overwrite=true" in err and str(existing) in err
    _left_intact(existing)


def test_a_missing_input_is_refused(fx, existing, capsys):
    code, err = _predict(
        capsys,
        f"model={fx.digits}",
        f"input={existing.parent / 'nope.csv'}",
        f"output={existing}",
        "overwrite=true",
    )
    assert code == 2 and "input=" in err and "nope.csv: no such file" in err
    _left_intact(existing)


def test_a_missing_output_folder_is_refused(fx, tmp_path, capsys):
    out = tmp_path / "not" / "there" / "preds.parquet"
    code, err = _predict(capsys, f"model={fx.digits}", f"input={fx.digits_csv}", f"output={out}")
    assert code == 2 and "does not exist; create it first" in err
    assert not (tmp_path / "not").exists()


def test_a_bad_device_is_refused_naming_it(fx, existing, capsys):
    code, err = _predict(
        capsys, f"model={fx.digits}", f"input={fx.digits_csv}", f"output={existing}", "device=gpu"
    )
    assert code == 2 and "device='gpu'" in err and "use auto, cpu, cuda or cuda:N" in err
    _left_intact(existing)


def test_an_unknown_key_is_refused_with_the_closest_key(fx, existing, capsys):
    code, err = _predict(
        capsys,
        f"model={fx.digits}",
        f"input={fx.digits_csv}",
        f"output={existing}",
        "chunk_row=5",
        "overwrite=true",
    )
    assert code == 2 and "unknown key 'chunk_row' (did you mean chunk_rows?)" in err
    _left_intact(existing)


def test_a_missing_feature_column_is_refused_naming_it(fx, existing, tmp_path, capsys):
    frame = pd.read_csv(fx.digits_csv).drop(columns=["pixel_3_4"])
    path = tmp_path / "fewer.csv"
    frame.to_csv(path, index=False)
    code, err = _predict(
        capsys, f"model={fx.digits}", f"input={path}", f"output={existing}", "overwrite=true"
    )
    assert code == 2 and "'pixel_3_4'" in err and "missing" in err
    _left_intact(existing)


def test_a_keep_column_not_in_the_input_is_refused(fx, existing, capsys):
    code, err = _predict(
        capsys,
        f"model={fx.digits}",
        f"input={fx.digits_csv}",
        f"output={existing}",
        "keep=[customer]",
        "overwrite=true",
    )
    assert code == 2 and "keep: 'customer' is not a column" in err
    _left_intact(existing)


@pytest.mark.parametrize(
    "cell, says",
    [
        ("dark", "holds a non-numeric value ('dark' in data row 1234)"),
        ("", "has a missing or infinite cell in data row 1234"),
        ("inf", "has a missing or infinite cell in data row 1234"),
    ],
    ids=["non-numeric", "empty", "infinite"],
)
def test_a_bad_cell_in_the_third_chunk_names_its_row_in_the_file_and_writes_nothing(
    fx, existing, tmp_path, capsys, cell, says
):
    bad = _with_cell(tmp_path, fx.digits_csv, "pixel_5_5", 1234, cell)
    code, err = _predict(
        capsys,
        f"model={fx.digits}",
        f"input={bad}",
        f"output={existing}",
        f"chunk_rows={CHUNK}",
        "overwrite=true",
    )
    assert code == 2, err
    assert err.startswith("error: ") and "column 'pixel_5_5'" in err and says in err
    _left_intact(existing)  # chunks 1 and 2 were written to a temporary file, now removed


def test_a_failure_without_an_earlier_output_leaves_no_file(fx, tmp_path, capsys):
    bad = _with_cell(tmp_path, fx.digits_csv, "pixel_0_0", 1700, "x")
    out = tmp_path / "preds.parquet"
    code, _ = _predict(
        capsys, f"model={fx.digits}", f"input={bad}", f"output={out}", "chunk_rows=100"
    )
    assert code == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]
