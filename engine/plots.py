"""Pure-numpy figures for TensorBoard: confusion-matrix heatmap and reliability diagram.

Images are ``[H, W, 3]`` uint8 arrays for ``SummaryWriter.add_image(..., dataformats="HWC")``.
There is no matplotlib (not a project dependency) and no font rendering, so numbers and class
names go to a markdown table logged with ``add_text`` instead of onto the image.

``log_classification_figures(writer, metrics, class_names, step)`` writes, from the state of
the last ``metrics.compute()`` (so all DDP ranks' data; it never communicates itself):

* ``confusion_matrix`` image: row-normalised heatmap (each target row sums to 1: the colour
  is the recall-style fraction, readable whatever the class imbalance), viridis colours.
* ``confusion_matrix`` text: the raw counts as a markdown table with class names.
* ``reliability`` image: per confidence bin, the accuracy (blue bar), the gap to the mean
  confidence (red), the diagonal of perfect calibration (grey), and beneath the plot the
  share of rows per bin (grey bars). Skipped when no row with logits was counted.

Large C: with more than ``MAX_FULL_CLASSES`` (50) classes a full heatmap is unreadable. Then
the image shows only the sub-matrix of the (up to 20) classes most involved in confusions,
and the table lists the 20 most frequent (target, predicted) confusions. When the metrics keep
no confusion matrix (``num_classes > dense_max_classes``, per-class counts only) there is no
image and the table lists the 20 classes with the lowest recall.
"""

import numpy as np

MAX_FULL_CLASSES = 50
TOP_CONFUSIONS = 20

# viridis sampled at 0, 0.25, 0.5, 0.75, 1: linear interpolation is close enough for a heatmap.
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)
_WHITE, _BLACK, _GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)
_BLUE, _RED = (31, 119, 180), (214, 39, 40)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped; nan -> 0) to viridis RGB, shape ``values.shape + (3,)``."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0)
    anchors = np.linspace(0.0, 1.0, len(_VIRIDIS))
    rgb = [np.interp(v, anchors, _VIRIDIS[:, ch]) for ch in range(3)]
    return np.rint(np.stack(rgb, axis=-1)).astype(np.uint8)


def _row_normalise(cm: np.ndarray) -> np.ndarray:
    rows = cm.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)


