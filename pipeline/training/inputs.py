"""The input of a Ray Train worker: an endless stream of (LR, HR) patch batches for its steps, from
a prepared set (``pipeline.training.prepared``: the worker's own share of the shards, memory-mapped,
cut in a background thread) or from image sources (``PatchDataset`` through a DataLoader, one
decode per patch).

Batches of a prepared set come as uint8, N x 3 x H x W: a quarter of float32's bytes to copy and
to send to a GPU; ``as_model_input`` makes any batch the model's float input on its device.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch

from pipeline.config.settings import TrainJob
from pipeline.errors import PipelineError, SettingsError
from pipeline.training.prepared import PatchSampler, PreparedSet, open_prepared

# Batches cut ahead of the step: some absorb a slow batch (pages read from disk) while the step
# runs; four hold 27 MB at x4 with 32 patches of 64 px, and more buy nothing once the cutting is
# faster than the step.
PREFETCH_DEPTH = 4


def check_training_data(job: TrainJob) -> PreparedSet | None:
    """On the driver, before any worker starts: the prepared set ``job.data`` is, checked against
    the run (scale, patch size, workers), or None after opening the image sources (names only)."""
    from pipeline.io.pairs import open_pairs

    prepared = open_prepared(job.data, job.files)
    if prepared is None:
        open_pairs(job.data, job.scale, lr_source=job.lr_data, files=job.files)
        return None
    given = [flag for flag, value in (("--lr-data", job.lr_data), ("--five-crop", job.five_crop)) if value]
    if given:
        raise SettingsError(
            f"{job.data} is a prepared set, whose LR and sub-images are made: {' and '.join(given)} "
            "apply to image sources (pan prepare --lr-data takes official LR)"
        )
    prepared.check(job.scale, job.patch_size, job.workers)
    return prepared


def training_batches(
    job: TrainJob, per_worker: int, *, rank: int, world: int, device: torch.device, step: int
) -> Iterator[Any]:
    """This worker's batches, ``(lr, hr)`` of ``per_worker`` patches each, without end (``close()``
    it when done). ``step``: where the run resumes, so a resumed worker draws new patches and a
    DataLoader resumes at the epoch it was in."""
    prepared = open_prepared(job.data, job.files)
    if prepared is None:
        return _pair_batches(job, per_worker, device, step)
    share = prepared.shares(world)[rank]
    sampler = prepared.sampler(share, job.scale, job.files, seed=(job.seed, rank, step))
    return PrefetchedBatches(sampler, per_worker, job.patch_size, pin=device.type == "cuda")


def as_model_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch as the model takes it: float32 N x 3 x H x W in [0, 1] on ``device``; a uint8 batch
    is sent as it is and made float there, as ``PatchDataset`` makes its own."""
    batch = batch.to(device, non_blocking=True)
    return batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch


def _pair_batches(job: TrainJob, per_worker: int, device: torch.device, step: int) -> Iterator[Any]:
    """``PatchDataset`` batches through a DataLoader that Ray Train shards over the workers
    (DistributedSampler), epoch after epoch; batches on the worker's GPU where CUDA has one."""
    import ray.train.torch

    from pipeline.io.pairs import open_pairs
    from pipeline.training.patches import PatchDataset

    pairs = open_pairs(job.data, job.scale, lr_source=job.lr_data, files=job.files)
    dataset = PatchDataset(
        pairs, job.scale, job.patch_size, five_crop=job.five_crop, cache_images=job.cache_images
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_worker, shuffle=True, drop_last=True, num_workers=job.loader_workers
    )
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=device.type == "cuda")
    if len(loader) == 0:
        raise PipelineError(f"{job.data} has too few images for a batch of {per_worker} per worker")
    return _epochs(loader, step // len(loader))


def _epochs(loader: Any, epoch: int) -> Iterator[Any]:
    while True:
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class _Failed:
    """What the cutting thread hands on instead of a batch when it fails: its error."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class PrefetchedBatches:
    """``(lr, hr)`` uint8 N x 3 x H x W tensor batches from ``sampler.batch``, cut ``depth`` ahead
    in a background thread, without end; ``close()`` stops the thread. numpy's copies and the
    step's torch operators release the GIL, so the cutting overlaps the step. An error in the thread is raised
    by the ``next()`` that would have got its batch. ``pin``: batches in page-locked memory, so
    that copying them to a GPU need not wait."""

    def __init__(
        self,
        sampler: PatchSampler,
        batch_size: int,
        patch_size: int,
        *,
        depth: int = PREFETCH_DEPTH,
        pin: bool = False,
    ) -> None:
        self.sampler, self.batch_size, self.patch_size, self.pin = sampler, batch_size, patch_size, pin
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._cut, name="pan-patches", daemon=True)
        self._thread.start()

    def _cut(self) -> None:
        try:
            while not self._stop.is_set():
                lr, hr = (torch.from_numpy(a) for a in self.sampler.batch(self.batch_size, self.patch_size))
                self._hand_on((lr.pin_memory(), hr.pin_memory()) if self.pin else (lr, hr))
        except BaseException as exc:  # handed to the consumer, which raises it
            self._hand_on(_Failed(exc))

    def _hand_on(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> PrefetchedBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stop.is_set():
            raise StopIteration
        item = self._ready.get()
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
