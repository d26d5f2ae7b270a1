"""End-to-end runs of `python -m engine.train` through the real CLI, read back as a user would."""

from __future__ import annotations

import json

import pytest
import tb_reader


def test_main_job_writes_the_run_dir_layout_and_reaches_the_accuracy_target(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli(f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    for part in (
        ".hydra/config.yaml",
        "metrics.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "train.log",
        "data_card.md",
        "data_card.json",
    ):
        assert (run_dir / part).exists(), part
    card = json.loads((run_dir / "data_card.json").read_text())
    assert card["source"]["name"] == "digits" and len(card["fingerprint"]) == 64
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/acc"] >= 0.96
    assert {
        "val/acc",
        "val/f1",
        "val/precision",
        "val/recall",
        "val/top5",
        "val/ece",
        "test/f1",
    } <= set(metrics)
    acc = tb_reader.load(run_dir / "tb")
    scalars = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "val/acc",
        "val/f1",
        "lr",
        "throughput/samples_per_s",
        "test/acc",
    } <= scalars
    records = tb_reader.hparams(acc)
    start = records["_hparams_/session_start_info"].session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["model.name"].string_value == "mlp"
    end = records["_hparams_/session_end_info"].session_end_info
    assert end.status == 1  # STATUS_SUCCESS
    tags = {m.name.tag for m in records["_hparams_/experiment"].experiment.metric_infos}
    assert {"val/acc", "test/acc"} <= tags
    assert "config" in {t.split("/")[0] for t in acc.Tags()["tensors"]}  # resolved config as text
    assert {"confusion_matrix", "reliability"} <= set(acc.Tags()["images"])
    # The final table and one progress line per epoch (stdout is a pipe here, so no bar).
    assert "epoch 30/30" in result.stdout and "test" in result.stdout
    assert "\r" not in result.stderr


def test_a_misspelt_key_fails_before_training_and_names_the_closest_key(cli, tmp_path):
    result = cli("trainer.max_epocs=3", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "trainer.max_epocs" in result.stderr and "trainer.max_epochs" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_mistyped_value_names_the_key(cli, tmp_path):
    result = cli("trainer.max_epochs=ten", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "trainer.max_epochs" in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-1", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("trainer.precision=fp16", "trainer.precision=fp16"),
        ("model.norm=bacth", "Did you mean 'batch'"),
        ("trainer.nan_check=later", "trainer.nan_check='later' is not allowed"),
    ],
)
def test_out_of_range_or_incompatible_values_fail_with_the_key_named(
    cli, tmp_path, override, message
):
    result = cli(override, "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert message in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_compile_without_a_cpu_compiler_is_refused_before_training(cli, tmp_path):
    result = cli(
        "trainer.compile=true",
        "trainer.device=cpu",
        f"hydra.run.dir={tmp_path / 'run'}",
        env={"CXX": "/nonexistent/g++"},
    )
    assert result.returncode == 2
    assert "trainer.compile=true on the CPU needs a C++ compiler" in result.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_resolved_config_prints_without_training(cli):
    result = cli("model=cnn", "optim.lr=3e-3", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "name: cnn" in result.stdout and "lr: 0.003" in result.stdout


@pytest.mark.parametrize("loss", ["auto", "mse", "huber"])
def test_diabetes_trains_a_regressor_and_reports_regression_metrics(cli, tmp_path, loss):
    run_dir = tmp_path / loss
    result = cli(
        "data=diabetes", f"loss={loss}", "trainer.max_epochs=15", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"test/rmse", "test/r2", "test/mae", "test/mse", "val/rmse"} <= set(metrics)
    assert "test/acc" not in metrics
    assert metrics["test/r2"] > 0.3  # a linear-ish signal that any fitted model finds
    assert metrics["test/rmse"] == pytest.approx(metrics["test/mse"] ** 0.5, rel=1e-5)


def test_a_classification_loss_on_regression_data_is_refused(cli, tmp_path):
    result = cli("data=diabetes", "loss=cross_entropy", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert "loss=cross_entropy" in result.stdout and "loss=mse" in result.stdout


@pytest.mark.parametrize("model", ["linear", "cnn"])
def test_other_models_train_on_digits(cli, tmp_path, model):
    run_dir = tmp_path / model
    result = cli(
        f"model={model}", "optim.lr=1e-2", "trainer.max_epochs=3", f"hydra.run.dir={run_dir}"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["test/acc"] > 0.85


def test_auto_resume_continues_from_the_last_checkpoint(cli, tmp_path):
    run_dir = tmp_path / "run"
    first = cli("trainer.max_epochs=2", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr
    second = cli("trainer.max_epochs=4", f"hydra.run.dir={run_dir}")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stdout
    assert "epoch 1/4" not in second.stdout and "epoch 3/4" in second.stdout
    assert "epoch 4/4" in second.stdout


def test_string_labels_of_a_csv_are_mapped_and_the_mapping_recorded(cli, tmp_path):
    rows = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{'cat' if i % 2 else 'dog'}" for i in range(80)]
    (tmp_path / "pets.csv").write_text("\n".join(rows) + "\n")
    run_dir = tmp_path / "run"
    result = cli(
        "data=csv",
        "data.path=pets.csv",
        "data.target=label",
        "trainer.max_epochs=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((run_dir / "label_mapping.json").read_text()) == {"cat": 0, "dog": 1}


def test_early_stopping_ends_the_run_when_the_monitor_stalls(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli(
        "optim.lr=1e-9",
        "trainer.early_stop_patience=2",
        "trainer.max_epochs=20",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    assert "early stop: val/acc has not improved for 2 epochs" in result.stdout
    assert "epoch 20/20" not in result.stdout


def test_gradient_accumulation_steps_the_optimizer_every_n_batches(cli, tmp_path):
    from engine import checkpoint as ckpt

    run_dir = tmp_path / "run"
    result = cli(
        "data.batch_size=128",
        "trainer.accumulate_grad_batches=3",
        "trainer.max_epochs=2",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr
    state = ckpt.load(run_dir / "checkpoints" / "last.pt")
    assert state["fit"]["global_step"] == 2 * 4  # 10 batches an epoch -> steps after 3, 6, 9, 10


def test_a_huge_max_epochs_still_learns_and_stops_when_it_stops_improving(cli, tmp_path):
    # 5% of 4M planned steps would be a 200k-step warm-up: the run would early-stop at epoch 4
    # with the lr near zero. The cap makes it 1000 steps (25 epochs of 40 batches).
    run_dir = tmp_path / "run"
    result = cli(
        "data=digits",
        "trainer.max_epochs=100000",
        "trainer.early_stop_patience=3",
        "trainer.progress=none",
        "trainer.device=cpu",
        "trainer.num_threads=1",  # a 26k-param MLP: a second thread only adds contention
        "data.batch_size=32",
        f"hydra.run.dir={run_dir}",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    note = (
        "warm-up: 1000 steps (5% of 4000000 planned steps, capped by "
        "sched.warmup_max_steps=1000); early stopping counts epochs after the warm-up"
    )
    assert result.stdout.count(note) == 1, result.stdout
    assert "early stop: val/acc has not improved for 3 epochs" in result.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["test/acc"] > 0.9
    assert note in (run_dir / "train.log").read_text()


def test_a_run_of_ordinary_length_logs_no_warmup_line(cli, tmp_path):
    result = cli(
        "trainer.max_epochs=2", "trainer.progress=none", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert result.returncode == 0, result.stderr
    assert "warm-up" not in result.stdout
