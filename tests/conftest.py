"""Shared fixtures: where the SYNSPEC data lives and how its absence is handled; the random seed of every
test (FASTSPEC_TEST_SEED); the skip allow-list enforced under CI.

Random seeds: FASTSPEC_TEST_SEED (an integer) fixes the run's base seed, otherwise a fresh one is drawn. Each
test gets its own seed from (base seed, test id): the `test_seed` and `rng` fixtures, and the global `random`,
NumPy and (when imported) torch generators are seeded with it before the test. A failing test's report prints
the base seed; `FASTSPEC_TEST_SEED=<base> python -m pytest <test id>` replays it.

Skips under CI (env CI set): every skip must match SKIP_ALLOWED below, or the run fails at the end.
"""

import hashlib
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# training/ is a folder of scripts and a package, not part of the installed inference package. With
# FASTSPEC_TEST_INSTALLED=1 the tests use the installed fastspec_train (wheel install) instead of the source tree.
if not os.environ.get("FASTSPEC_TEST_INSTALLED"):
    sys.path.insert(0, str(REPO / "training"))

SHARED_DATA = Path(os.environ.get("FASTSPEC_SHARED", REPO.parent / "shared")) / "data"


def skip_or_fail_under_ci(reason: str):
    """Skip for a missing prerequisite, except under CI (`CI` set), where it must be there: fail instead."""
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


def shared_file(name: str) -> Path:
    """Path of a file in ../shared/data; skip when absent, except under CI where it is an error."""
    path = SHARED_DATA / name
    if not path.exists():
        skip_or_fail_under_ci(f"needs the SYNSPEC data {path} (the ../shared folder beside the checkout); not present here")
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


# ---------------------------------------------------------------------------------------------- seeds

def _base_seed() -> int:
    value = os.environ.get("FASTSPEC_TEST_SEED")
    if value:
        return int(value)
    return int.from_bytes(os.urandom(4), "little")


BASE_SEED = _base_seed()


def seed_for(nodeid: str) -> int:
    """This test's seed: a hash of the run's base seed and the test id (so one test replays on its own)."""
    digest = hashlib.sha256(f"{BASE_SEED}:{nodeid}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def pytest_report_header(config):
    return f"FASTSPEC_TEST_SEED={BASE_SEED} (set it to replay this run's random draws)"


@pytest.fixture
def test_seed(request) -> int:
    """This test's seed (32 bits), derived from FASTSPEC_TEST_SEED; use it for any random draw."""
    return seed_for(request.node.nodeid)


@pytest.fixture
def rng(test_seed) -> np.random.Generator:
    return np.random.default_rng(test_seed)


@pytest.fixture(autouse=True)
def _seed_global_generators(request):
    seed = seed_for(request.node.nodeid)
    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed:
        report.sections.append(("random seed", f"FASTSPEC_TEST_SEED={BASE_SEED} (this test's seed {seed_for(item.nodeid)}); "
                                               f"replay: FASTSPEC_TEST_SEED={BASE_SEED} python -m pytest '{item.nodeid}'"))
    return report


# ---------------------------------------------------------------------------------------------- skips

# Under CI every skip must match one of these (regular expressions searched in the skip reason); any other
# skip fails the run, so a test that stops running cannot go unnoticed. Keep entries few and specific. Not on it,
# on purpose: "this CPU has no AVX-512F" (test_core.py; CI's machines have AVX-512F, and the direct 16-bit GEMV is
# the shipped model's batch-1 path), missing gfortran / ../shared data / package index (tests fail under CI).
SKIP_ALLOWED = [
    r"no CUDA GPU",  # GPU-only tests (tests/test_cuda*.py): CI has no GPU
    r"machine without a usable GPU",  # the reverse (error paths without a GPU): run on CI, skip on a GPU machine
]
_unexpected_skips: list[str] = []


def _skip_reason(report) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2])
    return str(report.longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not any(re.search(p, reason) for p in SKIP_ALLOWED):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped at import (pytest.importorskip, pytest.skip(allow_module_level))
        pytest_runtest_logreport(report)


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("CI") and _unexpected_skips and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _unexpected_skips:
        head = ("CI is set: these skips are not on the allow-list (tests/conftest.py SKIP_ALLOWED), so the run FAILS"
                if os.environ.get("CI") else "skips not on the CI allow-list (tests/conftest.py SKIP_ALLOWED); "
                "under CI they would fail the run")
        terminalreporter.section("unexpected skips")
        terminalreporter.write_line(head)
        for line in _unexpected_skips:
            terminalreporter.write_line("  " + line)
