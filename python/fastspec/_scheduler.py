"""The `--scheduler` convention shared by `fastspec fit --batch` and `fastspec-grid build` (one parser, so both
commands read the same strings the same way)."""

from __future__ import annotations

from pathlib import Path


def parse_scheduler(text: str) -> tuple[str, object]:
    """'local:N' -> ('local', N); 'PROTOCOL://HOST:PORT' -> ('address', text); an existing file -> ('file', path),
    a Dask scheduler file. The convention of `fastspec-grid build --scheduler`."""
    if text.startswith("local:"):
        n = int(text[6:]) if text[6:].isdigit() else 0
        if n < 1:
            raise ValueError(f"--scheduler {text!r}: local:N wants a number of worker processes N >= 1")
        return "local", n
    if "://" in text:
        return "address", text
    if Path(text).is_file():
        return "file", text
    raise ValueError(f"--scheduler {text!r}: give a scheduler address (tcp://HOST:8786), a scheduler file "
                     "(JSON, from `dask scheduler --scheduler-file`) or local:N")
