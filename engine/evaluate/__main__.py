"""``python -m engine.evaluate run=<run dir> [split=test] [data.path=<csv>] [eval.*=...]``."""

from __future__ import annotations

import sys

from engine.dataset import DataError
from engine.evaluate.core import evaluate
from engine.evaluate.options import parse
from engine.train import USER_ERRORS


def main(argv: list[str] | None = None) -> int:
    try:
        evaluate(parse(sys.argv[1:] if argv is None else argv))
    except (*USER_ERRORS, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
