"""Shared pytest setup: the --runslow option and the location of ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tiny test models gain nothing from several threads, and OpenMP threads spinning on a busy
# 2-core machine (a training run beside the tests) slow everyone down many times over.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The int8 gate's AVX2-only path runs a subprocess under qemu (~60x slower); in the default test run
# the same subprocess runs natively (an empty emulator prefix), slow tests use the real emulator.
os.environ.setdefault("AGEGENDER_AVX2_EMULATOR", "")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AGEGENDER_SHARED", REPO.parent / "shared"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords or "aarch64" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    return SHARED


@pytest.fixture(scope="session")
def adience_meta(shared_dir: Path) -> Path:
    p = shared_dir / "data" / "adience_meta"
    if not (p / "fold_0_data.txt").is_file():
        pytest.skip(f"{p} is absent")
    return p


@pytest.fixture(scope="session")
def utkface_dir(shared_dir: Path) -> Path:
    p = shared_dir / "data" / "utkface"
    if not p.is_dir():
        pytest.skip(f"{p} is absent")
    return p


@pytest.fixture(scope="session")
def yunet_model(shared_dir: Path) -> Path:
    p = shared_dir / "models" / "face_detection_yunet_2026may.onnx"
    if not p.is_file():
        pytest.skip(f"{p} is absent")
    return p


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No user settings, a private cache, a detector URL that cannot reach the network."""
    from contract_model import isolate_runtime_env

    isolate_runtime_env(monkeypatch, tmp_path / "cache")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A small agegender contract model (32 px) for runtime tests; modules may override it."""
    from contract_model import build_contract_model

    return build_contract_model(tmp_path_factory.mktemp("m") / "contract.onnx", input_size=32)