def confusion_matrix_image(cm: np.ndarray, *, max_size: int = 512, gap: bool = True) -> np.ndarray:
    """Heatmap of a ``[C, C]`` count matrix (row = target), rows normalised to sum to 1.

    Each cell is ``max(4, min(32, max_size // C))`` pixels square; cells get a 1-pixel dark
    separator when they are at least 8 pixels wide so neighbouring equal cells stay legible.
    """
    cm = np.asarray(cm)
    c = cm.shape[0]
    cell = max(4, min(32, max_size // max(c, 1)))
    colours = colormap(_row_normalise(cm))  # [C, C, 3]
    img = np.repeat(np.repeat(colours, cell, axis=0), cell, axis=1)
    if gap and cell >= 8:
        img[::cell, :, :] = 30
        img[:, ::cell, :] = 30
    return np.ascontiguousarray(img)


def _fill(img, x0, x1, y0, y1, colour, alpha=1.0):
    """Blend a solid colour into ``img[y0:y1, x0:x1]`` (integer pixel bounds, clipped)."""
    h, w = img.shape[:2]
    x0, x1 = max(0, int(x0)), min(w, int(x1))
    y0, y1 = max(0, int(y0)), min(h, int(y1))
    if x1 <= x0 or y1 <= y0:
        return
    region = img[y0:y1, x0:x1].astype(np.float64)
    img[y0:y1, x0:x1] = np.rint((1 - alpha) * region + alpha * np.asarray(colour)).astype(np.uint8)


def _display_bins(count, correct, conf_sum):
    """Fold the extra 'confidence == 1.0' slot into the last real bin for display."""
    count, correct, conf_sum = (
        np.asarray(a, dtype=np.float64).copy() for a in (count, correct, conf_sum)
    )
    if len(count) > 1:
        for arr in (count, correct, conf_sum):
            arr[-2] += arr[-1]
        count, correct, conf_sum = count[:-1], correct[:-1], conf_sum[:-1]
    return count, correct, conf_sum


def reliability_diagram_image(
    count, correct, conf_sum, *, size: int = 256, margin: int = 12
) -> np.ndarray:
    """Reliability diagram from per-bin ``count``, ``correct`` and ``conf_sum`` arrays
    (length ``n_bins + 1`` as kept by ``ClassificationMetrics``: equal-width bins over
    [0, 1] plus one for confidence exactly 1.0)."""
    count, correct, conf_sum = _display_bins(count, correct, conf_sum)
    n_bins = len(count)
    strip = size // 6  # histogram of row shares under the plot
    img = np.full((size + strip + 3 * margin, size + 2 * margin, 3), 255, dtype=np.uint8)
    x_of = lambda v: margin + v * size
    y_of = lambda v: margin + (1.0 - v) * size  # image rows grow downwards
    acc = np.divide(correct, count, out=np.zeros_like(count), where=count > 0)
    conf = np.divide(conf_sum, count, out=np.zeros_like(count), where=count > 0)
    share = count / count.max() if count.max() > 0 else count
    strip_bottom = size + strip + 2 * margin
    for i in range(n_bins):
        x0, x1 = x_of(i / n_bins) + 1, x_of((i + 1) / n_bins) - 1
        if count[i] > 0:
            _fill(img, x0, x1, y_of(acc[i]), y_of(0.0), _BLUE)
            lo, hi = sorted((acc[i], conf[i]))
            if hi > lo:  # at least one pixel, so a small gap stays visible
                _fill(img, x0, x1, y_of(hi), max(y_of(lo), y_of(hi) + 1), _RED, alpha=0.6)
        _fill(img, x0, x1, strip_bottom - share[i] * strip, strip_bottom, _GREY)
    _draw_diagonal(img, size, margin)
    _fill(img, margin - 1, margin, margin, margin + size + 1, _BLACK)  # y axis
    _fill(img, margin - 1, margin + size + 1, margin + size, margin + size + 1, _BLACK)  # x axis
    return img


def _draw_diagonal(img, size, margin):
    """Perfect-calibration line y = x, 2 pixels thick, drawn over the bars."""
    cols = np.arange(size)
    rows = margin + size - 1 - cols
    for dy in (0, 1):
        img[np.clip(rows + dy, 0, img.shape[0] - 1), margin + cols] = (90, 90, 90)


# ---- markdown tables ------------------------------------------------------------------
def _escape(name: str) -> str:
    return str(name).replace("|", "\\|").replace("\n", " ")


def class_names_or_default(class_names, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return [_escape(n) for n in class_names]


def confusion_matrix_markdown(cm: np.ndarray, class_names: list[str]) -> str:
    """Full count table: one row per target class, one column per predicted class."""
    cm = np.asarray(cm)
    header = "| target \\ predicted | " + " | ".join(class_names) + " |"
    rule = "|---" * (len(class_names) + 1) + "|"
    rows = [
        f"| **{name}** | " + " | ".join(str(int(v)) for v in cm[i]) + " |"
        for i, name in enumerate(class_names)
    ]
    return "\n".join([header, rule, *rows])


def top_confusions(cm: np.ndarray, k: int = TOP_CONFUSIONS) -> list[tuple[int, int, int]]:
    """The ``k`` largest off-diagonal cells as ``(target, predicted, count)``, count > 0."""
    off = np.asarray(cm, dtype=np.int64).copy()
    np.fill_diagonal(off, 0)
    flat = off.ravel()
    k = min(k, int((flat > 0).sum()))
    order = np.argsort(-flat, kind="stable")[:k]
    c = off.shape[0]
    return [(int(i // c), int(i % c), int(flat[i])) for i in order]


def top_confusions_markdown(cm: np.ndarray, class_names: list[str], k: int = TOP_CONFUSIONS) -> str:
    support = np.asarray(cm).sum(axis=1)
    lines = ["| target | predicted | count | share of target |", "|---|---|---|---|"]
    for t, p, n in top_confusions(cm, k):
        lines.append(f"| {class_names[t]} | {class_names[p]} | {n} | {n / support[t]:.4f} |")
    return "\n".join(lines)


def most_confused_classes(cm: np.ndarray, k: int = TOP_CONFUSIONS) -> list[int]:
    """Up to ``k`` distinct classes from the largest confusions, in order of appearance."""
    classes: list[int] = []
    for t, p, _ in top_confusions(cm, cm.shape[0] * cm.shape[0]):
        for c in (t, p):
            if c not in classes and len(classes) < k:
                classes.append(c)
        if len(classes) >= k:
            break
    return classes


def worst_classes_markdown(tp, fp, fn, class_names: list[str], k: int = TOP_CONFUSIONS) -> str:
    """Per-class table of the ``k`` classes with the lowest recall (among those with support)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    support = tp + fn
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    candidates = np.flatnonzero(support > 0)
    order = candidates[np.argsort(recall[candidates], kind="stable")][:k]
    lines = ["| class | support | recall | precision |", "|---|---|---|---|"]
    for c in order:
        lines.append(
            f"| {class_names[c]} | {int(support[c])} | {recall[c]:.4f} | {precision[c]:.4f} |"
        )
    return "\n".join(lines)


# ---- TensorBoard -----------------------------------------------------------------------
def confusion_figures(metrics, class_names) -> tuple[np.ndarray | None, str]:
    """(heatmap image or None, markdown table) for a ``ClassificationMetrics``."""
    names = class_names_or_default(class_names, metrics.num_classes)
    cm = metrics.confusion_matrix()
    if cm is None:
        counts = {k: v.cpu().numpy() for k, v in metrics.per_class_counts().items()}
        table = worst_classes_markdown(counts["tp"], counts["fp"], counts["fn"], names)
        return (
            None,
            f"Lowest-recall classes ({metrics.num_classes} classes, per-class counts only)\n\n{table}",
        )
    cm = cm.cpu().numpy()
    if metrics.num_classes <= MAX_FULL_CLASSES:
        return confusion_matrix_image(cm), confusion_matrix_markdown(cm, names)
    classes = most_confused_classes(cm)
    image = confusion_matrix_image(cm[np.ix_(classes, classes)]) if classes else None
    sub = ", ".join(names[c] for c in classes)
    text = f"Most confused pairs of {metrics.num_classes} classes (image rows/columns: {sub})\n\n"
    return image, text + top_confusions_markdown(cm, names)


def log_classification_figures(
    writer, metrics, class_names: list[str] | None, step: int, *, prefix: str = ""
) -> None:
    """Write ``confusion_matrix`` (image and text) and ``reliability`` (image) to ``writer``."""
    image, table = confusion_figures(metrics, class_names)
    if image is not None:
        writer.add_image(prefix + "confusion_matrix", image, step, dataformats="HWC")
    writer.add_text(prefix + "confusion_matrix", table, step)
    hist = {k: v.cpu().numpy() for k, v in metrics.calibration_histogram().items()}
    if hist["count"].sum() > 0:
        image = reliability_diagram_image(hist["count"], hist["correct"], hist["conf_sum"])
        writer.add_image(prefix + "reliability", image, step, dataformats="HWC")


# ---- more figures, and PNG files for reports ----------------------------------------------
def png_bytes(img: np.ndarray) -> bytes:
    """An ``[H, W, 3]`` uint8 image as a PNG file (zlib + struct: no imaging library needed)."""
    import struct
    import zlib

    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[row].tobytes() for row in range(h))  # filter 0 per scanline

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def histogram_image(counts, *, size: int = 256, margin: int = 12) -> np.ndarray:
    """Bars of ``counts`` (equal-width bins left to right), scaled to the largest."""
    counts = np.asarray(counts, dtype=np.float64)
    img = np.full((size + 2 * margin, size + 2 * margin, 3), 255, dtype=np.uint8)
    top = counts.max() if len(counts) and counts.max() > 0 else 1.0
    n = max(len(counts), 1)
    for i, c in enumerate(counts):
        x0, x1 = margin + i * size / n + 1, margin + (i + 1) * size / n - 1
        _fill(img, x0, x1, margin + (1 - c / top) * size, margin + size, _BLUE)
    _fill(img, margin - 1, margin + size + 1, margin + size, margin + size + 1, _BLACK)
    return img


def residual_image(predicted, residual, *, size: int = 256, margin: int = 12) -> np.ndarray:
    """Residual (target - prediction) against prediction, one dot per row, zero line in grey."""
    p, r = np.asarray(predicted, np.float64), np.asarray(residual, np.float64)
    img = np.full((size + 2 * margin, size + 2 * margin, 3), 255, dtype=np.uint8)
    span = lambda v: (v.min(), v.max() - v.min() or 1.0)  # noqa: E731
    (p0, pw), bound = span(p), max(float(np.abs(r).max()), 1e-12)
    zero = margin + size / 2
    _fill(img, margin, margin + size, zero, zero + 1, _GREY)
    xs = margin + (p - p0) / pw * (size - 2)
    ys = zero - r / bound * (size / 2 - 2)
    for x, y in zip(xs, ys):
        _fill(img, x, x + 2, y, y + 2, _BLUE, alpha=0.7)
    return img
