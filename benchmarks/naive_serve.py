"""The naive peer of ``python -m engine.serve`` for ``benchmarks/serve_load.py``: the FastAPI
endpoint a competent engineer writes first, calling the model once per request.

    python benchmarks/naive_serve.py --run <run dir> --port 8081 [--threads 1] [--device cpu]

``POST /predict`` takes the same body as ours, ``{"rows": [{feature: number, ...}, ...]}``,
validated by pydantic; each request becomes a pandas frame and one ``Predictor.predict`` call
(the engine's own loader and preprocessing, so both servers give the same answers) and is
answered ``{"predictions": [{"label", "confidence", "probabilities"}]}``. The handler is a plain
``def``, as FastAPI's documentation says to write blocking code: FastAPI runs it in its thread
pool so the event loop stays free. No batching, no queue bound, no metrics, no prediction log.

``--input array`` is a leaner peer: the rows become a NumPy array in feature order, standardised
with the run's statistics and given to ``Predictor.outputs``, skipping ``Predictor.predict``'s
per-column pandas checks (which cost ~8 ms for one 64-column row on the 2-core VM, far more
than the model call).

``GET /v2/health/ready`` is there only so the benchmark waits for both servers the same way.
It runs under uvicorn as ours does: one process, uvloop and httptools, no access log.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field

from engine.predictor import Predictions, load_run
from engine.preprocess import standardize


class PredictBody(BaseModel):
    rows: list[dict[str, float]] = Field(min_length=1)


def build_app(run_dir: Path, device: str, how: str = "frame") -> FastAPI:
    predictor = load_run(run_dir, device=device)  # once, at start-up
    info = predictor.info
    class_names = info.class_names or [str(i) for i in range(info.num_classes)]
    app = FastAPI(title="naive digits endpoint")

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    names = predictor.feature_names

    def predict_frame(rows: list[dict[str, float]]) -> Predictions:
        return predictor.predict(pd.DataFrame(rows), source="request")

    def predict_array(rows: list[dict[str, float]]) -> Predictions:
        # pydantic has checked the values are numbers; a missing feature is a KeyError (500).
        x = np.array([[row[name] for name in names] for row in rows], dtype=np.float32)
        return predictor.decode(predictor.outputs(torch.from_numpy(standardize(x, info))))

    predict_rows = predict_frame if how == "frame" else predict_array

    @app.post("/predict")
    def predict(body: PredictBody) -> dict:
        result = predict_rows(body.rows)
        return {
            "predictions": [
                {
                    "label": label,
                    "confidence": float(confidence),
                    "probabilities": dict(zip(class_names, probs)),
                }
                for label, confidence, probs in zip(
                    result.labels, result.confidence.tolist(), result.probabilities.tolist()
                )
            ]
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a classification run dir")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--input",
        default="frame",
        choices=("frame", "array"),
        help="frame: a pandas frame into Predictor.predict; array: a NumPy array in feature "
        "order, standardised, into Predictor.outputs (no per-column pandas checks)",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    app = build_app(args.run, args.device, args.input)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
