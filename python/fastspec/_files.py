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


def check_output(path: Path | None, formats: tuple[str, ...] | None = None, what: str = "output") -> None:
    """Refuse an output that cannot be written, before any work: an unknown extension, a path that is a folder, a
    missing or unwritable folder. (The CLI's outputs and fit_batch's table: one check for both.)"""
    import os

    if path is None:
        return
    path = Path(path)
    if formats is not None and path.suffix.lower() not in formats:
        raise ValueError(f"{path}: unknown {what} format {path.suffix or '(no extension)'}; use {', '.join(formats)}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; the {what} is a file")
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"{path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{path}: the folder {folder} is not writable")
