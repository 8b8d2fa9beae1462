"""pipeline.ray_runtime: the pieces that need no Ray, then with a local Ray, then an embedded one."""

import os
import socket
import subprocess
import sys
import types

import pytest
from ray.exceptions import RaySystemError

from pipeline.io.storage import Files
from pipeline.ray_runtime.pool import CPUS_LEFT_TO_TASKS, _leave_cpus_to_tasks
from pipeline.ray_runtime.session import _after_shutdown


def _finalizer(module: str):
    def __del__(self):
        pass

    __del__.__module__ = module
    return __del__


def test_only_ray_data_finalizers_that_outlive_ray_are_silenced():
    seen = []
    hook = _after_shutdown(seen.append)
    gone = RaySystemError("Ray has not been started yet.")
    dropped = types.SimpleNamespace(exc_value=gone, object=_finalizer("ray.data._internal.execution.x"))
    kept = [
        types.SimpleNamespace(exc_value=gone, object=_finalizer("pipeline.batch.job")),
        types.SimpleNamespace(exc_value=ValueError("x"), object=_finalizer("ray.data.y")),
    ]
    for unraisable in [dropped, *kept]:
        hook(unraisable)
    assert seen == kept


@pytest.mark.parametrize(
    ("wanted", "size", "cpus", "each"),
    [
        (0.5, 1, 1, 0.0),  # 1 CPU: the actor reserves none, the tasks get the CPU (it hung before)
        (0.5, 2, 2, 0.0),  # 2 CPUs: both left for a read and an encode task side by side
        (0.5, 3, 3, 1 / 3),
        (0.5, 4, 4, 0.5),  # enough CPUs: the actors' own setting
        (0.5, 16, 16, 0.5),
        (1, 1, 2, 0.0),  # a GPU actor on a 2-CPU node
        (1, 1, 16, 1),
        (1, 8, 16, 1),
    ],
)
def test_actors_leave_two_cpus_to_the_tasks(wanted, size, cpus, each):
    assert _leave_cpus_to_tasks(wanted, size, cpus) == pytest.approx(each)
    assert cpus - size * each >= min(cpus, CPUS_LEFT_TO_TASKS) - 1e-9


class _Engine:
    def __init__(self, precision: str) -> None:
        self.precision = precision


def test_a_cpu_actors_engine_computes_on_its_share_of_the_cores(monkeypatch):
    """Ray gives an actor reserving a fraction of a CPU one OpenMP thread; the engine must use the
    threads its pool gave it (``ActorPool.threads``), whichever job the actor belongs to."""
    import torch

    from pipeline.config.settings import InferenceSpec
    from pipeline.ray_runtime.pool import actor_upscaler

    built = []

    def build_upscaler(spec, scale, **settings):
        built.append(settings)
        return _Engine(spec.precision)

    monkeypatch.setattr("pipeline.config.builder.build_upscaler", build_upscaler)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            spec = InferenceSpec(weights="w.pth", device="cpu", precision="fp32")
            assert actor_upscaler(spec, 2, threads, Files()).precision == "fp32"
            assert torch.get_num_threads() == threads
        assert [kw["device"] for kw in built] == ["cpu", "cpu"]
    finally:
        torch.set_num_threads(before)


_FIRST_TASK = """
import os, time, psutil, ray
from pipeline.ray_runtime.session import connect, shutdown_on_exit

with shutdown_on_exit():
    connect(None)
    raylet = next(p for p in psutil.Process().children(recursive=True) if p.name() == "raylet")
    deadline = time.time() + 60
    while time.time() < deadline and not any(c.name() == "ray::IDLE" for c in raylet.children()):
        time.sleep(0.1)
    started_ahead = {c.pid for c in raylet.children() if c.name() == "ray::IDLE"}
    pid = ray.get(ray.remote(num_cpus=1)(lambda: os.getpid()).remote())
    print("started ahead" if pid in started_ahead else f"a new worker {pid}, not one of {started_ahead}")
"""


@pytest.mark.integration
def test_an_embedded_rays_first_task_runs_on_a_worker_ray_started_ahead():
    """Workers Ray starts with the cluster serve only jobs without a runtime environment: with one
    (as training needs, ``connect(ray_train=True)``), each first task waits for a new worker."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    run = subprocess.run(
        [sys.executable, "-c", _FIRST_TASK], env=env, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "started ahead", run.stdout


_CONNECT = """
import ray
from pipeline.ray_runtime.session import connect, shutdown_on_exit

with shutdown_on_exit():
    connect(None)
    print(ray.get_runtime_context().gcs_address)
"""


@pytest.mark.integration
def test_a_stale_note_of_a_dead_ray_start_head_does_not_stop_an_embedded_ray(tmp_path):
    """``ray start`` leaves the address of its head in RAY_TMPDIR/ray/ray_current_cluster, and a
    head killed without ``ray stop`` leaves it behind: ``ray.init()`` would try to join it."""
    import tempfile

    temp = tempfile.mkdtemp(prefix="rs", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    os.makedirs(os.path.join(temp, "ray"))
    with socket.socket() as closed:  # a port nothing listens on once closed
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
    with open(os.path.join(temp, "ray", "ray_current_cluster"), "w") as note:
        note.write(dead)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": temp}
    run = subprocess.run(
        [sys.executable, "-c", _CONNECT], env=env, capture_output=True, text=True, timeout=90
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() and run.stdout.strip() != dead, run.stdout
