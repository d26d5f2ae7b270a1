"""One-pass streaming statistics for multiclass classification metrics.

Everything accuracy, macro precision/recall/F1, top-k accuracy and the expected calibration
error need is accumulated from a single read of the logits, with no host synchronisation:

* confusion counts: a dense ``[C, C]`` matrix when ``C <= dense_max_classes`` (default 256,
  512 KiB of int64), otherwise per-class ``tp``, ``pred_count`` and ``target_count`` vectors,
  so memory stays ``O(C)`` for large vocabularies (``fp = pred_count - tp``,
  ``fn = target_count - tp``);
* a histogram of the target's *rank* among the logits, for ranks ``< top_k``: one histogram
  gives top-j accuracy for every ``j <= top_k`` with no sort;
* a calibration histogram over ``ece_bins`` equal-width confidence bins (plus one slot for a
  confidence of exactly 1.0, as torchmetrics' ``bucketize(right=True)`` binning does): per bin
  the row count, the number of correct rows and the sum of confidences (float64).

Inputs: ``preds`` is either logits ``[N, C]`` (any float dtype; bf16/fp16 are upcast to fp32,
fp64 is kept) or class indices ``[N]`` (any integer dtype); ``target`` is ``[N]`` integer.
Rows whose target equals ``ignore_index`` are skipped. Rows with a target (or index
prediction) outside ``[0, C)`` that is not ignored are skipped and counted in ``n_invalid``,
so the caller can raise at compute time instead of syncing on every update.

Conventions, chosen to equal torchmetrics where torchmetrics is deterministic:

* prediction = first index of the maximum logit (``torch.argmax``);
* confidence = max softmax probability = ``1 / sum(exp(x - max))``, computed in fp32 (fp64 for
  fp64 logits, then rounded to fp32 like torchmetrics' ``confidences.float()``), binned by
  ``torch.bucketize(conf, torch.linspace(0, 1, ece_bins + 1), right=True) - 1``;
* rank of the target = number of logits strictly greater than the target's logit plus the
  number of *equal* logits at a lower class index. So ties are broken towards the lower index,
  exactly like ``argmax``: rank 0 <=> prediction == target, and top-1 == accuracy. torchmetrics
  uses ``torch.topk``, whose choice among tied logits is unspecified (on CPU it is not the
  lowest index), so with exact ties in the logits top-k may differ from torchmetrics; without
  ties the two agree exactly.

Backends (``backend=``): ``"auto"`` uses the Triton kernel for CUDA tensors when Triton
imports and the PyTorch fallback otherwise; ``"triton"`` forces the kernel (CPU tensors need
``TRITON_INTERPRET=1``); ``"torch"`` forces the fallback. Triton is optional: without it this
module imports and the fallback works.

Exactness of counts: the kernel accumulates each call into an int32 scratch buffer (one call
has fewer than 2**31 rows, checked) which is then added to the int64 state, so counts are exact
far beyond 1e9 rows in total; confidence sums are float64.
"""

import functools

import torch

from kernels._common import LazyJit, next_power_of_2, pick_backend, tl, triton

DENSE_MAX_CLASSES = 256


