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
