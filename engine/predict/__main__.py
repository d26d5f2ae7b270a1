"""``python -m engine.predict model=<registered model | run dir> input=<csv> output=<parquet|csv>
[chunk_rows=10000] [keep=[id]] [device=auto] [overwrite=false] [checkpoint=best]
[registry.storage=...] [registry.store=...]``.

A bad argument, file, column or cell is ``error: ...`` and exit code 2, and no output is written.
The last line says how many rows went where.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from engine.dataset import DataError
from engine.model_source import ModelSource
from engine.predict.batch import Written, check_paths, predict_file
from engine.predict.options import PredictOptions, parse
from engine.train import USER_ERRORS
from engine.trainer import pick_device


def run(options: PredictOptions) -> Written:
    input_path, output = Path(options.input).expanduser(), Path(options.output).expanduser()
    check_paths(input_path, output, options.overwrite)  # before the model takes seconds to load
    source = ModelSource(
        options.model, options.checkpoint, options.registry.storage, options.registry.store
    )
    device = pick_device(options.device, key="device")
    loaded = source.load(device, with_reference=False)
    print(f"[predict] {loaded.name} version {loaded.version} on {device}", flush=True)
    return predict_file(
        loaded.predictor,
        input_path,
        output,
        chunk_rows=options.chunk_rows,
        keep=options.keep,
        overwrite=options.overwrite,
    )


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        written = run(parse(sys.argv[1:] if argv is None else argv))
    except (*USER_ERRORS, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"[predict] wrote {written.rows} rows to {written.output} "
        f"({written.chunks} chunk(s), {time.perf_counter() - started:.1f} s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
