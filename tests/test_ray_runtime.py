"""pipeline.ray_runtime.private: the Ray internals pan relies on are still there."""

import ray

from pipeline.ray_runtime import private


def test_the_installed_ray_still_has_every_private_name_pan_relies_on():
    assert private.missing() == [], (
        f"Ray {ray.__version__} no longer has these (checked on {private.CHECKED_ON}): {private.missing()}"
    )


def test_a_name_ray_dropped_is_reported():
    gone = [
        private.Logger("ray.no_such_module"),
        private.FileLogger("train/no_such_file.py"),
        private.Attribute("ray._private.ray_logging", "no_such_attribute"),
        private.Mention("RAY_NO_SUCH_VARIABLE_AT_ALL", "train"),
    ]
    assert not any(name.exists() for name in gone)


class _Failing:
    """Stands in for a Ray Dataset whose iteration fails as a Ray task's error would."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def iter_batches(self, **_):
        def batches():
            try:
                raise KeyError("where it went wrong")
            except KeyError as cause:
                raise self.error from cause
            yield

        return batches()


def test_a_bug_keeps_its_whole_chain_and_a_users_error_is_one_line():
    import pytest

    from pipeline.errors import WeightsError
    from pipeline.ray_runtime.pool import dataset_batches

    with pytest.raises(RuntimeError) as bug, dataset_batches(_Failing(RuntimeError("a bug"))) as batches:
        next(batches)
    assert isinstance(bug.value.__cause__, KeyError)  # the traceback a developer needs
    wrapped = RuntimeError("ray.exceptions.RayTaskError: pipeline.errors.WeightsError: no x4 weights here")
    with pytest.raises(WeightsError) as user, dataset_batches(_Failing(wrapped)) as batches:
        next(batches)
    assert str(user.value) == "no x4 weights here" and user.value.__suppress_context__
