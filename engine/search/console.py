"""What a sweep's driver and its job watcher share to talk to the user: the ``[sweep]`` line,
an error's first line, a shell-quoted value, and the CPU threads each of n local workers gets.
Its own module because the driver imports the job watcher (``jobs``), which cannot import it back.
"""

from __future__ import annotations

from engine.search import storage as st


def say(message: str) -> None:
    print(f"[sweep] {message}", flush=True)


def first_line(err: BaseException, n: int = 1) -> str:
    """The first ``n`` non-empty lines of an error, and its cause's (Hydra wraps OmegaConf's
    message, "could not be converted", in its own)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    text = ": ".join(lines[:n]) if lines else type(err).__name__
    if err.__cause__ is not None:
        text += f" ({first_line(err.__cause__)})"
    return text


def quote(value: str) -> str:
    """A value single-quoted for a Hydra override or a shell line the user may copy."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def threads_each(n: int) -> int:
    """CPU threads per worker when ``n`` workers share this machine's cores."""
    return max(1, st.cpu_count() // n)
