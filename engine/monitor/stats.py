"""The two-sample statistics drift monitoring is built on: is the window drawn from the same
distribution as the reference (the training rows)?

- Numeric values: the two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, two-sided),
  the largest gap between the two empirical CDFs. It needs no binning and no distribution.
- Categories (integer codes, predicted classes): Pearson's chi-square test of homogeneity on the
  2 x k table of counts (reference row, window row), ``scipy.stats.chi2_contingency``. The
  reference is itself a sample, so comparing the window against the reference's frequencies as
  if they were exact (a goodness-of-fit test) would false-alarm when the reference is not much
  larger than the window (wine: 124 training rows); the homogeneity test treats both as
  samples. Values the reference never had are one more column (a shifted integer feature lands
  there, and alarms). The chi-square distribution of the statistic holds when every expected
  count is at least 5 (Cochran's rule), so the rarest columns are merged until they are; when
  that leaves a single column, Fisher's exact test on the 2 x 2 table (the most common value
  against all others) gives the p-value, exact at any counts.
- The population stability index, ``PSI = sum((w - r) * ln(w / r))`` over bins (w, r: the
  window's and the reference's share of rows in a bin), reported beside each test as an effect
  size, not a test: it grows with the size of the shift where the p-value also grows with the
  number of rows. Numeric values use the reference's deciles as bins, categories their values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

MIN_EXPECTED = 5.0  # Cochran's rule for the chi-square approximation
PSI_BINS = 10
PSI_FLOOR = 1e-4  # the share given to an empty bin, so ln(w / r) stays finite


@dataclass
class TestResult:
    test: str  # "ks" | "chi2"
    statistic: float
    p_value: float
    exact: bool = False  # chi2 only: the p-value is Fisher's exact test's (too few counts)


def ks(window: np.ndarray, reference: np.ndarray) -> TestResult:
    """Two-sided two-sample Kolmogorov-Smirnov test. Identical constant samples give D = 0,
    p = 1."""
    result = stats.ks_2samp(window, reference, alternative="two-sided")
    return TestResult("ks", float(result.statistic), float(result.pvalue))


def homogeneity(window_counts: np.ndarray, reference_counts: np.ndarray) -> TestResult:
    """Chi-square test that two count vectors over the same categories come from one
    distribution; rare categories merged (see the module's docstring), Fisher's exact test
    when merging leaves one category. No category with rows at all: p = 1."""
    table = np.stack([reference_counts, window_counts]).astype(np.float64)
    table = table[:, table.sum(axis=0) > 0]  # a category neither side has tells nothing
    if table.shape[1] < 2 or table[0].sum() == 0 or table[1].sum() == 0:
        return TestResult("chi2", 0.0, 1.0)
    merged = _merge_rare(table)
    if merged.shape[1] >= 2:
        chi2, p, _, _ = stats.chi2_contingency(merged, correction=True)
        return TestResult("chi2", float(chi2), float(p))
    # Too few rows outside the most common value for the chi-square distribution: that value
    # against all the others, exactly. The statistic reported is still Pearson's chi-square of
    # that 2 x 2 table, so it reads on the same scale as the other categorical features, and
    # the test stays "chi2" (a label that does not flip as a window fills).
    top = int(np.argmax(table.sum(axis=0)))
    pair = np.stack([table[:, top], table.sum(axis=1) - table[:, top]], axis=1)
    _, p = stats.fisher_exact(pair.astype(np.int64))
    chi2 = stats.chi2_contingency(pair, correction=False)[0]
    return TestResult("chi2", float(chi2), float(min(1.0, p)), exact=True)


def _merge_rare(table: np.ndarray) -> np.ndarray:
    """Merge the rarest column into the next rarest until every expected count (under
    homogeneity: row total x column total / grand total) is at least ``MIN_EXPECTED``."""
    columns = sorted(table.T.tolist(), key=sum)  # ascending by the column's total
    share = table.sum(axis=1) / table.sum()  # each row's share of every column
    while len(columns) > 1 and min(share) * sum(columns[0]) < MIN_EXPECTED:
        rarest = columns.pop(0)
        columns[0] = [a + b for a, b in zip(columns[0], rarest)]
        columns.sort(key=sum)
    return np.array(columns, dtype=np.float64).T


def psi(window_counts: np.ndarray, reference_counts: np.ndarray) -> float:
    """Population stability index of two count vectors over the same bins. Common readings:
    below 0.1 stable, 0.1 to 0.25 a moderate shift, above 0.25 a major one. It is biased upward
    for small samples (about (bins - 1) x (1/n + 1/m) with no shift at all)."""
    w = np.maximum(window_counts / max(window_counts.sum(), 1), PSI_FLOOR)
    r = np.maximum(reference_counts / max(reference_counts.sum(), 1), PSI_FLOOR)
    return float(np.sum((w - r) * np.log(w / r)))


def quantile_edges(reference: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (deciles by default); repeated edges of a
    feature with ties are dropped, so a constant feature has a single bin."""
    inner = np.quantile(reference.astype(np.float64), np.arange(1, bins) / bins)
    return np.unique(inner)


def binned_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of ``values`` in the bins ``edges`` cut (len(edges) + 1 bins)."""
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
