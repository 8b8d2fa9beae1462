"""Pieces of pipeline.raycluster that need no Ray running."""

import types

from ray.exceptions import RaySystemError

from pipeline.raycluster import _after_shutdown


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
