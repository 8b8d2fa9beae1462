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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import PipelineError, WeightsError
from pipeline.evaluate import BenchmarkPair, EvalReport, ImageScore, load_benchmark, score_pair
from pipeline.model import SCALES
from pipeline.raycluster import actor_device, actor_pool, connect, data_context, dataset_batches
from pipeline.tiling import check_tile

SCALE_PLACEHOLDER = "{scale}"
PRECISIONS = ("fp32", "bf16", "fp16")
_SCORES = ("psnr_y", "ssim_y", "bicubic_psnr_y", "bicubic_ssim_y")


@dataclass(frozen=True)
class EvalJob:
    """Every setting of a distributed evaluation; the one place their defaults live."""

    sources: tuple[str, ...]  # benchmark folders or ``datasets`` sources (see ``load_benchmark``)
    scales: tuple[int, ...]
    weights: str | None = None  # "{scale}" is replaced by each scale; None: the default hub weights
    split: str | None = None
    device: str = "auto"  # where actors compute: auto (their GPU if given one), cpu, cuda
    precision: str = "fp32"
    tile: int | None = None  # None: automatic by memory; 0: whole image
    compare_dir: str | None = None  # bicubic | PAN | HR pictures: <dir>/<set>/x<scale>/<image>.png
    address: str | None = None  # None: RAY_ADDRESS, else an embedded local Ray
    actors: int | None = None  # None: one per GPU, else one per CPU (never more than the images)
    actor_cpus: float = 0.5  # CPUs reserved per CPU actor (fractional)
    images_per_batch: int = 1

    def __post_init__(self) -> None:
        from pipeline.hub import resolve_source
        from pipeline.storage import resolve_location

        # Repeats are harmless (``--scale 2 --scale 2``): keep the first of each, in order. Local
        # paths become absolute: actors on Ray workers do not share the user's working folder.
        sources = tuple(dict.fromkeys(resolve_source(str(s)) for s in self.sources))
        object.__setattr__(self, "sources", sources)
        object.__setattr__(self, "scales", tuple(dict.fromkeys(int(s) for s in self.scales)))
        if self.weights:
            object.__setattr__(self, "weights", resolve_source(self.weights))
        if self.compare_dir:
            object.__setattr__(self, "compare_dir", resolve_location(self.compare_dir))
        if not self.sources:
            raise PipelineError("no benchmark set to evaluate: give at least one --data")
        if not self.scales or any(s not in SCALES for s in self.scales):
            raise PipelineError(f"scales must be among {SCALES}, got {list(self.scales)}")
        if self.precision not in PRECISIONS:
            raise PipelineError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.tile is not None:
            check_tile(self.tile)
        if self.actors is not None and self.actors < 1:
            raise PipelineError(f"actors must be at least 1, got {self.actors}")
        if self.images_per_batch < 1:
            raise PipelineError(f"images_per_batch must be at least 1, got {self.images_per_batch}")

    def weights_for(self, scale: int) -> str | None:
        return self.weights.replace(SCALE_PLACEHOLDER, str(scale)) if self.weights else self.weights


def comparison_location(compare_dir: str, dataset: str, scale: int, image: str) -> str:
    from pipeline.storage import join

    return join(compare_dir, f"{dataset}/x{scale}/{image}.png")


