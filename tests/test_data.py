"""Data loading, seeded splits, train-only standardisation and the in-memory loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from engine.config import DataConfig
from engine.data import BatchLoader, Split, build_dataset, split_indices


def data_cfg(**overrides):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), overrides)


def test_split_is_seeded_disjoint_and_complete():
    a = split_indices(1000, 0.15, 0.15, seed=3)
    b = split_indices(1000, 0.15, 0.15, seed=3)
    c = split_indices(1000, 0.15, 0.15, seed=4)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[2], c[2])
    joined = np.concatenate(a)
    assert len(joined) == 1000 and len(np.unique(joined)) == 1000
    assert len(a[2]) == 150 and len(a[1]) == 150


def test_split_is_stratified_by_class():
    y = np.array([0] * 900 + [1] * 100)
    train, val, test = split_indices(1000, 0.2, 0.2, seed=0, y=y)
    for part in (train, val, test):
        assert abs(y[part].mean() - 0.1) < 0.02


def test_standardisation_uses_training_rows_only():
    ds = build_dataset(data_cfg(name="wine"))
    train_x = ds.train.x
    assert torch.allclose(train_x.mean(0), torch.zeros(train_x.shape[1]), atol=1e-5)
    assert torch.allclose(train_x.std(0, unbiased=False), torch.ones(train_x.shape[1]), atol=1e-4)
    assert not torch.allclose(ds.test.x.mean(0), torch.zeros(train_x.shape[1]), atol=1e-3)


@pytest.mark.parametrize(
    "name, task, classes, features",
    [
        ("digits", "classification", 10, 64),
        ("breast_cancer", "classification", 2, 30),
        ("wine", "classification", 3, 13),
        ("diabetes", "regression", 0, 10),
    ],
)
def test_embedded_datasets(name, task, classes, features):
    ds = build_dataset(data_cfg(name=name))
    assert (
        ds.info.task == task and ds.info.num_classes == classes and ds.info.num_features == features
    )
    assert ds.train.x.dtype == torch.float32
    assert ds.train.y.dtype == (torch.int64 if task == "classification" else torch.float32)


def test_regression_targets_are_standardised_and_the_scale_recorded():
    ds = build_dataset(data_cfg(name="diabetes"))
    assert abs(float(ds.train.y.mean())) < 1e-4
    assert ds.info.target_std > 10 and ds.info.target_mean > 100


def test_synthetic_sizes_follow_the_config():
    ds = build_dataset(data_cfg(name="synthetic", n_samples=2000, n_features=7, n_classes=13))
    assert ds.info.num_classes == 13 and ds.info.num_features == 7
    assert len(ds.train) + len(ds.val) + len(ds.test) == 2000
    reg = build_dataset(data_cfg(name="synthetic", n_samples=500, n_classes=0))
    assert reg.info.task == "regression"


def test_parquet_is_read_like_csv(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"a": np.arange(60.0), "b": np.arange(60.0) % 7, "y": np.arange(60) % 3})
    frame.to_parquet(tmp_path / "t.parquet")
    ds = build_dataset(data_cfg(name="csv", path=str(tmp_path / "t.parquet"), target="y"))
    assert (
        ds.info.task == "classification" and ds.info.num_classes == 3 and ds.info.num_features == 2
    )


def test_csv_feature_list_selects_columns(tmp_path):
    rows = ["a,b,c,y"] + [f"{i},{i * 2},{i % 5},{i % 2}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows))
    ds = build_dataset(
        data_cfg(name="csv", path=str(tmp_path / "t.csv"), target="y", features=["a", "c"])
    )
    assert ds.info.feature_names == ["a", "c"]


def make_split(n: int) -> Split:
    return Split(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n))


def test_loader_order_depends_only_on_seed_and_epoch():
    a = BatchLoader(make_split(50), 8, shuffle=True, seed=1)
    b = BatchLoader(make_split(50), 8, shuffle=True, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]
    b.set_epoch(4)
    assert [y.tolist() for _, y in a] != [y.tolist() for _, y in b]


def test_loader_resumes_mid_epoch_with_the_remaining_batches():
    loader = BatchLoader(make_split(50), 8, shuffle=True, seed=1)
    full = [y.tolist() for _, y in loader]
    assert [y.tolist() for _, y in loader.iter_from(4)] == full[4:]
    assert sorted(sum(full, [])) == list(range(50))


def test_distributed_ranks_share_out_each_epoch():
    ranks = [
        BatchLoader(make_split(50), 4, shuffle=True, seed=0, rank=r, world_size=3) for r in range(3)
    ]
    seen = [sum((y.tolist() for _, y in loader), []) for loader in ranks]
    assert len({len(s) for s in seen}) == 1  # same number of steps on every rank
    assert set(sum(seen, [])) == set(range(50))
    evals = [BatchLoader(make_split(50), 4, shuffle=False, rank=r, world_size=3) for r in range(3)]
    counted = sum((sum((y.tolist() for _, y in loader), []) for loader in evals), [])
    assert sorted(counted) == list(range(50))  # evaluation counts each row exactly once


def test_a_header_name_that_only_looks_like_a_pandas_copy_is_kept(tmp_path):
    # 'label.1' written in the file is a real column, not a renamed repeat: nothing to refuse.
    rows = ['"x,1",label,label.1'] + [f"{i},{i % 2},{i % 3}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    ds = build_dataset(data_cfg(name="csv", path=str(tmp_path / "t.csv"), target="label"))
    assert ds.info.feature_names == ["x,1", "label.1"]


def test_repeated_names_are_reported_as_written_with_their_positions(tmp_path):
    from engine.data import DataError

    rows = ["a,b,a,,,b,label"] + [f"{i},1,2,3,4,5,{i % 2}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError) as err:
        build_dataset(data_cfg(name="csv", path=str(tmp_path / "t.csv"), target="label"))
    message = str(err.value)
    assert "'a' (columns 1, 3); 'b' (columns 2, 6)." in message
    assert "a.1" not in message and "target" not in message  # pandas' names never show
