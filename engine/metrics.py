"""Streaming, DDP-aware validation metrics built on ``kernels.classification`` / ``kernels.regression``.

``ClassificationMetrics(num_classes, *, top_k=5, ignore_index=None, ece_bins=15)``
    ``update(output, target)`` with logits ``[N, C]`` (any float dtype, incl. bf16; binary
    tasks as ``[N, 2]``) or class indices ``[N]`` (int), target ``[N]`` (int).
    ``compute()`` -> ``{"acc", "precision", "recall", "f1", f"top{top_k}", "ece"}``.

``RegressionMetrics()``
    ``update(output, target)`` with same-numel float tensors (flattened: one output).
    ``compute()`` -> ``{"mse", "rmse", "mae", "r2"}``.

Both: ``reset()``; ``to(device)``, or state allocated lazily on the device of the first
update; ``compute()`` may sync (once per epoch) and, when ``torch.distributed`` is
initialised with world size > 1, first combines the state of all ranks in ONE collective
(classification: every count and sum packed into one float64 buffer, ``all_reduce(SUM)``;
float64 is exact for counts below 2**53; regression: ``all_gather`` of each rank's
``[n, mean, M2, sse, sae]`` then a float64 Chan merge, because mean/M2 are not additive).
The local state is left untouched, so updates may continue after ``compute()``.

Definitions (equal to torchmetrics 1.9; the trainer adds the ``val/``/``test/`` prefix):

* ``acc``: ``MulticlassAccuracy(average="micro")``; prediction = argmax (first max on ties).
* ``precision``/``recall``/``f1``: ``Multiclass*(average="macro")``: per-class score with
  0/0 := 0, averaged over the classes with ``tp + fp + fn > 0`` only (classes absent from
  both predictions and targets are excluded); 0.0 when no class qualifies.
* ``top{k}``: ``MulticlassAccuracy(top_k=k, average="micro")``. Ties in the logits go to the
  lower class index (see ``kernels.classification``); torchmetrics' ``torch.topk`` tie choice
  is unspecified, so only exactly tied logits can differ. Reported only when
  ``num_classes > top_k``: torchmetrics refuses ``top_k > num_classes`` and with ``k == C``
  every row is trivially a hit, so the key is absent (as ``engine.task.Task.metric_names``
  expects); ``topk_accuracy(j)`` still gives any ``j <= top_k``.
* ``ece``: ``MulticlassCalibrationError(n_bins=ece_bins, norm="l1")`` on softmax
  probabilities, same bin edges. ``nan`` when no row was counted (torchmetrics too).
  torchmetrics skips its softmax when a whole batch already lies in [0, 1]; we always treat
  float input as logits. bf16/fp16 logits are handled in fp32 (torchmetrics would round
  the softmax to bf16), so compare against torchmetrics on ``logits.float()``.
* With index predictions ``top{k}`` and ``ece`` are absent (no scores to rank or calibrate);
  they are also absent if index and logit updates were mixed in one epoch.
* Every row ignored (``ignore_index``): acc/precision/recall/f1/top-k are 0.0, ece is nan,
  as in torchmetrics.
* ``num_classes == 1`` (torchmetrics refuses it): the same formulas, so with any counted rows
  acc = precision = recall = f1 = top-k = 1.0 and ece = 0.0.
* A target (or index prediction) outside ``[0, C)`` that is not ``ignore_index`` is skipped
  by the kernels without a sync and makes ``compute()`` raise ``ValueError``.
* Regression: ``MeanSquaredError``, its square root, ``MeanAbsoluteError``, ``R2Score``
  (incl. its rules: ``r2 = 1`` when ``sse <= 1e-4``, ``0`` when only ``tss <= 1e-4``); with
  fewer than 2 samples ``r2`` is nan (torchmetrics raises); with none, all four are nan.
"""

import math

import numpy as np
import torch
import torch.distributed as dist