def comparison_png(pair: BenchmarkPair, score: ImageScore, sr: np.ndarray, bicubic: np.ndarray) -> bytes:
    """The bicubic | PAN | HR picture of one scored image, labelled with PSNR_Y, as PNG bytes."""
    from pipeline.report import comparison_picture

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
    """Scores benchmark images; keeps one Upscaler per scale, each loaded on first use."""

    def __init__(self, job: EvalJob) -> None:
        self.job = job
        self.upscalers: dict[int, Any] = {}

    def _upscaler(self, scale: int):
        if scale not in self.upscalers:
            from pipeline.engine import AUTO, Upscaler
            from pipeline.weights import load_pretrained

            device = actor_device(self.job.device)
            model = load_pretrained(self.job.weights_for(scale), scale=scale)
            tile = AUTO if self.job.tile is None else self.job.tile
            self.upscalers[scale] = Upscaler(model, device=device, precision=self.job.precision, tile=tile)
        return self.upscalers[scale]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows (task, index, dataset, scale, name, hr, lr) -> rows (task, index, *scores)."""
        from pipeline.storage import write_bytes

        out: dict[str, list] = {"task": [], "index": [], **{k: [] for k in _SCORES}}
        for i in range(len(batch["task"])):
            scale, dataset = int(batch["scale"][i]), str(batch["dataset"][i])
            pair = BenchmarkPair(str(batch["name"][i]), batch["hr"][i], batch["lr"][i])
            score, sr, bicubic = score_pair(self._upscaler(scale), pair)
            if self.job.compare_dir:
                location = comparison_location(self.job.compare_dir, dataset, scale, pair.name)
                write_bytes(location, comparison_png(pair, score, sr, bicubic))
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
    from pipeline.weights import load_pretrained

    ids = {}
    for scale in job.scales:
        try:
            ids[scale] = load_pretrained(job.weights_for(scale), scale=scale).weights_info.id
        except WeightsError as exc:
            if len(job.scales) > 1 and job.weights and SCALE_PLACEHOLDER not in job.weights:
                hint = f"for several scales, put {SCALE_PLACEHOLDER} in the weights path"
                raise WeightsError(f"{exc} ({hint})") from exc
            raise
    return ids


def _put_benchmarks(job: EvalJob) -> tuple[list[_Task], Any]:
    """Load every (set, scale) and put its images into the object store; the union Dataset."""
    import ray.data

    tasks: list[_Task] = []
    parts = []
    for source in job.sources:
        for scale in job.scales:
            dataset, pairs = load_benchmark(source, scale, split=job.split)
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


def _pool(job: EvalJob, images: int) -> dict[str, Any]:
    # No decode/encode tasks compete for the CPUs here (unlike the upscale job): one actor per
    # CPU, each running one torch thread (Ray sets OMP_NUM_THREADS=1 for fractional actors).
    pool = actor_pool(job.actors, job.actor_cpus)
    pool["size"] = max(1, min(pool["size"], images))
    return pool


def run_eval(job: EvalJob, on_progress: Callable[[int, int], None] | None = None) -> list[EvalReport]:
    """One report per (source, scale), sources outer, scales inner; ``on_progress(done, total)``.

    Raises ``WeightsError`` (before Ray work), ``DatasetError`` from ``load_benchmark`` (e.g. a
    loading-script hub set), or the ``PipelineError`` that made an actor fail.
    """
    import ray
    import ray.data

    from pipeline.datasets import open_pairs
    from pipeline.storage import check_writable

    weights_ids = _weights_ids(job)
    for source in job.sources:  # names only, nothing decoded: a bad set fails before Ray starts
        for scale in job.scales:
            open_pairs(source, scale, split=job.split)
    if job.compare_dir:
        check_writable(job.compare_dir)
    connect(job.address)
    data_context()
    tasks, ds = _put_benchmarks(job)
    total = sum(len(t.names) for t in tasks)
    pool = _pool(job, total)
    scored = ds.map_batches(
        EvalActor,
        fn_constructor_kwargs={"job": job},
        compute=ray.data.ActorPoolStrategy(size=pool["size"]),
        num_gpus=pool["num_gpus"],
        num_cpus=pool["num_cpus"],
        batch_size=job.images_per_batch,
        udf_modifying_row_count=False,
    )
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
    """``run_eval`` of an ``EvalJob(sources, scales, weights, **settings)``."""
    return run_eval(EvalJob(tuple(sources), tuple(scales), weights, **settings))
