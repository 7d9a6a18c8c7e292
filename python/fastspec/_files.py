"""Output files that appear complete or not at all (the CLI's outputs, the batch fitter's table)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_output(path: Path):
    """A temporary name beside `path`, renamed to `path` on success and removed on any failure (also Ctrl-C),
    so that a file under `path` is always complete."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
