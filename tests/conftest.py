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
# Ray's log monitor globs the session's log folder 10 times a second until it holds 1000 files, then twice a second
# (Ray's own back-off for big clusters): with every test's workers logging there, the 10 Hz scan cost about 5% of
# the suite's CPU. The tests' drivers do not stream worker logs (log_to_driver=False).
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")

pytest_plugins = ["servers", "faultreport"]

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TESTS = Path(__file__).resolve().parent

# The longest test files, longest first (seconds each in a serial run on a slow day, from --durations): in
# pytest-xdist processes (`make test TEST_JOBS=2`, which hands out whole files in collection order) these go first,
# so the run does not end with one process busy on a long file while the other waits. A serial run keeps pytest's
# order.
LONGEST_FIRST = [
    "test_data_position.py",  # 393
    "test_accelerator_env.py",  # 356
    "test_multinode.py",  # 321
    "faults/test_train_faults.py",  # 279
    "test_nightly_verdict.py",  # 258
    "test_train_core.py",  # 231
    "test_wan_train.py",  # 229
    "test_plan.py",  # 217
    "test_job_submit.py",  # 189
    "test_lora.py",  # 181
    "faults/test_credentials.py",  # 139
    "test_nightly.py",  # 120
    "test_latents.py",  # 116
    "test_plan_generate.py",  # 114
    "faults/test_interrupt.py",  # 113
    "test_demo.py",  # 112
]


def pytest_collection_modifyitems(config, items):
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item) -> int:
        try:
            return rank.get(Path(item.fspath).resolve().relative_to(TESTS).as_posix(), len(rank))
        except ValueError:
            return len(rank)

    items.sort(key=key)  # stable: a file's tests keep their order, the other files theirs


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
