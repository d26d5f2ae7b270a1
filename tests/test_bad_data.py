"""Every bad-data case fails through the real CLI with a message naming the file, column or key,
and leaves no checkpoint behind."""

from __future__ import annotations

import pytest

GOOD_ROWS = [f"{i},{i % 3},{i % 2}" for i in range(30)]

CASES = {
    "missing_target_column": ("x,y,z", GOOD_ROWS, "data.target='label' is not a column"),
    "non_numeric_feature": (
        "x,y,label",
        ["1,abc,0"] + GOOD_ROWS,
        "column 'y' holds non-numeric",
    ),
    "nan_cell": ("x,y,label", ["1,,0"] + GOOD_ROWS, "column 'y' has 1 missing or infinite"),
    "inf_cell": ("x,y,label", ["inf,1,0"] + GOOD_ROWS, "column 'x' has 1 missing or infinite"),
    "empty_table": ("x,y,label", [], "has a header but no data rows"),
    "single_class": ("x,y,label", [f"{i},{i},same" for i in range(20)], "has a single class"),
    # pandas would rename the copy to 'label.1', a feature equal to the target (val/acc 1.0).
    "repeated_target_column": (
        "x,y,label,label",
        [f"{i},{i % 3},{i % 2},{i % 2}" for i in range(30)],
        "repeated column names, which are ambiguous: 'label' (columns 3, 4). 'label' is the "
        "target (data.target)",
    ),
    "repeated_feature_column": (
        "x,y,x,label",
        [f"{i},{i % 3},{i % 5},{i % 2}" for i in range(30)],
        "repeated column names, which are ambiguous: 'x' (columns 1, 3). Give every column",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_csv_is_refused_with_a_clear_message(cli, tmp_path, case):
    header, rows, message = CASES[case]
    (tmp_path / "bad.csv").write_text("\n".join([header, *rows]) + "\n")
    run_dir = tmp_path / "run"
    result = cli(
        "data=csv",
        "data.path=bad.csv",
        "data.target=label",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout
    assert "bad.csv" in result.stdout or "data.target" in result.stdout
    assert not (run_dir / "checkpoints").exists()


def test_a_missing_file_names_the_path(cli, tmp_path):
    result = cli(
        "data=csv",
        "data.path=missing.csv",
        "data.target=label",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert f"file not found: {tmp_path / 'missing.csv'}" in result.stdout


def test_a_missing_file_is_named_before_the_missing_target(cli, tmp_path):
    result = cli(
        "data=csv", "data.path=missing.csv", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert f"file not found: {tmp_path / 'missing.csv'}" in result.stdout


def test_no_target_is_asked_for_with_the_file_columns(cli, tmp_path):
    (tmp_path / "table.csv").write_text("a,b,label\n1,2,x\n3,4,y\n")
    result = cli(
        "data=csv", "data.path=table.csv", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "data=csv needs data.target=<column name>" in result.stdout
    assert "a, b, label" in result.stdout


def test_a_zero_byte_file_is_called_empty(cli, tmp_path):
    (tmp_path / "zero.csv").write_text("")
    result = cli(
        "data=csv",
        "data.path=zero.csv",
        "data.target=label",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "zero.csv is empty" in result.stdout


def test_csv_without_path_or_target_says_which_key_to_set(cli, tmp_path):
    result = cli("data=csv", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "data.path" in result.stdout


def _refused(cli, tmp_path, *args):
    run_dir = tmp_path / "run"
    result = cli("data=csv", "data.target=label", f"hydra.run.dir={run_dir}", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert not (run_dir / "checkpoints").exists()
    return result.stdout


def test_the_target_listed_among_the_features_is_refused(cli, tmp_path):
    (tmp_path / "t.csv").write_text("\n".join(["f0,f1,label", *GOOD_ROWS]) + "\n")
    out = _refused(cli, tmp_path, "data.path=t.csv", "data.features=[f0,label]")
    assert "data.features includes the target column 'label'" in out
    assert "Remove 'label' from data.features" in out


def test_a_feature_listed_twice_is_refused(cli, tmp_path):
    (tmp_path / "t.csv").write_text("\n".join(["f0,f1,label", *GOOD_ROWS]) + "\n")
    out = _refused(cli, tmp_path, "data.path=t.csv", "data.features=[f1,f0,f1]")
    assert "data.features lists 'f1' more than once" in out


def test_a_parquet_file_with_a_repeated_column_name_is_refused_by_name(cli, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [list(range(30)), [i % 3 for i in range(30)], [i % 2 for i in range(30)]]
    table = pa.table([pa.array(c) for c in [*columns, columns[2]]], ["x", "y", "label", "label"])
    pq.write_table(table, tmp_path / "t.parquet")
    out = _refused(cli, tmp_path, "data.path=t.parquet")
    assert f"{tmp_path / 't.parquet'} has repeated column names" in out
    assert "'label' (columns 3, 4). 'label' is the target" in out