# --------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------
class ClassificationStats:
    """Accumulated classification statistics, as two flat buffers plus views.

    ``counts`` (int64) holds, in order: the dense confusion matrix ``[C*C]`` (row = target,
    column = prediction) or the per-class ``tp | pred_count | target_count`` ``[3C]``; the
    rank histogram ``[top_k]``; calibration bin counts ``[ece_bins + 1]``; calibration bin
    correct counts ``[ece_bins + 1]``; ``n_invalid`` ``[1]``; and one trailing scratch slot
    that masked-out rows are sent to (so updates need no boolean indexing, hence no sync).
    ``conf_sum`` (float64) holds the per-bin confidence sums ``[ece_bins + 1]`` plus a
    scratch slot. Flat buffers make the DDP reduction one collective and reset one fill.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        top_k: int = 5,
        ece_bins: int = 15,
        dense_max_classes: int = DENSE_MAX_CLASSES,
        device: torch.device | str | None = None,
    ):
        if num_classes < 1 or top_k < 1 or ece_bins < 1:
            raise ValueError("num_classes, top_k and ece_bins must all be >= 1")
        self.num_classes = int(num_classes)
        self.top_k = int(top_k)
        self.ece_bins = int(ece_bins)
        self.dense = self.num_classes <= dense_max_classes
        c, b = self.num_classes, self.ece_bins
        self.off_topk = c * c if self.dense else 3 * c
        self.off_ece_count = self.off_topk + self.top_k
        self.off_ece_correct = self.off_ece_count + b + 1
        self.off_invalid = self.off_ece_correct + b + 1
        self.n_counts = self.off_invalid + 1  # excluding the scratch slot
        self.counts = torch.zeros(self.n_counts + 1, dtype=torch.int64, device=device)
        self.conf_sum = torch.zeros(b + 2, dtype=torch.float64, device=device)
        # Same float32 edges as torchmetrics' linspace, so bin membership matches bit for bit.
        self.boundaries = torch.linspace(0, 1, b + 1, dtype=torch.float32, device=device)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def to(self, device) -> "ClassificationStats":
        self.counts = self.counts.to(device)
        self.conf_sum = self.conf_sum.to(device)
        self.boundaries = self.boundaries.to(device)
        return self

    def reset(self) -> None:
        self.counts.zero_()
        self.conf_sum.zero_()

    def clone(self) -> "ClassificationStats":
        out = object.__new__(ClassificationStats)
        out.__dict__.update(self.__dict__)
        out.counts, out.conf_sum = self.counts.clone(), self.conf_sum.clone()
        return out

    # ---- views (no copies except where derived) ----
    def confusion(self) -> torch.Tensor | None:
        """``[C, C]`` int64 (row = target, column = prediction), or None in per-class mode."""
        c = self.num_classes
        return self.counts[: c * c].view(c, c) if self.dense else None

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tp, fp, fn)``, each ``[C]`` int64."""
        c = self.num_classes
        if self.dense:
            cm = self.confusion()
            tp = cm.diagonal()
            return tp, cm.sum(0) - tp, cm.sum(1) - tp
        tp, pred_count, target_count = self.counts[: 3 * c].view(3, c)
        return tp, pred_count - tp, target_count - tp

    def n_valid(self) -> torch.Tensor:
        """Number of counted (not ignored, valid) rows, 0-d int64."""
        c = self.num_classes
        return self.counts[: c * c].sum() if self.dense else self.counts[2 * c : 3 * c].sum()

    def rank_hist(self) -> torch.Tensor:
        """``[top_k]``: rows whose target had rank r (0 = predicted)."""
        return self.counts[self.off_topk : self.off_ece_count]

    def ece_count(self) -> torch.Tensor:
        return self.counts[self.off_ece_count : self.off_ece_correct]

    def ece_correct(self) -> torch.Tensor:
        return self.counts[self.off_ece_correct : self.off_invalid]

    def ece_conf_sum(self) -> torch.Tensor:
        return self.conf_sum[: self.ece_bins + 1]

    def n_invalid(self) -> torch.Tensor:
        return self.counts[self.off_invalid]


# --------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------
def classification_stats(
    preds: torch.Tensor,
    target: torch.Tensor,
    stats: ClassificationStats,
    *,
    ignore_index: int | None = None,
    backend: str = "auto",
) -> None:
    """Accumulate one batch into ``stats`` in place (no host sync on the Triton path).

    ``preds``: logits ``[N, C]`` (float) or class indices ``[N]`` (integer). With indices the
    rank and calibration histograms are left untouched. ``target``: ``[N]`` integer.
    """
    preds, target = _check_inputs(preds, target, stats.num_classes)
    if target.numel() == 0:
        return
    if stats.device != preds.device:
        raise ValueError(f"stats live on {stats.device} but inputs on {preds.device}")
    if pick_backend(preds, backend) == "triton":
        _triton_update(preds, target, stats, ignore_index)
    else:
        _torch_update(preds, target, stats, ignore_index)


def _check_inputs(preds, target, num_classes):
    preds, target = preds.detach(), target.detach().reshape(-1)
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if preds.is_floating_point():
        if preds.ndim != 2 or preds.shape[1] != num_classes:
            raise ValueError(f"logits must be [N, {num_classes}], got {tuple(preds.shape)}")
        if preds.shape[0] != target.numel():
            raise ValueError(f"{preds.shape[0]} logit rows but {target.numel()} targets")
    else:
        preds = preds.reshape(-1)
        if preds.numel() != target.numel():
            raise ValueError(f"{preds.numel()} predictions but {target.numel()} targets")
    if target.numel() >= 2**31:
        raise ValueError("split batches of 2**31 rows or more (per-call counters are int32)")
    return preds, target