from kernels.classification import DENSE_MAX_CLASSES, ClassificationStats, classification_stats
from kernels.regression import RegressionStats, merge_moments, regression_stats


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _collective_device() -> torch.device:
    """Device for a rank that never saw data: NCCL needs CUDA tensors, gloo takes CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class ClassificationMetrics:
    """Accuracy, macro precision/recall/F1, top-k accuracy and ECE in one streaming pass."""

    def __init__(
        self,
        num_classes: int,
        *,
        top_k: int = 5,
        ignore_index: int | None = None,
        ece_bins: int = 15,
        backend: str = "auto",
        dense_max_classes: int = DENSE_MAX_CLASSES,
    ):
        self._config = dict(top_k=top_k, ece_bins=ece_bins, dense_max_classes=dense_max_classes)
        ClassificationStats(num_classes, **self._config, device="meta")  # validate arguments now
        self._num_classes = int(num_classes)
        self.top_k = int(top_k)
        self.ignore_index = ignore_index
        self.ece_bins = int(ece_bins)
        self.backend = backend
        self._stats: ClassificationStats | None = None
        self._updates = [0, 0]  # batches with logits, batches with class indices
        self._snapshot: tuple[ClassificationStats, bool] | None = None

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def _new_stats(self, device) -> ClassificationStats:
        return ClassificationStats(self._num_classes, **self._config, device=device)

    def to(self, device) -> "ClassificationMetrics":
        self._stats = self._new_stats(device) if self._stats is None else self._stats.to(device)
        return self

    def reset(self) -> None:
        if self._stats is not None:
            self._stats.reset()
        self._updates = [0, 0]
        self._snapshot = None

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if self._stats is None:
            self._stats = self._new_stats(output.device)
        classification_stats(
            output,
            target.to(output.device),
            self._stats,
            ignore_index=self.ignore_index,
            backend=self.backend,
        )
        self._updates[0 if output.is_floating_point() else 1] += 1
        self._snapshot = None

    def compute(self) -> dict[str, float]:
        stats, scored = self._reduced()
        self._snapshot = (stats, scored)
        values = _classification_values(stats, scored)
        n_invalid = values.pop("n_invalid")
        if n_invalid:
            raise ValueError(
                f"{int(n_invalid)} rows had a target or predicted class outside [0, {self._num_classes}) "
                f"that is not ignore_index={self.ignore_index}"
            )
        top = values.pop("topk")
        if not scored:
            del values["ece"]
        elif self._num_classes > self.top_k:
            values = {
                **{k: values[k] for k in ("acc", "precision", "recall", "f1")},
                f"top{self.top_k}": top,
                "ece": values["ece"],
            }
        return values

    def topk_accuracy(self, k: int) -> float:
        """Top-``k`` accuracy (``k <= top_k``) from the state of the last ``compute()``
        (else the local state); no communication. nan when index predictions were used."""
        if not 1 <= k <= self.top_k:
            raise ValueError(f"k must be in [1, {self.top_k}], got {k}")
        st = self._view()
        scored = self._snapshot[1] if self._snapshot is not None else self._updates[1] == 0
        if not scored:
            return float("nan")
        hits, rows = torch.stack([st.rank_hist()[:k].sum(), st.n_valid()]).tolist()
        return float(_safe_div(hits, rows))

    def _reduced(self) -> tuple[ClassificationStats, bool]:
        """All ranks' state summed (a copy) and whether every batch came with logits."""
        world = _world_size()
        if self._stats is None:
            self._stats = self._new_stats(_collective_device() if world > 1 else "cpu")
        stats = self._stats.clone()
        updates = torch.tensor(self._updates, dtype=torch.float64, device=stats.device)
        if world > 1:
            flat = torch.cat([stats.counts.double(), stats.conf_sum, updates])
            dist.all_reduce(flat)  # the one collective
            n_counts = stats.counts.numel()
            stats.counts = flat[:n_counts].round().long()
            stats.conf_sum = flat[n_counts:-2].clone()
            updates = flat[-2:]
        logits_batches, index_batches = updates.tolist()
        return stats, index_batches == 0

    # ---- for plots: the state of the last compute() (all ranks), else the local state ----
    def _view(self) -> ClassificationStats:
        if self._snapshot is not None:
            return self._snapshot[0]
        return self._stats if self._stats is not None else self._new_stats("cpu")

    def confusion_matrix(self) -> torch.Tensor | None:
        """``[C, C]`` int64 (row = target, column = prediction); None when
        ``num_classes > dense_max_classes`` (only per-class counts are kept then).
        Reflects all ranks after ``compute()``; never communicates."""
        cm = self._view().confusion()
        return None if cm is None else cm.clone()

    def per_class_counts(self) -> dict[str, torch.Tensor]:
        """``{"tp", "fp", "fn"}``, each ``[C]`` int64."""
        tp, fp, fn = self._view().per_class()
        return {"tp": tp.clone(), "fp": fp.clone(), "fn": fn.clone()}

    def calibration_histogram(self) -> dict[str, torch.Tensor]:
        """Per confidence bin (``ece_bins`` equal-width bins plus a last one for confidence
        exactly 1.0): ``count``, ``correct`` (int64) and ``conf_sum`` (float64), plus the
        ``edges`` ``[ece_bins + 1]``."""
        st = self._view()
        return {
            "count": st.ece_count().clone(),
            "correct": st.ece_correct().clone(),
            "conf_sum": st.ece_conf_sum().clone(),
            "edges": st.boundaries.clone(),
        }


