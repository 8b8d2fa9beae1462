"""A Ray Train worker's input: batches cut in a background thread from its share of a prepared set,
made the model's float input on its device as ``PatchDataset`` makes its own, and runs the
prepared set cannot feed refused on the driver."""

import numpy as np
import pytest
import torch

from pipeline.config.settings import PrepareJob, TrainJob
from pipeline.errors import DatasetError, SettingsError
from pipeline.training.inputs import PrefetchedBatches, as_model_input, check_training_data, training_batches
from pipeline.training.patches import _to_tensor
from pipeline.training.prepare import _claim, plan_sources, prepare_image, run_prepare

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prepared(benchmarks_dir, tmp_path_factory) -> str:
    """Set5's HR images as a prepared set at x2 (96-px sub-images), made without Ray: the
    destination claimed and each shard written here, then ``run_prepare`` finds them all complete
    and writes the manifest."""
    job = PrepareJob(sources=str(benchmarks_dir / "Set5/HR"), dest=str(tmp_path_factory.mktemp("set")),
                     scale=2, crop_size=96, step=48)  # fmt: skip
    (plan,) = plan_sources(job)
    _claim(job, [plan])
    for index in range(len(plan.images)):
        prepare_image(job, plan, index)
    assert run_prepare(job).skipped == 5
    return job.dest


def _job(data: str, **settings) -> TrainJob:
    return TrainJob(**{"data": data, "scale": 2, "name": "r", "batch_size": 8, "patch_size": 24, **settings})


def test_a_prepared_batch_is_the_model_input_patch_dataset_would_give(prepared):
    batches = training_batches(_job(prepared), 4, rank=0, world=2, device=torch.device("cpu"), step=0)
    lr, hr = next(batches)
    batches.close()
    assert lr.shape == (4, 3, 24, 24) and hr.shape == (4, 3, 48, 48) and lr.dtype == torch.uint8
    model_lr = as_model_input(lr, torch.device("cpu"))
    assert model_lr.dtype == torch.float32 and model_lr.is_contiguous()
    for i in range(4):
        assert torch.equal(model_lr[i], _to_tensor(lr[i].permute(1, 2, 0).numpy()))
    floats = torch.zeros(2, 3, 4, 4)  # already the model's input (PatchDataset's): passed through
    assert as_model_input(floats, torch.device("cpu")) is floats


def test_workers_draw_from_their_own_shares_and_a_resume_draws_anew(prepared):
    def first(rank: int, step: int) -> torch.Tensor:
        cpu = torch.device("cpu")
        batches = training_batches(_job(prepared), 4, rank=rank, world=2, device=cpu, step=step)
        try:
            return next(batches)[0]
        finally:
            batches.close()

    assert torch.equal(first(0, 0), first(0, 0))  # seeded by (seed, rank, step)
    assert not torch.equal(first(0, 0), first(1, 0)) and not torch.equal(first(0, 0), first(0, 10))


class _Sampler:
    """Numbers its batches, and fails at the one ``fail_at`` names."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.made, self.fail_at = 0, fail_at

    def batch(self, n: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
        if self.made == self.fail_at:
            raise OSError("disk gone")
        self.made += 1
        return np.full((n, 3, patch, patch), self.made, np.uint8), np.zeros(
            (n, 3, 2 * patch, 2 * patch), np.uint8
        )


def test_prefetched_batches_come_in_order_stop_on_close_and_raise_the_cutting_error():
    batches = PrefetchedBatches(_Sampler(), 2, 4, depth=2)
    assert [int(next(batches)[0][0, 0, 0, 0]) for _ in range(5)] == [1, 2, 3, 4, 5]
    batches.close()
    assert not batches._thread.is_alive()
    failing = PrefetchedBatches(_Sampler(fail_at=1), 2, 4)
    next(failing)
    with pytest.raises(OSError, match="disk gone"):
        next(failing)


def test_runs_a_prepared_set_cannot_feed_are_refused_on_the_driver(prepared, benchmarks_dir):
    assert check_training_data(_job(prepared)).scales == (2,)
    assert check_training_data(_job(str(benchmarks_dir / "Set5"))) is None  # image sources
    with pytest.raises(SettingsError, match="--five-crop apply to image sources"):
        check_training_data(_job(prepared, five_crop=True))
    with pytest.raises(DatasetError, match="not x3"):
        check_training_data(_job(prepared, scale=3))
    with pytest.raises(DatasetError, match="holds 5 shard"):
        check_training_data(_job(prepared, workers=6))
