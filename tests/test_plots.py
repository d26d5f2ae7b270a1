"""engine.plots: numpy rasterisation, markdown tables, and the TensorBoard round trip."""

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from engine import plots
from engine.metrics import ClassificationMetrics


def reddish(img):
    """Pixels where the (blended) calibration-gap red dominates."""
    r, g, b = (img[..., i].astype(int) for i in range(3))
    return (r > g + 40) & (r > b + 40)


def blue(img):
    return np.all(img == plots._BLUE, axis=-1)


def test_colormap_endpoints_and_nan():
    out = plots.colormap(np.array([0.0, 1.0, np.nan, -3.0, 7.0]))
    assert out.dtype == np.uint8 and out.shape == (5, 3)
    assert out[0].tolist() == [68, 1, 84] and out[1].tolist() == [253, 231, 37]
    assert (
        out[2].tolist() == out[3].tolist() == out[0].tolist() and out[4].tolist() == out[1].tolist()
    )


def test_confusion_image_is_row_normalised():
    cm = np.array([[1, 3, 0], [0, 0, 0], [0, 0, 5]])
    img = plots.confusion_matrix_image(cm)
    cell = 32  # 512 // 3 capped at 32
    assert img.shape == (3 * cell, 3 * cell, 3) and img.dtype == np.uint8
    centre = lambda i, j: img[i * cell + cell // 2, j * cell + cell // 2].tolist()
    assert centre(0, 0) == plots.colormap(0.25).tolist()
    assert centre(0, 1) == plots.colormap(0.75).tolist()
    assert centre(1, 1) == plots.colormap(0.0).tolist()  # a class with no support
    assert centre(2, 2) == plots.colormap(1.0).tolist()
    assert img[0, 5].tolist() == [30, 30, 30]  # cell separator


def test_confusion_image_small_cells_for_many_classes():
    img = plots.confusion_matrix_image(np.eye(200, dtype=int))
    assert img.shape == (800, 800, 3)  # 4-pixel minimum cells, no separators
    assert img[2, 2].tolist() == plots.colormap(1.0).tolist()


def _hist(acc, conf, count, n_bins=15):
    """Per-bin arrays (length n_bins + 1) from per-bin accuracy / mean confidence / counts."""
    count = np.asarray(count, dtype=float)
    return count, np.asarray(acc) * count, np.asarray(conf) * count


def test_reliability_perfect_calibration_has_no_gap():
    centres = (np.arange(16) + 0.5) / 15
    centres[-1] = 1.0
    count, correct, conf_sum = _hist(centres, centres, np.full(16, 10))
    img = plots.reliability_diagram_image(count, correct, conf_sum)
    assert img.dtype == np.uint8 and img.ndim == 3
    assert not reddish(img).any()
    assert blue(img).any()


def test_reliability_overconfidence_shows_gap_and_bar_height():
    count = np.zeros(16)
    count[13] = 100  # confidences ~0.9, accuracy 0.5
    count, correct, conf_sum = _hist(np.full(16, 0.5), np.full(16, 0.9), count)
    size, margin = 256, 12
    img = plots.reliability_diagram_image(count, correct, conf_sum, size=size, margin=margin)
    x = int(margin + 13.5 / 15 * size)
    column = img[: margin + size, x]
    assert abs(blue(column).sum() - 0.5 * size) <= 2
    assert abs(reddish(column[None])[0].sum() - 0.4 * size) <= 3
    other = int(margin + 3.5 / 15 * size)
    assert not blue(img[: margin + size, other]).any()  # empty bins draw nothing


def test_reliability_folds_confidence_one_slot_into_last_bin():
    count = np.zeros(16)
    count[15] = 50  # only the 'confidence == 1.0' slot
    count, correct, conf_sum = _hist(np.ones(16), np.ones(16), count)
    size, margin = 256, 12
    img = plots.reliability_diagram_image(count, correct, conf_sum, size=size, margin=margin)
    assert blue(img[: margin + size, int(margin + 14.5 / 15 * size)]).sum() > 0.9 * size


def test_markdown_table_and_escaping():
    cm = np.array([[5, 1], [2, 7]])
    text = plots.confusion_matrix_markdown(cm, plots.class_names_or_default(["cat", "a|b"], 2))
    lines = text.splitlines()
    assert lines[0] == "| target \\ predicted | cat | a\\|b |"
    assert lines[2] == "| **cat** | 5 | 1 |" and lines[3] == "| **a\\|b** | 2 | 7 |"
    with pytest.raises(ValueError):
        plots.class_names_or_default(["only one"], 2)
    assert plots.class_names_or_default(None, 3) == ["0", "1", "2"]


def test_top_confusions_and_worst_classes():
    cm = np.diag([10, 10, 10, 10])
    cm[0, 3], cm[2, 1], cm[1, 2] = 7, 4, 4
    assert plots.top_confusions(cm, 5) == [(0, 3, 7), (1, 2, 4), (2, 1, 4)]
    assert plots.most_confused_classes(cm, 3) == [0, 3, 1]
    names = ["a", "b", "c", "d"]
    assert "| a | d | 7 | 0.4118 |" in plots.top_confusions_markdown(cm, names)
    text = plots.worst_classes_markdown(
        np.array([9, 1, 5]), np.array([0, 0, 1]), np.array([1, 9, 0]), names[:3], k=2
    )
    assert text.splitlines()[2:] == ["| b | 10 | 0.1000 | 1.0000 |", "| a | 10 | 0.9000 | 1.0000 |"]


def _metrics(num_classes, n=400, seed=0, logits=True):
    g = torch.Generator().manual_seed(seed)
    m = ClassificationMetrics(num_classes)
    x = torch.randn(n, num_classes, generator=g)
    t = torch.randint(0, num_classes, (n,), generator=g)
    m.update(x if logits else x.argmax(1), t)
    m.compute()
    return m


def test_large_c_dense_shows_most_confused_subset():
    image, text = plots.confusion_figures(_metrics(80), None)
    assert image is not None and image.shape[0] == 20 * 25  # 20 classes, 512 // 20 px cells
    assert text.startswith("Most confused pairs of 80 classes")
    assert len(text.splitlines()) == 2 + 2 + plots.TOP_CONFUSIONS


def test_per_class_only_has_no_image():
    image, text = plots.confusion_figures(_metrics(300, n=600), None)
    assert image is None and "Lowest-recall classes" in text


def test_log_classification_figures_round_trip(tmp_path):
    names = ["ant", "bee", "cat", "dog", "eel"]
    with SummaryWriter(str(tmp_path)) as writer:
        plots.log_classification_figures(writer, _metrics(5), names, step=3)
        plots.log_classification_figures(
            writer, _metrics(5, logits=False), names, step=4, prefix="idx/"
        )
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"confusion_matrix", "reliability", "idx/confusion_matrix"} <= set(tags["images"])
    assert "idx/reliability" not in tags["images"]  # no scores, no calibration
    image = acc.Images("confusion_matrix")[0]
    assert (image.step, image.width, image.height) == (3, 5 * 32, 5 * 32)
    text_tag = next(t for t in tags["tensors"] if t.startswith("confusion_matrix"))
    text = acc.Tensors(text_tag)[0].tensor_proto.string_val[0].decode()
    assert "| **eel** |" in text and "| target \\ predicted | ant | bee | cat | dog | eel |" in text
