"""Shared fixtures: where the SYNSPEC data lives and how its absence is handled."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# training/ is a folder of scripts and a package, not part of the installed inference package.
sys.path.insert(0, str(REPO / "training"))

SHARED_DATA = Path(os.environ.get("FASTSPEC_SHARED", REPO.parent / "shared")) / "data"


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data; skip when absent, except under CI where it is an error."""
    path = SHARED_DATA / name
    if not path.exists():
        reason = f"needs the SYNSPEC data {path} (the ../shared folder beside the checkout); not present here"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture
def intrinsic_h5() -> Path:
    return shared_file("synspec_intrinsic_v1.h5")


@pytest.fixture
def rotin_h5() -> Path:
    return shared_file("rotin_reference_v1.h5")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> Path:
    """A small decoder with random weights on the full 19000-pixel grid, written in the model format."""
    from fastspec.model_format import random_decoder, write_model

    path = tmp_path_factory.mktemp("models") / "small.fsm"
    write_model(path, random_decoder([32, 64], latent_dim=4, seed=1), latent_dim=4,
                provenance={"purpose": "tests", "seed": 1})
    return path


def run_checked(cmd, **kwargs):
    """Run a command; on failure the assertion shows its stdout and stderr."""
    import subprocess

    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _cmake_env():
    return {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}


def _generator():
    import shutil

    return ["-G", "Ninja"] if shutil.which("ninja") else []


def clean_env(**extra) -> dict:
    """A shell environment with no Python virtualenv in it: what a C/C++/Fortran user of the install has."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
            "CMAKE_BUILD_PARALLEL_LEVEL": "2", **extra}


@pytest.fixture(scope="session")
def installed_core(tmp_path_factory) -> Path:
    """An install prefix of the core that stands alone: built with plain CMake from a throwaway virtualenv that
    has only scipy-openblas32 (the BLAS), installed, then the venv and the build tree are deleted. The examples
    are built against the prefix from a clean environment, so they prove a consumer needs neither."""
    import shutil
    import venv

    if shutil.which("cmake") is None:
        pytest.fail("cmake is needed to build the C++ examples")
    tmp = tmp_path_factory.mktemp("core")
    prefix, core_build, build_venv = tmp / "prefix", tmp / "core-build", tmp / "build-venv"
    venv.create(build_venv, with_pip=True)
    py = build_venv / "bin" / "python"
    run_checked([py, "-m", "pip", "install", "-q", "scipy-openblas32"])
    run_checked(["cmake", "-S", REPO, "-B", core_build, *_generator(), "-DCMAKE_BUILD_TYPE=Release",
                 "-DFASTSPEC_PYTHON=OFF", "-DFASTSPEC_CUDA=OFF", f"-DPython_EXECUTABLE={py}",
                 f"-DCMAKE_INSTALL_PREFIX={prefix}"], env=_cmake_env())
    run_checked(["cmake", "--build", core_build], env=_cmake_env())
    run_checked(["cmake", "--install", core_build], env=_cmake_env())
    shutil.rmtree(build_venv)
    shutil.rmtree(core_build)
    for f in ("include/fastspec/fastspec.hpp", "include/fastspec/fastspec.h", "share/fastspec/default.fsm",
              "lib/pkgconfig/fastspec.pc", "lib/libscipy_openblas.so"):
        assert (prefix / f).exists(), f"the install lacks {f}"
    return prefix


def _build_examples(folder: Path, prefix: Path, build: Path) -> Path:
    run_checked(["cmake", "-S", folder, "-B", build, *_generator(), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={prefix}"], env=clean_env())
    run_checked(["cmake", "--build", build], env=clean_env())
    return build


@pytest.fixture(scope="session")
def cpp_examples(installed_core, tmp_path_factory) -> Path:
    """The folder of the built examples/cpp programs, found through find_package(fastspec)."""
    return _build_examples(REPO / "examples" / "cpp", installed_core, tmp_path_factory.mktemp("cpp-examples"))


@pytest.fixture(scope="session")
def c_examples(installed_core, tmp_path_factory) -> Path:
    """The folder of the built examples/c (C) and examples/fortran (Fortran, through ISO_C_BINDING) programs."""
    return _build_examples(REPO / "examples" / "c", installed_core, tmp_path_factory.mktemp("c-examples"))
