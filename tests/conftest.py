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


@pytest.fixture(scope="session")
def cpp_examples(tmp_path_factory) -> Path:
    """The folder of the built examples/cpp programs, built as a C++ user would: the core configured with
    plain CMake and installed into a prefix, then the examples found through find_package(fastspec)."""
    import shutil

    if shutil.which("cmake") is None:
        pytest.fail("cmake is needed to build the C++ examples")
    tmp = tmp_path_factory.mktemp("cpp")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    prefix, core_build, ex_build = tmp / "prefix", tmp / "core-build", tmp / "example-build"
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    run_checked(["cmake", "-S", REPO, "-B", core_build, *gen, "-DCMAKE_BUILD_TYPE=Release", "-DFASTSPEC_PYTHON=OFF",
                 "-DFASTSPEC_BUILD_TESTS=OFF", "-DFASTSPEC_CUDA=OFF", f"-DPython_EXECUTABLE={sys.executable}",
                 f"-DCMAKE_INSTALL_PREFIX={prefix}"], env=env)
    run_checked(["cmake", "--build", core_build], env=env)
    run_checked(["cmake", "--install", core_build], env=env)
    assert (prefix / "include" / "fastspec" / "fastspec.hpp").exists()
    run_checked(["cmake", "-S", REPO / "examples" / "cpp", "-B", ex_build, *gen, "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={prefix}"], env=env)
    run_checked(["cmake", "--build", ex_build], env=env)
    return ex_build
