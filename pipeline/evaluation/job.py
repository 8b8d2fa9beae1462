"""Benchmark evaluation on Ray Data: several sets at several scales in one run, the images sharded
over an actor pool, one ``EvalReport`` per (set, scale) whose numbers equal ``evaluate``'s.

Flow: the driver checks the weights for every scale (fails fast, before any Ray work), loads each
(set, scale) with ``load_benchmark`` and puts its pairs into the object store as blocks of one
image (then drops them, so a large set is never held whole on the driver next to the others) ->
an actor pool scores them with ``score_pair`` (one ``Upscaler`` per scale per actor, weights loaded
once each; comparison pictures written from there) -> the driver gathers the scores into reports,
images in ``load_benchmark``'s order.

Scores are computed by the same functions as the single-process path, on the same uint8 arrays,
so they are equal to it (see ``tests/test_eval_job.py``).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config.settings import SCALE_PLACEHOLDER, EvalJob
from pipeline.errors import PipelineError, WeightsError
from pipeline.evaluation.scoring import EvalReport, ImageScore, score_pair
from pipeline.io.pairs import BenchmarkPair, load_benchmark
from pipeline.ray_runtime.pool import (
    actor_upscaler,
    data_context,
    dataset_batches,
    model_stage,
    place_model_actors,
)
from pipeline.ray_runtime.session import connect

_SCORES = ("psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y")


def comparison_location(compare_dir: str, dataset: str, scale: int, image: str) -> str:
    from pipeline.io.storage import join

    return join(compare_dir, f"{dataset}/x{scale}/{image}.png")


def comparison_png(pair: BenchmarkPair, score: ImageScore, sr: np.ndarray, bicubic: np.ndarray) -> bytes:
    """The bicubic | PAN | HR picture of one scored image, labelled with PSNR_Y, as PNG bytes."""
    from pipeline.evaluation.report import comparison_picture

    picture = comparison_picture(
        [
            (f"Bicubic {score.bicubic_psnr_y:.2f} dB", bicubic),
            (f"PAN {score.psnr_y:.2f} dB", sr),
            ("HR", pair.hr),
        ]
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


class EvalActor:
    """Scores benchmark images; keeps one Upscaler per scale, each loaded on first use, with
    ``threads`` torch threads on the CPU."""

    def __init__(self, job: EvalJob, threads: int) -> None:
        self.job, self.threads, self.files = job, threads, job.files
        self.upscalers: dict[int, Any] = {}
        # A GPU actor takes two batches at once (``actor_pool``): without the lock, both could
        # build the same scale's engine, loading its weights and taking its memory twice.
        self._building = threading.Lock()

    def _upscaler(self, scale: int):
        with self._building:
            if scale not in self.upscalers:
                spec = self.job.inference().model_copy(update={"weights": self.job.weights_for(scale)})
                self.upscalers[scale] = actor_upscaler(spec, scale, self.threads, self.files)
            return self.upscalers[scale]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows (task, index, dataset, scale, name, hr, lr) -> rows (task, index, *scores)."""
        out: dict[str, list] = {"task": [], "index": [], **{k: [] for k in _SCORES}}
        for i in range(len(batch["task"])):
            scale, dataset = int(batch["scale"][i]), str(batch["dataset"][i])
            pair = BenchmarkPair(str(batch["name"][i]), batch["hr"][i], batch["lr"][i])
            score, sr, bicubic = score_pair(self._upscaler(scale), pair)
            if self.job.compare_dir:
                location = comparison_location(self.job.compare_dir, dataset, scale, pair.name)
                self.files.write_bytes(location, comparison_png(pair, score, sr, bicubic))
            out["task"].append(int(batch["task"][i]))
            out["index"].append(int(batch["index"][i]))
            for k in _SCORES:
                out[k].append(float(getattr(score, k)))
        return {
            "task": np.array(out["task"], dtype=np.int64),
            "index": np.array(out["index"], dtype=np.int64),
            **{k: np.array(out[k], dtype=np.float64) for k in _SCORES},
        }


@dataclass(frozen=True)
class _Task:
    dataset: str
    scale: int
    names: tuple[str, ...]


