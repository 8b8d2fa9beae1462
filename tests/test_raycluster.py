"""Pieces of pipeline.raycluster that need no Ray running."""

import types

import pytest
from ray.exceptions import RaySystemError

from pipeline.raycluster import CPUS_LEFT_TO_TASKS, _after_shutdown, _leave_cpus_to_tasks


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
        types.SimpleNamespace(exc_value=gone, object=_finalizer("pipeline.upscale")),
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
