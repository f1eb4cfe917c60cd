"""Shared test fixtures: one local Ray cluster per test process, servers on loopback (see servers.py), the fault
report (faultreport.py)."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Settings from shared/reference/cpu-testing.md; they must be in the environment before Ray starts
# so that workers inherit them. Not DS_ACCELERATOR: each worker's accelerator is vidgen's own decision, from the
# worker's resources (vidgen/ray_env.py), and a test setting it would hide exactly that.
os.environ.setdefault("RAY_DATA_USE_DATASOURCE_V2", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "vidgen" / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["servers", "faultreport"]

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout; tests that need it skip (naming the path) where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"needs {SHARED} (the shared fixtures beside the checkout)")
    return SHARED


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray per test process (Ray start costs 4-8 s); `make test TEST_JOBS=2` runs 2 (pytest-xdist)."""
    import ray

    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
        ray.init(
            num_cpus=4,  # logical CPUs: data tasks must find room beside 2 train workers
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tmp,
            runtime_env={"env_vars": {k: os.environ[k] for k in ("RAY_DATA_USE_DATASOURCE_V2", "TORCH_EXTENSIONS_DIR",
                                                                  "HF_HUB_OFFLINE")}},
        )
    yield ray
    # Left running until interpreter exit: ray.shutdown() here races with Ray Data's
    # background threads on some versions.


if sys.platform != "linux":  # pragma: no cover
    collect_ignore_glob = ["test_train*.py"]
