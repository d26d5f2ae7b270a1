"""``python -m engine.evaluate``: a trained run's evaluation report (``report.md``,
``report.html``, ``eval.json`` and a TensorBoard run under ``<run dir>/eval/<name>/``)."""
