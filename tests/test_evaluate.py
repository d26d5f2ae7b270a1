"""`python -m engine.evaluate run=<dir>`: the report files, numbers equal to torchmetrics' and
scikit-learn's on the same outputs, the HTML rendered in headless Chromium, the PR curves served
by a real TensorBoard, slices with fairness numbers, and bad input refused by name."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, run_cli

from engine.checkpoint import CheckpointError
from engine.config import ConfigError
from engine.dataset import DataError
from engine.evaluate import classification, regression, slices
from engine.evaluate.core import evaluate
from engine.evaluate.options import parse

FAST = ["eval.latency_iters=5", "eval.latency_warmup=2"]


def _evaluate_cli(*args: str):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, "-m", "engine.evaluate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "digits"
    r = run_cli("trainer.max_epochs=2", "trainer.progress=none", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    return run


@pytest.fixture(scope="module")
def binary_csv(tmp_path_factory):
    """A 2-class csv with a non-feature 'group' column; the group 'tiny' is ~5% of the rows."""
    folder = tmp_path_factory.mktemp("bin")
    rng = np.random.default_rng(0)
    n = 400
    x = rng.normal(size=(n, 3))
    y = x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.7, size=n) > 0
    group = rng.choice(["a", "b", "tiny"], size=n, p=[0.55, 0.4, 0.05])
    frame = pd.DataFrame(
        {
            "x0": x[:, 0],
            "x1": x[:, 1],
            "x2": x[:, 2],
            "group": group,
            "label": np.where(y, "yes", "no"),
        }
    )
    path = folder / "bin.csv"
    frame.to_csv(path, index=False)
    run = folder / "run"
    r = run_cli(
        "data=csv",
        f"data.path={path}",
        "data.target=label",
        "data.features=[x0,x1,x2]",
        "trainer.max_epochs=2",
        "trainer.progress=none",
        f"hydra.run.dir={run}",
    )
    assert r.returncode == 0, r.stderr
    return run, path, frame


@pytest.fixture(scope="module")
def digits_eval(digits_run):
    r = _evaluate_cli(f"run={digits_run}", *FAST)
    assert r.returncode == 0, r.stderr
    return digits_run / "eval" / "test"


def test_the_cli_writes_the_report_files_with_the_runs_own_test_metrics(digits_run, digits_eval):
    for name in ("report.md", "report.html", "eval.json"):
        assert (digits_eval / name).stat().st_size > 0
    assert list((digits_eval / "tb").glob("events.out.tfevents.*"))
    result = json.loads((digits_eval / "eval.json").read_text())
    trained = json.loads((digits_run / "metrics.json").read_text())
    assert result["scalars"]["accuracy"] == pytest.approx(trained["test/acc"], abs=1e-9)
    assert result["scalars"]["ece"] == pytest.approx(trained["test/ece"], abs=1e-5)
    assert (
        result["data_fingerprint"]
        == json.loads((digits_run / "data_card.json").read_text())["fingerprint"]
    )
    assert [b["batch_size"] for b in result["latency"]["batches"]] == [1, 32, 1024]
    md = (digits_eval / "report.md").read_text()
    assert result["checkpoint_sha256"] in md and "(../../data_card.md)" in md


def _multiclass_case():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(500, 7)) * 2).float()
    y = rng.integers(0, 7, 500)
    y[:200] = logits[:200].argmax(1).numpy()  # better than chance
    return logits, y


def test_multiclass_numbers_equal_torchmetrics_and_scikit_learn():
    from sklearn.metrics import precision_recall_fscore_support
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_calibration_error,
        multiclass_confusion_matrix,
    )

    logits, y = _multiclass_case()
    m = classification.metrics(logits, y, [str(i) for i in range(7)])
    t = torch.from_numpy(y)
    probs = torch.softmax(logits.double(), -1)
    pred = probs.argmax(1).numpy()
    assert m["accuracy"] == pytest.approx(
        multiclass_accuracy(probs, t, 7, average="micro").item(), abs=1e-7
    )
    assert m["top5"] == pytest.approx(
        multiclass_accuracy(probs, t, 7, top_k=5, average="micro").item(), abs=1e-7
    )
    assert m["ece"] == pytest.approx(
        multiclass_calibration_error(probs, t, 7, n_bins=15, norm="l1").item(), abs=1e-6
    )
    assert m["confusion_matrix"] == multiclass_confusion_matrix(probs, t, 7).tolist()
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            y, pred, labels=range(7), average=average, zero_division=0
        )
        assert [m[average][k] for k in ("precision", "recall", "f1")] == pytest.approx([p, r, f])
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(7), zero_division=0)
    per = m["per_class"]
    assert [c["f1"] for c in per] == pytest.approx(f.tolist())
    assert [c["support"] for c in per] == s.tolist()


def test_binary_numbers_equal_scikit_learn_and_torchmetrics():
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 600)
    logits = torch.from_numpy(np.stack([np.zeros(600), y * 1.2 + rng.normal(size=600)], 1))
    logits[:50, 1] = 0.5  # ties
    score = torch.softmax(logits.double(), -1)[:, 1].numpy()
    b = classification.metrics(logits.float(), y, ["no", "yes"])["binary"]
    assert b["roc_auc"] == pytest.approx(roc_auc_score(y, score), abs=1e-9)
    assert b["roc_auc"] == pytest.approx(
        binary_auroc(torch.from_numpy(score), torch.from_numpy(y)).item(), abs=1e-6
    )
    assert b["pr_auc"] == pytest.approx(average_precision_score(y, score), abs=1e-9)
    assert b["pr_auc"] == pytest.approx(
        binary_average_precision(torch.from_numpy(score), torch.from_numpy(y)).item(), abs=1e-6
    )
    best = max(f1_score(y, score >= t) for t in np.unique(score))
    assert b["best_f1"]["f1"] == pytest.approx(best, abs=1e-9)
    assert f1_score(y, score >= b["best_f1"]["threshold"]) == pytest.approx(best, abs=1e-9)


def test_regression_numbers_equal_torchmetrics():
    from torchmetrics.functional import mean_absolute_error, mean_squared_error, r2_score

    rng = np.random.default_rng(3)
    y = rng.normal(size=300) * 5 + 2
    pred = y + rng.normal(size=300)
    m = regression.metrics(pred, y)
    tp, ty = torch.from_numpy(pred), torch.from_numpy(y)
    assert m["rmse"] == pytest.approx(mean_squared_error(tp, ty, squared=False).item())
    assert m["mae"] == pytest.approx(mean_absolute_error(tp, ty).item())
    assert m["r2"] == pytest.approx(r2_score(tp, ty).item())
    bins = m["by_target_quantile"]
    assert sum(b["rows"] for b in bins) == 300 and len(bins) == 5
    lowest = y <= np.quantile(y, 0.2)
    assert bins[0]["mae"] == pytest.approx(np.abs(pred - y)[lowest].mean())


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _png_pixels(data: bytes) -> np.ndarray:
    """[H, W, channels] uint8 of an 8-bit RGB/RGBA PNG (what Chromium writes), unfiltered
    scanline by scanline as the PNG specification defines it."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and colour in (2, 6)
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * bpp)
    out = np.zeros((height, width * bpp), np.int32)
    for row in range(height):
        kind, line = raw[row, 0], raw[row, 1:].astype(np.int32)
        up = out[row - 1] if row else np.zeros_like(line)
        if kind in (0, 2):
            out[row] = (line + (up if kind == 2 else 0)) % 256
            continue
        cur = np.zeros_like(line)
        for i in range(len(line)):  # Sub, Average, Paeth depend on the pixel to the left
            left = cur[i - bpp] if i >= bpp else 0
            corner = up[i - bpp] if i >= bpp else 0
            if kind == 1:
                pred = left
            elif kind == 3:
                pred = (left + up[i]) // 2
            else:
                p = left + up[i] - corner
                pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - corner)
                pred = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else corner)
            cur[i] = (line[i] + pred) % 256
        out[row] = cur
    return out.reshape(height, width, bpp).astype(np.uint8)


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed")
def test_the_html_renders_in_headless_chromium_with_its_tables_and_images(digits_eval, tmp_path):
    base = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ]
    url = (digits_eval / "report.html").as_uri()
    png = tmp_path / "report.png"
    subprocess.run(
        [*base, f"--screenshot={png}", "--window-size=1200,3000", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = _png_pixels(png.read_bytes())[..., :3]
    assert pixels.shape[:2] == (3000, 1200)
    assert (pixels.min(axis=-1) < 200).mean() > 0.01  # text, table borders, figures: not blank
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 60)  # the figures' bars and colour maps
    assert blue.sum() > 1000
    dom = subprocess.run(
        [*base, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert dom.count("<table>") >= 5 and "Per class" in dom
    images = dom.split("data:image/png;base64,")[1:]
    assert len(images) == 3
    for chunk in images:
        assert base64.b64decode(chunk.split('"')[0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_serves_the_pr_curves(digits_eval):
    from test_search_tb import TensorBoard

    with TensorBoard(digits_eval / "tb") as tb:
        tags = tb.poll("/data/plugin/pr_curves/tags", None, lambda t: t and any(t.values()))
        run, run_tags = next(iter(tags.items()))
        assert sorted(run_tags) == sorted(f"pr_curve/{c}" for c in range(10))
        curve = tb.get(f"/data/plugin/pr_curves/pr_curves?run={run}&tag=pr_curve/3")
        entry = curve[run][0]
        assert len(entry["precision"]) > 0 and max(entry["recall"]) == pytest.approx(1.0)


def test_group_by_a_non_feature_column_scores_each_group_and_lists_the_too_small(binary_csv):
    run, path, frame = binary_csv
    result = evaluate(
        parse(
            [
                f"run={run}",
                f"data.path={path}",
                "eval.group_by=group",
                "eval.min_group_size=30",
                "eval.latency=false",
            ]
        )
    )
    s = result["slices"]
    assert [g["group"] for g in s["groups"]] == ["a", "b"]
    tiny = int((frame["group"] == "tiny").sum())
    assert s["too_small"] == [{"group": "tiny", "rows": tiny}]
    assert sum(g["rows"] for g in s["groups"]) + tiny == len(frame)
    accs = [g["accuracy"] for g in s["groups"]]
    assert s["largest_gap"]["accuracy"] == pytest.approx(max(accs) - min(accs))
    assert (run / "eval" / "bin" / "report.html").is_file()
    import tb_reader

    pr_curves = tb_reader.load(run / "eval" / "bin" / "tb").PluginTagToContent("pr_curves")
    assert list(pr_curves) == ["pr_curve/yes"]  # binary: the positive class only


def test_fairness_differences_equal_a_direct_computation():
    rng = np.random.default_rng(4)
    y, pred = rng.integers(0, 3, 900), rng.integers(0, 3, 900)
    group = rng.integers(0, 3, 900)
    masks = [group == g for g in range(3)]
    got = slices.fairness(y, pred, masks, 3)
    dp, eo = 0.0, 0.0
    for c in range(3):
        sel = [np.mean(pred[m] == c) for m in masks]
        tpr = [np.mean(pred[m & (y == c)] == c) for m in masks]
        fpr = [np.mean(pred[m & (y != c)] == c) for m in masks]
        dp = max(dp, max(sel) - min(sel))
        eo = max(eo, max(tpr) - min(tpr), max(fpr) - min(fpr))
    assert got == pytest.approx(
        {"demographic_parity_difference": dp, "equalized_odds_difference": eo}
    )


def test_a_misspelt_key_is_an_error_naming_the_closest_key_exit_2(digits_run):
    r = _evaluate_cli(f"run={digits_run}", "eval.grup_by=x")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and "eval.group_by" in r.stderr


def test_bad_input_is_refused_naming_it(digits_run, binary_csv, tmp_path):
    run, path, frame = binary_csv
    with pytest.raises(ConfigError, match="unknown split"):
        parse([f"run={run}", "split=holdout"])
    empty = tmp_path / "empty_run"
    shutil.copytree(run, empty, ignore=shutil.ignore_patterns("*.pt"))
    with pytest.raises(CheckpointError, match="checkpoints/best.pt"):
        evaluate(parse([f"run={empty}"]))
    lacking = tmp_path / "lacking.csv"
    frame.drop(columns=["x1"]).to_csv(lacking, index=False)
    with pytest.raises(DataError, match="'x1'"):
        evaluate(parse([f"run={run}", f"data.path={lacking}", "eval.latency=false"]))
    with pytest.raises(DataError, match="eval.group_by=region"):
        evaluate(parse([f"run={run}", "eval.group_by=region", "eval.latency=false"]))


def _trained(tmp_path_factory, name: str, *args: str):
    run = tmp_path_factory.mktemp("eval") / name
    r = run_cli(*args, "trainer.progress=none", f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr
    return run


def test_regression_in_target_units_equals_the_runs_test_metrics_and_buckets_a_feature(
    tmp_path_factory,
):
    run = _trained(
        tmp_path_factory, "reg", "data=synthetic", "data.n_classes=0", "trainer.max_epochs=2"
    )
    result = evaluate(
        parse(
            [
                f"run={run}",
                "eval.group_by=f0",
                "eval.group_bins=4",
                "eval.min_group_size=1",
                "eval.latency=false",
            ]
        )
    )
    trained = json.loads((run / "metrics.json").read_text())
    for name in ("rmse", "mae", "r2"):
        assert result["scalars"][name] == pytest.approx(trained[f"test/{name}"], rel=1e-4)
    groups = result["slices"]["groups"]
    assert len(groups) == 4 and all(g["group"].startswith("[") for g in groups)
    assert sum(g["rows"] for g in groups) == result["rows"]
    assert "fairness" not in result["slices"]


def test_a_language_model_is_scored_by_its_loss_and_perplexity(tmp_path_factory):
    run = _trained(
        tmp_path_factory,
        "lm",
        "data=text",
        "model=transformer",
        "trainer.max_epochs=1",
        "data.max_tokens=20000",
        "data.vocab_size=512",
        "data.seq_len=16",
        "model.hidden=32",
        "trainer.device=cpu",
    )
    result = evaluate(parse([f"run={run}", "eval.batch_sizes=[1,8]", *FAST]))
    trained = json.loads((run / "metrics.json").read_text())
    assert result["scalars"]["loss"] == pytest.approx(trained["test/loss"], rel=1e-5)
    assert result["scalars"]["perplexity"] == pytest.approx(trained["test/perplexity"], rel=1e-4)
    assert [b["batch_size"] for b in result["latency"]["batches"]] == [1, 8]