# --------------------------------------------------------------------------------------
# PyTorch fallback
# --------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 20  # rows per chunk * C: keeps the several passes over a chunk in cache


def _torch_update(preds, target, st: ClassificationStats, ignore_index):
    """Vectorised fallback. Logits go through in row chunks (a Python loop over chunks of
    ~1M logits, never over rows) that reuse one workspace, so each pass over a chunk hits the
    cache and no chunk-sized buffer is allocated (and page-faulted) per chunk."""
    if not preds.is_floating_point():
        _torch_indices(preds, target, st, ignore_index)
        return
    # at least 64 rows, so vocabulary-sized C does not pay per-chunk Python overhead per row
    rows = max(1, min(target.numel(), max(64, _CHUNK_ELEMENTS // st.num_classes)))
    ws = _Workspace(rows, st.num_classes, preds)
    for start in range(0, target.numel(), rows):
        chunk = slice(start, start + rows)
        _torch_logits_chunk(preds[chunk], target[chunk], st, ignore_index, ws)


class _Workspace:
    """Reusable ``[rows, C]`` buffers in the compute dtype (fp64 for fp64 logits, else fp32).

    ``scratch`` takes every elementwise result (comparisons written as 0.0/1.0 floats and
    summed: on CPU that is ~4x faster than summing a bool tensor, which converts it first);
    ``upcast`` holds 16-bit logits converted to fp32 (exact).
    """

    def __init__(self, rows, num_classes, preds):
        dtype = torch.float64 if preds.dtype == torch.float64 else torch.float32
        self.scratch = torch.empty(rows, num_classes, dtype=dtype, device=preds.device)
        self.upcast = None if preds.dtype == dtype else torch.empty_like(self.scratch)
        # num_classes - column: the largest weight marks the first column (exact below 2**24)
        self.first_col_weight = torch.arange(num_classes, 0, -1, dtype=dtype, device=preds.device)

    def view(self, rows):
        return self.scratch[:rows]


def _row_masks(target, num_classes, ignore_index, extra_ok=None):
    """(valid, invalid) row masks: invalid = not ignored but out of range."""
    ok = (target >= 0) & (target < num_classes)
    if extra_ok is not None:
        ok &= extra_ok
    if ignore_index is None:
        return ok, ~ok
    kept = target != ignore_index
    return ok & kept, kept & ~ok


def _confusion_index(st, t, pred, valid, correct):
    """Flat indices into ``st.counts`` for the confusion part (scratch slot when masked)."""
    trash = st.n_counts
    c = st.num_classes
    if st.dense:
        return [torch.where(valid, t * c + pred, trash)]
    return [
        torch.where(correct, t, trash),
        torch.where(valid, pred + c, trash),
        torch.where(valid, t + 2 * c, trash),
    ]


def _accumulate(st, index_parts):
    idx = torch.cat(index_parts)
    st.counts.index_add_(0, idx, torch.ones(idx.numel(), dtype=torch.int64, device=idx.device))


def _torch_indices(pred, target, st, ignore_index):
    c = st.num_classes
    pred_ok = (pred >= 0) & (pred < c)
    valid, invalid = _row_masks(target, c, ignore_index, pred_ok)
    t = torch.where(valid, target, 0).long()
    p = torch.where(valid, pred, 0).long()
    parts = _confusion_index(st, t, p, valid, valid & (p == t))
    parts.append(torch.where(invalid, st.off_invalid, st.n_counts))
    _accumulate(st, parts)


def _torch_logits_chunk(x, target, st, ignore_index, ws: _Workspace):
    c, trash = st.num_classes, st.n_counts
    if ws.upcast is not None:
        x = ws.upcast[: x.shape[0]].copy_(x)  # exact upcast; softmax and comparisons in fp32
    buf = ws.view(x.shape[0])
    valid, invalid = _row_masks(target, c, ignore_index)
    t = torch.where(valid, target, 0).long()
    m = torch.amax(x, dim=1)
    pred = _first_argmax(x, m, buf, ws.first_col_weight)
    x_t = x.gather(1, t[:, None])
    greater = _count(torch.gt(x, x_t, out=buf))
    rank = greater + _tie_count(x, x_t, t, greater, st.top_k, buf)
    conf = _max_softmax(x, m, buf)
    bins = torch.bucketize(conf, st.boundaries, right=True) - 1
    correct = valid & (pred == t)
    parts = _confusion_index(st, t, pred, valid, correct)
    parts += [
        torch.where(valid & (rank < st.top_k), rank + st.off_topk, trash),
        torch.where(valid, bins + st.off_ece_count, trash),
        torch.where(correct, bins + st.off_ece_correct, trash),
        torch.where(invalid, st.off_invalid, trash),
    ]
    _accumulate(st, parts)
    st.conf_sum.index_add_(0, torch.where(valid, bins, st.ece_bins + 1), conf.double())


def _count(mask_as_float):
    """Row sums of a 0/1 float matrix as int64 (exact: counts < 2**24)."""
    return mask_as_float.sum(1).long()


def _first_argmax(x, m, buf, first_col_weight):
    """``torch.argmax`` (first index of the max) as compare, weight, amax: ~3x faster on CPU
    than ``torch.max(dim=1)`` with indices. NaN rows give some valid index (never out of range)."""
    torch.eq(x, m[:, None], out=buf).mul_(first_col_weight)
    return (x.shape[1] - buf.amax(1).long()).clamp_(0, x.shape[1] - 1)


def _max_softmax(x, m, buf):
    """Max softmax probability ``1 / sum(exp(x - max))``, rounded to fp32 like torchmetrics."""
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf rows: no nan
    torch.sub(x, shift[:, None], out=buf).exp_()
    return buf.sum(1).reciprocal_().float()


def _tie_count(x, x_t, t, greater, top_k, buf):
    """Number of logits equal to the target's at a lower class index (the tie-break rule).

    On CPU a cheap count of ties first finds the (usually no) rows that need the exact
    index-aware count; elsewhere the dense masked count avoids a device->host sync.
    """
    if x.device.type != "cpu":
        return _dense_tie_count(x, x_t, t)
    ties = _count(torch.eq(x, x_t, out=buf)) - 1  # minus the target itself
    rows = ((ties > 0) & (greater < top_k)).nonzero().squeeze(1)
    out = torch.zeros_like(greater)
    if rows.numel():
        out[rows] = _dense_tie_count(x[rows], x_t[rows], t[rows])
    return out


def _dense_tie_count(x, x_t, t):
    cols = torch.arange(x.shape[1], device=x.device)
    return ((x == x_t) & (cols[None, :] < t[:, None])).sum(1)


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------
_TILE = 4096  # logits per [BLOCK_N, BLOCK_C] tile: enough loads in flight, modest registers
_LOCAL_CONFUSION_MAX = 256  # dense C*C (rounded up) reduced in registers before the atomics
# Smallest block extent: C = 1 or top_k = 1 still gets 2-wide (masked) blocks, not 1-wide ones.
_MIN_EXTENT = 2


def _launch_config(num_classes: int, has_logits: bool, st: ClassificationStats) -> dict:
    """Block sizes: one row tile loops over C in BLOCK_C chunks; small C gets many rows."""
    cc_pow2 = next_power_of_2(num_classes * num_classes, floor=_MIN_EXTENT)
    local_cm = st.dense and cc_pow2 <= _LOCAL_CONFUSION_MAX
    if has_logits:
        block_c = min(next_power_of_2(num_classes, floor=_MIN_EXTENT), 1024)
        block_n = max(1, min(128, _TILE // block_c))
    else:
        block_c, block_n = _MIN_EXTENT, 256
    if local_cm:  # the one-hot [BLOCK_N, CC_POW2] reduction must stay small too
        block_n = max(1, min(block_n, 16384 // cc_pow2))
    return dict(
        HAS_LOGITS=has_logits,
        DENSE=st.dense,
        LOCAL_CM=local_cm,
        CC_POW2=cc_pow2 if local_cm else _MIN_EXTENT,
        TOP_K=st.top_k,
        K_POW2=next_power_of_2(st.top_k, floor=_MIN_EXTENT),
        N_BINS=st.ece_bins,
        BINS_POW2=next_power_of_2(st.ece_bins + 1, floor=_MIN_EXTENT),
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        num_warps=8 if block_n * block_c >= 4096 else 4,
    )


def _grid_size(n_rows: int, block_n: int, device: torch.device, max_programs: int | None):
    """Persistent-style grid: each program strides over row blocks and issues its histogram
    atomics once at the end, so same-address atomic traffic is O(programs), not O(rows)."""
    blocks = triton.cdiv(n_rows, block_n)
    if max_programs is None:
        # interpreter: programs run one after another anyway
        max_programs = 8 * _sm_count(device.index) if device.type == "cuda" else 4
    return max(1, min(blocks, max_programs))


@functools.cache
def _sm_count(index: int | None) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _triton_update(preds, target, st, ignore_index, max_programs=None):
    has_logits = preds.is_floating_point()
    if has_logits and preds.stride(1) != 1:
        preds = preds.contiguous()
    target = target.contiguous()
    cfg = _launch_config(st.num_classes, has_logits, st)
    n = target.numel()
    scratch = torch.zeros(st.n_counts, dtype=torch.int32, device=preds.device)
    conf_scratch = torch.zeros(st.ece_bins + 1, dtype=torch.float64, device=preds.device)
    grid = (_grid_size(n, cfg["BLOCK_N"], preds.device, max_programs),)
    _cls_stats[grid](
        preds,
        preds.stride(0),
        target,
        n,
        st.num_classes,
        0 if ignore_index is None else int(ignore_index),
        st.boundaries,
        scratch,
        conf_scratch,
        st.off_topk,
        st.off_ece_count,
        st.off_ece_correct,
        st.off_invalid,
        HAS_IGNORE=ignore_index is not None,
        DTYPE=tl.float64 if preds.dtype == torch.float64 else tl.float32,
        **cfg,
    )
    st.counts[: st.n_counts] += scratch
    st.conf_sum[: st.ece_bins + 1] += conf_scratch


def _row_softmax_argmax_rank(
    x_ptr,
    stride_xn,
    rows,
    row_ok,
    t,
    x_t,
    C,
    DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One sweep over C for a row tile: online max / first argmax / sum-exp and the
    target's tie-broken rank. Returns (pred, confidence, rank)."""
    m = tl.full([BLOCK_N], float("-inf"), DTYPE)
    s = tl.zeros([BLOCK_N], DTYPE)
    arg = tl.zeros([BLOCK_N], tl.int32)
    rank = tl.zeros([BLOCK_N], tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (cols < C)[None, :]
        x = tl.load(
            x_ptr + rows[:, None] * stride_xn + cols[None, :], mask=mask, other=float("-inf")
        )
        x = x.to(DTYPE)
        # first column reaching the block max (one fused reduction); across blocks a
        # later block must be strictly larger, so ties keep the lowest index (argmax rule)
        blk_max, blk_arg = tl.max(
            x, axis=1, return_indices=True, return_indices_tie_break_left=True
        )
        arg = tl.where(blk_max > m, c0 + blk_arg, arg)
        new_m = tl.maximum(m, blk_max)
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)  # all -inf so far: avoid nan
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        m = new_m
        before = (x > x_t[:, None]) | ((x == x_t[:, None]) & (cols[None, :] < t[:, None]))
        rank += tl.sum(before.to(tl.int32), axis=1)
    s = tl.where(s > 0, s, 1.0)  # padding rows (and all -inf rows) would divide by zero
    return arg, (1.0 / s).to(tl.float32), rank


def _bin_index(conf, bounds_ptr, N_BINS: tl.constexpr, BINS_POW2: tl.constexpr):
    """bucketize(conf, linspace(0, 1, N_BINS + 1), right=True) - 1 = #edges[1:] <= conf."""
    j = tl.arange(0, BINS_POW2)
    edges = tl.load(bounds_ptr + j, mask=(j >= 1) & (j <= N_BINS), other=float("inf"))
    return tl.sum((conf[:, None] >= edges[None, :]).to(tl.int32), axis=1)


def _histogram(values, keep, SIZE: tl.constexpr):
    """Block-local histogram of ``values`` (rows where ``keep``) over [0, SIZE)."""
    onehot = (values[:, None] == tl.arange(0, SIZE)[None, :]) & keep[:, None]
    return tl.sum(onehot.to(tl.int32), axis=0)


def _flush(ptr, acc, size, SIZE: tl.constexpr):
    """Add a register histogram into global memory, skipping empty lanes."""
    j = tl.arange(0, SIZE)
    tl.atomic_add(ptr + j, acc, mask=(j < size) & (acc != 0))


def _cls_stats_kernel(
    x_ptr,
    stride_xn,
    t_ptr,
    N,
    C,
    ignore_index,
    bounds_ptr,
    cnt_ptr,
    conf_ptr,
    off_topk,
    off_ece_count,
    off_ece_correct,
    off_invalid,
    HAS_IGNORE: tl.constexpr,
    HAS_LOGITS: tl.constexpr,
    DENSE: tl.constexpr,
    LOCAL_CM: tl.constexpr,
    CC_POW2: tl.constexpr,
    TOP_K: tl.constexpr,
    K_POW2: tl.constexpr,
    N_BINS: tl.constexpr,
    BINS_POW2: tl.constexpr,
    DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Persistent program: strides over row blocks, keeps every histogram in registers, and
    adds them to ``cnt_ptr`` / ``conf_ptr`` once at the end.

    One function: a Triton kernel is one launch; the row sweep, binning, histograms and
    flushes are already ``@triton.jit`` helpers, and what is left is the row-block loop that
    carries the per-program accumulators through them.
    """
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    rank_acc = tl.zeros([K_POW2], tl.int32)
    ece_cnt = tl.zeros([BINS_POW2], tl.int32)
    ece_cor = tl.zeros([BINS_POW2], tl.int32)
    ece_conf = tl.zeros([BINS_POW2], tl.float64)
    cm_acc = tl.zeros([CC_POW2], tl.int32)
    n_invalid = tl.zeros([BLOCK_N], tl.int32)
    for blk in range(pid, tl.cdiv(N, BLOCK_N), n_prog):
        rows = (blk * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        row_ok = rows < N
        t = tl.load(t_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        kept = row_ok
        if HAS_IGNORE:
            kept = kept & (t != ignore_index)
        ok = (t >= 0) & (t < C)
        if HAS_LOGITS:
            t = tl.where(kept & ok, t, 0)
            x_t = tl.load(x_ptr + rows * stride_xn + t, mask=kept & ok, other=0.0).to(DTYPE)
            pred, conf, rank = _row_softmax_argmax_rank(
                x_ptr, stride_xn, rows, row_ok, t, x_t, C, DTYPE, BLOCK_N, BLOCK_C
            )
            pred = pred.to(tl.int64)
        else:
            pred = tl.load(x_ptr + rows * stride_xn, mask=row_ok, other=0).to(tl.int64)
            ok = ok & (pred >= 0) & (pred < C)
        valid = kept & ok
        n_invalid += (kept & ~ok).to(tl.int32)
        t = tl.where(valid, t, 0)
        pred = tl.where(valid, pred, 0)
        correct = valid & (pred == t)
        if HAS_LOGITS:
            rank_acc += _histogram(rank, valid, K_POW2)
            bins = _bin_index(conf, bounds_ptr, N_BINS, BINS_POW2)
            ece_cnt += _histogram(bins, valid, BINS_POW2)
            ece_cor += _histogram(bins, correct, BINS_POW2)
            in_bin = (bins[:, None] == tl.arange(0, BINS_POW2)[None, :]) & valid[:, None]
            ece_conf += tl.sum(tl.where(in_bin, conf[:, None].to(tl.float64), 0.0), axis=0)
        if DENSE:
            if LOCAL_CM:
                cm_acc += _histogram(t * C + pred, valid, CC_POW2)
            else:
                tl.atomic_add(cnt_ptr + t * C + pred, tl.full([BLOCK_N], 1, tl.int32), mask=valid)
        else:
            one = tl.full([BLOCK_N], 1, tl.int32)
            tl.atomic_add(cnt_ptr + t, one, mask=correct)
            tl.atomic_add(cnt_ptr + C + pred, one, mask=valid)
            tl.atomic_add(cnt_ptr + 2 * C + t, one, mask=valid)
    if HAS_LOGITS:
        _flush(cnt_ptr + off_topk, rank_acc, TOP_K, K_POW2)
        _flush(cnt_ptr + off_ece_count, ece_cnt, N_BINS + 1, BINS_POW2)
        _flush(cnt_ptr + off_ece_correct, ece_cor, N_BINS + 1, BINS_POW2)
        _flush(conf_ptr, ece_conf, N_BINS + 1, BINS_POW2)
    if LOCAL_CM:
        _flush(cnt_ptr, cm_acc, C * C, CC_POW2)
    inv = tl.sum(n_invalid, axis=0)
    tl.atomic_add(cnt_ptr + off_invalid, inv, mask=inv > 0)


_cls_stats = LazyJit(
    _cls_stats_kernel, helpers=(_row_softmax_argmax_rank, _bin_index, _histogram, _flush)
)
