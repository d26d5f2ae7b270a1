"""Triton kernels for the hot loss and metric paths, each with a plain-PyTorch fallback.

This package knows nothing of ``engine``: it is usable on its own.
``backend="auto"`` means Triton for CUDA tensors when Triton imports, PyTorch otherwise.
"""

from kernels.classification import ClassificationStats as ClassificationStats
from kernels.classification import classification_stats as classification_stats
from kernels.cross_entropy import cross_entropy as cross_entropy
from kernels.linear_cross_entropy import linear_cross_entropy as linear_cross_entropy
from kernels.regression import RegressionStats as RegressionStats
from kernels.regression import regression_stats as regression_stats
