"""Predictions for a whole CSV file, streamed: read ``chunk_rows`` rows, predict them, append
them to the output, repeat. Memory is bounded by the chunk, not by the file.

Each chunk goes through the ``Predictor``'s ``inputs -> outputs -> decode`` path, the one
evaluation and the server use, so a row gets the same answer from all three. The output is
written to a temporary file beside the one asked for and renamed when the last chunk is in:
a failure part-way (a bad cell in chunk 3, Ctrl-C) leaves no partial file and does not touch an
existing output.

Output columns: ``row`` (the 1-based data row of the input), the ``keep=`` columns, then
``label``, ``confidence`` and ``prob_<class>`` per class (classification) or ``value`` (a
regression in the target's units).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from engine import preprocess
from engine.config import ConfigError
from engine.data import header_names
from engine.dataset import DataError
from engine.predictor import Predictor

ROW = "row"


@dataclass
class Written:
    """What a batch prediction wrote."""

    output: Path
    rows: int
    chunks: int


def output_columns(predictor: Predictor) -> list[str]:
    """The prediction columns after ``row`` and the kept ones."""
    if predictor.info.task == "regression":
        return ["value"]
    if predictor.info.task != "classification":
        raise ConfigError(
            f"engine.predict handles classification and regression models; this one is a "
            f"{predictor.info.task} model."
        )
    names = preprocess.class_names(np.arange(predictor.info.num_classes), predictor.info)
    return ["label", "confidence", *(f"prob_{name}" for name in names)]


def output_schema(predictor: Predictor, keep: list[str]) -> pa.Schema:
    """Fixed before the first chunk, so every chunk appends to the same table. A kept column is
    written as the input's text (a type inferred per chunk could change between chunks, and an
    id such as 007 keeps its zeros), or, if it is a feature, as the number the model read."""
    features = set(predictor.feature_names)
    fields = [pa.field(ROW, pa.int64(), nullable=False)]
    fields += [pa.field(k, pa.float64() if k in features else pa.string()) for k in keep]
    for name in output_columns(predictor):
        fields.append(pa.field(name, pa.string() if name == "label" else pa.float64()))
    return pa.schema(fields)


def check_paths(input_path: Path, output: Path, overwrite: bool) -> None:
    """Refuse, before the model loads, what would fail later: a missing input, a missing output
    folder, an existing output."""
    if not input_path.is_file():
        raise ConfigError(
            f"input={input_path}: no such file (relative paths resolve from {Path.cwd()}); pass "
            f"a CSV file with the model's feature columns."
        )
    if input_path.suffix.lower() != ".csv":
        raise ConfigError(f"input={input_path}: engine.predict reads CSV files (.csv).")
    if not output.parent.is_dir():
        raise ConfigError(
            f"output={output}: the folder {output.parent} does not exist; create it first."
        )
    if output.exists() and not overwrite:
        raise ConfigError(
            f"output={output} exists; pass overwrite=true to replace it, or another output=."
        )
    if output.resolve() == input_path.resolve():
        raise ConfigError(f"output={output} is the input file; write the predictions elsewhere.")


def check_header(columns: list[str], predictor: Predictor, keep: list[str], source: str) -> None:
    """The input names every feature and every kept column, each once."""
    preprocess.check_columns(columns, predictor.info, source, target=None)
    missing = [k for k in keep if k not in columns]
    if missing:
        raise DataError(
            f"keep: {', '.join(repr(k) for k in missing)} is not a column of {source}; its "
            f"columns are {', '.join(columns[:12])}{' ...' if len(columns) > 12 else ''}."
        )
    taken = [k for k in keep if k in (ROW, *output_columns(predictor))]
    if taken:
        raise ConfigError(
            f"keep: {', '.join(repr(k) for k in taken)} is also the name of a prediction "
            f"column; rename that input column, or leave it out of keep=."
        )
    needed = set(predictor.feature_names) | set(keep)
    repeated = sorted({c for c in columns if c in needed and columns.count(c) > 1})
    if repeated:
        raise DataError(
            f"{source} has the column(s) {', '.join(repr(c) for c in repeated)} more than once, "
            f"which is ambiguous; give every column its own name."
        )


def _bad_cell(chunk: Any, names: list[str], start: int, source: str) -> DataError | None:
    """The first cell ``Predictor.inputs`` refuses in this chunk, named by its data row in the
    whole file (``start`` rows come before the chunk), checked in the same order."""
    import pandas as pd

    for name in names:
        raw = chunk[name]
        values = pd.to_numeric(raw, errors="coerce")
        bad = np.flatnonzero((values.isna() & raw.notna()).to_numpy())
        if bad.size:
            return DataError(
                f"{source}: column '{name}' holds a non-numeric value ({raw.iloc[bad[0]]!r} in "
                f"data row {start + bad[0] + 1}); the model reads it as a number."
            )
        missing = np.flatnonzero(~np.isfinite(values.to_numpy(dtype=np.float64)))
        if missing.size:
            return DataError(
                f"{source}: column '{name}' has a missing or infinite cell in data row "
                f"{start + missing[0] + 1}; fill or drop those rows."
            )
    return None


def chunk_table(
    chunk: Any, start: int, predictor: Predictor, keep: list[str], schema: pa.Schema, source: str
) -> pa.Table:
    """One chunk's predictions as a table of ``schema``; ``start`` rows came before it."""
    import pandas as pd

    try:
        x = predictor.inputs(chunk, source)
    except DataError as err:
        # preprocess names the row within the chunk; the user needs it within the file.
        raise (_bad_cell(chunk, predictor.feature_names, start, source) or err) from None
    predictions = predictor.decode(predictor.outputs(x))
    n = len(chunk)
    columns: dict[str, Any] = {ROW: np.arange(start + 1, start + n + 1, dtype=np.int64)}
    for name in keep:
        if pa.types.is_floating(schema.field(name).type):
            columns[name] = pd.to_numeric(chunk[name]).to_numpy(dtype=np.float64)
        else:
            columns[name] = pa.array(chunk[name], type=pa.string(), from_pandas=True)
    if predictions.labels is None:
        columns["value"] = np.asarray(predictions.outputs, dtype=np.float64)
    else:
        columns["label"] = pa.array(predictions.labels, type=pa.string())
        columns["confidence"] = np.asarray(predictions.confidence, dtype=np.float64)
        probabilities = np.asarray(predictions.probabilities, dtype=np.float64)
        for i, name in enumerate(schema.names[-probabilities.shape[1] :]):
            columns[name] = probabilities[:, i]
    return pa.table(columns, schema=schema)


