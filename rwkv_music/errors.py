"""One-line error messages: what a CLI prints for a failure it reports instead of a traceback."""

from __future__ import annotations


def error_line(e: BaseException) -> str:
    """"Type: the first line of its message" (the type alone for an empty message), without a closing period, so
    a reader's multi-line error (pyarrow, safetensors, miditok) fits in the one line of the message around it."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0].rstrip('.')}" if text else type(e).__name__