def _safe_div(num, den) -> np.ndarray:
    """``num / den`` (host numbers or arrays) with 0/0 (and x/0) := 0, like torchmetrics'
    ``_safe_divide``."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den != 0)


def _macro(score: np.ndarray, present: np.ndarray) -> float:
    return float(_safe_div(score[present].sum(), present.sum()))


def _classification_values(st: ClassificationStats, scored: bool) -> dict[str, float]:
    """All metric values from the counts.

    The few count vectors the formulas need are gathered into one float64 buffer (exact for
    counts below 2**53) and read to the host in a single transfer; the formulas then run in
    NumPy, where each costs about a microsecond instead of a device op.
    """
    parts = [
        *st.per_class(),
        st.n_valid().reshape(1),
        st.rank_hist(),
        st.ece_count(),
        st.ece_correct(),
        st.n_invalid().reshape(1),
        st.ece_conf_sum(),
    ]
    host = torch.cat(parts).double().cpu().numpy()  # cat promotes the int64 counts
    sizes = [part.numel() for part in parts]
    tp, fp, fn, (n,), rank_hist, count, correct, (n_invalid,), conf_sum = np.split(
        host, np.cumsum(sizes[:-1])
    )
    present = (tp + fp + fn) > 0
    acc_bin = _safe_div(correct, count)
    conf_bin = _safe_div(conf_sum, count)
    with np.errstate(invalid="ignore", divide="ignore"):  # no rows: nan, as torchmetrics
        ece = float((np.abs(acc_bin - conf_bin) * count / count.sum()).sum())
    return {
        "acc": float(_safe_div(tp.sum(), n)),
        "precision": _macro(_safe_div(tp, tp + fp), present),
        "recall": _macro(_safe_div(tp, tp + fn), present),
        "f1": _macro(_safe_div(2 * tp, 2 * tp + fp + fn), present),
        "topk": float(_safe_div(rank_hist.sum(), n)),
        "ece": ece,
        "n_invalid": float(n_invalid),
    }


class RegressionMetrics:
    """MSE, RMSE, MAE and R^2, streamed with a numerically stable float64 state."""

    def __init__(self, *, backend: str = "auto"):
        self.backend = backend
        self._stats: RegressionStats | None = None

    def to(self, device) -> "RegressionMetrics":
        self._stats = RegressionStats(device) if self._stats is None else self._stats.to(device)
        return self

    def reset(self) -> None:
        if self._stats is not None:
            self._stats.reset()

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        if self._stats is None:
            self._stats = RegressionStats(output.device)
        regression_stats(output, target.to(output.device), self._stats, backend=self.backend)

    def state(self) -> torch.Tensor:
        """All ranks' ``[n, mean, m2, sse, sae]`` (float64), merged; one collective."""
        world = _world_size()
        if self._stats is None:
            self._stats = RegressionStats(_collective_device() if world > 1 else "cpu")
        local = self._stats.state.clone()
        if world == 1:
            return local
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)
        return merge_moments(torch.stack(gathered))

    def compute(self) -> dict[str, float]:
        n, _, tss, sse, sae = self.state().tolist()
        return _regression_values(n, tss, sse, sae)


def _regression_values(n: float, tss: float, sse: float, sae: float) -> dict[str, float]:
    if n == 0:
        return {"mse": math.nan, "rmse": math.nan, "mae": math.nan, "r2": math.nan}
    mse = sse / n
    # torchmetrics R2Score: isclose(x, 0, atol=1e-4) decides the degenerate cases.
    if n < 2:
        r2 = math.nan
    elif sse <= 1e-4:
        r2 = 1.0
    elif abs(tss) <= 1e-4:
        r2 = 0.0
    else:
        r2 = 1.0 - sse / tss
    return {"mse": mse, "rmse": math.sqrt(mse), "mae": sae / n, "r2": r2}