class _Sink:
    """A parquet or CSV writer on a temporary file beside ``output``: ``commit`` renames it to
    ``output``, ``discard`` removes it."""

    def __init__(self, output: Path, schema: pa.Schema) -> None:
        self.output = output
        self.temp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            if output.suffix.lower() == ".csv":
                import pyarrow.csv as pcsv

                self.writer: Any = pcsv.CSVWriter(str(self.temp), schema)
            else:
                import pyarrow.parquet as pq

                self.writer = pq.ParquetWriter(str(self.temp), schema)
        except OSError as err:
            raise ConfigError(f"output={output}: cannot write there ({err}).") from None

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def commit(self, overwrite: bool) -> None:
        self.writer.close()
        if self.output.exists() and not overwrite:  # it appeared while we were predicting
            self.discard()
            raise ConfigError(
                f"output={self.output} was created by something else while predicting; pass "
                f"overwrite=true to replace it, or another output=."
            )
        os.replace(self.temp, self.output)

    def discard(self) -> None:
        try:
            self.writer.close()
        except Exception:  # closing a half-written file may itself fail; it is removed anyway
            pass
        self.temp.unlink(missing_ok=True)


def _chunks(
    input_path: Path, chunk_rows: int, predictor: Predictor, keep: list[str], progress: bool
) -> Iterator[Any]:
    """The input's rows, ``chunk_rows`` at a time, as pandas frames of the needed columns,
    parsed as training parses a CSV; a progress bar on stderr follows the bytes read."""
    import pandas as pd
    from tqdm.auto import tqdm

    features = predictor.feature_names
    text = {k: str for k in keep if k not in features}
    with (
        input_path.open("rb") as f,
        tqdm(
            total=input_path.stat().st_size,
            desc="predict",
            unit="B",
            unit_scale=True,
            file=sys.stderr,
            disable=None if progress else True,  # None: only on a terminal
        ) as bar,
    ):
        reader = pd.read_csv(
            f,
            chunksize=chunk_rows,
            usecols=[*features, *(k for k in keep if k not in features)],
            dtype=text,
        )
        for chunk in reader:
            bar.update(f.tell() - bar.n)
            yield chunk


def predict_file(
    predictor: Predictor,
    input_path: Path,
    output: Path,
    *,
    chunk_rows: int = 10_000,
    keep: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Written:
    """Predict every row of ``input_path`` into ``output`` (.parquet/.pq or .csv)."""
    keep = list(keep or [])
    check_paths(input_path, output, overwrite)
    source = str(input_path)
    try:
        columns = header_names(input_path, parquet=False)
    except Exception as err:  # pandas raises many types; the user needs the file and the cause
        if type(err).__name__ == "EmptyDataError":
            raise DataError(f"input={input_path} is empty: it has no header and no rows.") from None
        raise DataError(f"input={input_path}: could not read it as CSV: {err}") from None
    check_header(columns, predictor, keep, source)
    schema = output_schema(predictor, keep)
    sink = _Sink(output, schema)
    rows = chunks = 0
    try:
        for chunk in _chunks(input_path, chunk_rows, predictor, keep, progress):
            if len(chunk) == 0:
                continue
            sink.write(chunk_table(chunk, rows, predictor, keep, schema, source))
            rows += len(chunk)
            chunks += 1
        sink.commit(overwrite)
    except BaseException as err:
        sink.discard()
        if type(err).__name__ == "ParserError":  # a malformed line, e.g. too many fields
            raise DataError(f"input={input_path}: {err}") from None
        raise
    return Written(output, rows, chunks)
