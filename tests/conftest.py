"""Shared fixtures. Tests that need ``../shared`` (weights, benchmark sets) skip when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PAN_SHARED", REPO.parent / "shared"))  # the benchmarks read it too


# The suite runs on two processes (pytest-xdist, pyproject.toml's addopts), each taking whole
# modules (a module's fixtures, its Ray among them, are set up once). The modules that cost most,
# in CPU-seconds on the 2-core CI machine (benchmarks/README.md, "The tests' time"), go out first,
# heaviest first, so that the last to finish is a short one; the rest follow in file order.
HEAVIEST_FIRST = (
    "test_train.py", "test_engine.py", "test_upscale.py", "test_upscale_cluster.py", "test_submit.py",
    "test_cli.py", "test_eval_job.py", "test_capacity.py", "test_lease.py", "test_ledger.py",
)  # fmt: skip
PARALLEL_PROCESSES = 2  # the CI machine's cores: every process runs Rays and torch of its own


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return min(PARALLEL_PROCESSES, os.cpu_count() or 1)


def pytest_configure(config: pytest.Config) -> None:
    """In a parallel run, each process's share of the cores for torch's threads, here and in the
    processes it starts (``pan`` commands, Ray workers): two processes of two threads each on two
    cores spend CPU waiting on each other (the tiled-engine test: 49 CPU-s with two threads
    against 45 with one, alone on the machine)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return HEAVIEST_FIRST.index(name) if name in HEAVIEST_FIRST else len(HEAVIEST_FIRST)

    items.sort(key=rank)  # stable: each module's tests keep their order


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the project's ../shared data), which is absent here")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _require(SHARED)


@pytest.fixture(scope="session")
def benchmarks_dir(shared_dir: Path) -> Path:
    return _require(shared_dir / "benchmarks")


@pytest.fixture(scope="session")
def weights_dir(shared_dir: Path) -> Path:
    return _require(shared_dir / "weights")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server mode) on loopback, with credentials in the environment.

    The environment is set before any Ray starts, so Ray workers (separate processes) reach it too.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def local_ray(s3_server, _shared_ray):
    """A local Ray shared by the test modules that need one (started after the S3 server, so its
    workers reach it): started once, and again only in a module after one whose tests needed a Ray
    of other resources and shut it down. Starting one costs seconds on a small machine."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture(scope="session")
def _shared_ray():
    yield
    import ray

    ray.shutdown()
