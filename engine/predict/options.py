"""``python -m engine.predict``'s command line: ``key=value`` arguments on a typed schema, so a
misspelt key or a wrong type is refused with the closest valid key named."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from engine.config import ConfigError, check_device
from engine.keyvalue import parse as parse_key_values
from engine.model_source import RegistrySettings

EXAMPLE = "model=digits-mlp@production input=rows.csv output=preds.parquet"
OUTPUT_FORMATS = (".parquet", ".pq", ".csv")


@dataclass
class PredictOptions:
    model: str = MISSING
    """A registered model (digits-mlp@production, digits-mlp@3) or a run dir."""
    input: str = MISSING
    """A CSV file with the training data's feature columns (a header row, then data rows)."""
    output: str = MISSING
    """Where the predictions go: a .parquet (or .pq) file, or a .csv file."""
    checkpoint: str = "best"
    """A run dir's checkpoint (best|last|<file>); a registered version has one."""
    chunk_rows: int = 10_000
    """Rows read, predicted and written at a time: the memory used grows with it, not the file."""
    device: str = "auto"
    """auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N."""
    keep: list[str] = field(default_factory=list)
    """Input columns copied to the output beside each prediction, e.g. keep=[id]."""
    overwrite: bool = False
    """Replace an existing output file (else it is refused, and left as it is)."""
    registry: RegistrySettings = field(default_factory=RegistrySettings)


def parse(argv: list[str]) -> PredictOptions:
    """``PredictOptions`` from ``key=value`` arguments; a ``ConfigError`` names a bad one."""
    options = parse_key_values(PredictOptions, argv, example=EXAMPLE)
    if options.chunk_rows < 1:
        raise ConfigError(f"chunk_rows={options.chunk_rows}: must be at least 1.")
    check_device("device", options.device)
    if not options.output.lower().endswith(OUTPUT_FORMATS):
        raise ConfigError(
            f"output={options.output}: name a .parquet or a .csv file (the suffix picks the "
            f"format), e.g. output=preds.parquet."
        )
    repeated = sorted({k for k in options.keep if options.keep.count(k) > 1})
    if repeated:
        raise ConfigError(f"keep: {', '.join(repeated)} listed twice; name each column once.")
    return options