def _weights_ids(job: EvalJob) -> dict[int, str]:
    """Load each scale's weights once on the driver: bad weights fail before any Ray work."""
    from pipeline.io.weights import load_pretrained

    ids = {}
    for scale in job.scale:
        try:
            ids[scale] = load_pretrained(job.weights_for(scale), scale=scale, files=job.files).weights_info.id
        except WeightsError as exc:
            if len(job.scale) > 1 and SCALE_PLACEHOLDER not in job.weights:
                hint = f"for several scales, put {SCALE_PLACEHOLDER} in the weights path"
                raise WeightsError(f"{exc} ({hint})") from exc
            raise
    return ids


def _put_benchmarks(job: EvalJob) -> tuple[list[_Task], Any]:
    """Load every (set, scale) and put its images into the object store; the union Dataset."""
    import ray.data

    tasks: list[_Task] = []
    parts = []
    for source in job.data:
        for scale in job.scale:
            dataset, pairs = load_benchmark(source, scale, split=job.split, files=job.files)
            if any(t.dataset == dataset and t.scale == scale for t in tasks):
                raise PipelineError(
                    f"two benchmark sets are named {dataset}; their reports and pictures would clash"
                )
            rows = [
                {"task": len(tasks), "index": i, "dataset": dataset, "scale": scale,
                 "name": p.name, "hr": p.hr, "lr": p.lr}
                for i, p in enumerate(pairs)
            ]  # fmt: skip
            # from_items puts each block into the object store now: one image per block.
            parts.append(ray.data.from_items(rows, override_num_blocks=len(rows)))
            tasks.append(_Task(dataset, scale, tuple(p.name for p in pairs)))
    return tasks, parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def run_eval(job: EvalJob, on_progress: Callable[[int, int], None] | None = None) -> list[EvalReport]:
    """One report per (source, scale), sources outer, scales inner; ``on_progress(done, total)``.

    Raises ``WeightsError`` (before Ray work), ``DatasetError`` from ``load_benchmark`` (e.g. a
    loading-script hub set), or the ``PipelineError`` that made an actor fail.
    """

    from pipeline.io.pairs import open_pairs

    weights_ids = _weights_ids(job)
    for source in job.data:  # names only, nothing decoded: a bad set fails before Ray starts
        for scale in job.scale:
            open_pairs(source, scale, split=job.split, files=job.files)
    if job.compare_dir:
        job.files.check_writable(job.compare_dir)
    connect(job.address)
    data_context()
    tasks, ds = _put_benchmarks(job)
    total = sum(len(t.names) for t in tasks)
    # No decode/encode tasks compete for the CPUs here (unlike the upscale job): one actor per CPU.
    pool = place_model_actors(job.device, job.actors, job.actor_cpus, total, job.gpu_wait_seconds)
    scored = model_stage(ds, EvalActor, pool, batch_size=job.images_per_batch, job=job)
    scores: dict[tuple[int, int], dict[str, float]] = {}
    with dataset_batches(scored) as batches:
        for batch in batches:
            for j, key in enumerate(zip(batch["task"].tolist(), batch["index"].tolist(), strict=True)):
                scores[key] = {k: float(batch[k][j]) for k in _SCORES}
            if on_progress:
                on_progress(len(scores), total)
    if len(scores) != total:  # a bug, not a user error: never hand back a silently short report
        raise RuntimeError(f"{total} images went in but {len(scores)} scores came back")
    return [
        EvalReport(
            t.dataset,
            t.scale,
            weights=weights_ids[t.scale],
            images=[ImageScore(name, **scores[(n, i)]) for i, name in enumerate(t.names)],
        )
        for n, t in enumerate(tasks)
    ]


def evaluate_many(
    sources: Sequence[str], scales: Sequence[int], weights: str | None = None, **settings: Any
) -> list[EvalReport]:
    """``run_eval`` of an ``EvalJob`` of these sets, scales, weights (None: the default) and settings."""
    if weights is not None:
        settings["weights"] = weights
    return run_eval(EvalJob(data=tuple(sources), scale=tuple(scales), **settings))
