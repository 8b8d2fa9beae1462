"""``pan prepare``: training sources made once into a prepared set (``pipeline.training.prepared``
says its layout), on Ray Data.

The driver opens every source as training does (``open_pairs``: names only, nothing decoded),
pairs the official LR sets with the sources and scales their names fit, takes each source's digest,
claims the destination (``prepare.json``), and lists the shards already complete. Ray Data tasks
then take the other images, one each: decode the HR image once; cut it to a multiple of every
scale; for each scale, take the source's LR or make it with the MATLAB bicubic ``imresize`` from
the HR image cut to a multiple of that scale (as the benchmark sets' LR is made); cut aligned
sub-images (``crop_positions``); write the shard's arrays and, last, its ``index.json``. The driver
records each image as it comes back, then writes ``errors.jsonl`` and ``manifest.json``.

Every image ends as exactly one of written, skipped (its shard was complete before: a re-run
finishes a killed one and redoes nothing) or failed (a row of ``errors.jsonl``: corrupt, smaller
than a sub-image, LR of the wrong size, a name another image of its source has). A shard is a pure
function of its image and the settings, written under its final names only when complete, so a run
killed anywhere, or two runs at once, leave no wrong shard. Failed images are tried again by the
next run.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.config.settings import PrepareJob
from pipeline.errors import (
    DestinationError,
    ImageTooSmallError,
    InvalidImageError,
    PipelineError,
    SettingsError,
    StorageError,
)
from pipeline.io.pairs import ImagePairs, as_rgb8, crop_to_multiple, make_pair, open_pairs
from pipeline.io.storage import Files, is_url, is_within, join
from pipeline.training.prepared import (
    CLAIM_NAME,
    ERRORS_NAME,
    FORMAT,
    FORMAT_VERSION,
    HR_NAME,
    INDEX_NAME,
    MANIFEST_NAME,
    SHARDS_DIR,
    lr_name,
    shard_file,
    shard_name,
)

BICUBIC, OWN = "bicubic", "source"  # where a scale's LR comes from, besides an official LR set
# Index files read at once when a re-run gathers the shards of earlier runs for the manifest: an
# object store answers each small GET in tens of ms, so a few dozen in flight keep it busy.
INDEX_READS_IN_FLIGHT = 32
_CHUNK = 8 << 20  # bytes read at a time when hashing a source file


# -- the sources ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourcePlan:
    """One source of the job: where it is, its name (the first part of its shards' names), its
    images' names, its digest, and for each scale where LR comes from: an official LR set's
    location, ``OWN`` (the source's own LR images) or ``BICUBIC`` (made here), with the digests of
    the official LR sets it takes."""

    location: str
    name: str
    images: tuple[str, ...]
    digest: dict[str, str]
    lr: dict[int, str]
    lr_digests: dict[str, dict[str, str]]

    def record(self) -> dict[str, Any]:
        """What ``prepare.json`` and ``manifest.json`` say of the source."""
        lr = {
            str(s): {"from": where, "digest": self.lr_digests.get(where)}
            for s, where in sorted(self.lr.items())
        }
        return {"location": self.location, "name": self.name, "images": len(self.images),
                "digest": self.digest, "lr": lr}  # fmt: skip

    def pairs(self, scale: int, split: str | None, files: Files) -> ImagePairs:
        """The source's pairs at ``scale``, with its official LR set there if it has one."""
        lr = self.lr[scale] if self.lr[scale] in self.lr_digests else None
        versions = (self.digest["sha256"], self.lr_digests[lr]["sha256"] if lr else "")
        return _opened(self.location, scale, lr, split, files, versions)


def source_digest(location: str, files: Files, split: str | None = None) -> dict[str, str]:
    """``{"sha256": ..., "of": ...}``: of a local file's ``content``; of the ``listing`` of a folder,
    URL prefix or URL file (each file's path, size and version: mtime, ETag or last-modified, so a
    multi-GB archive at a URL is not downloaded to be hashed); of the image ``names`` of a hub id."""
    digest = hashlib.sha256()
    if not is_url(location) and not Path(location).exists():  # a hub id: its names are what we know
        digest.update("\n".join(open_pairs(location, 1, split=split, files=files).names).encode())
        return {"sha256": digest.hexdigest(), "of": "names"}
    fs, path = files.filesystem(location)
    if not is_url(location) and Path(location).is_file():
        with fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        return {"sha256": digest.hexdigest(), "of": "content"}
    infos = fs.find(path, detail=True) if fs.isdir(path) else {path: fs.info(path)}
    root = path.rstrip("/")
    for name, info in sorted(infos.items()):
        version = next(
            (str(info[k]) for k in ("ETag", "mtime", "LastModified", "last_modified") if k in info), ""
        )
        digest.update(f"{name[len(root) :].lstrip('/')}\t{info.get('size')}\t{version}\n".encode())
    return {"sha256": digest.hexdigest(), "of": "listing"}


@functools.lru_cache(maxsize=16)
def _opened(
    location: str, scale: int, lr: str | None, split: str | None, files: Files, versions: tuple[str, str]
) -> ImagePairs:
    """``open_pairs``, once per process for each version of the source and of its LR set (their
    digests' sha256): a Ray Data task process takes many images of a source, and opening one (a zip
    or Parquet through ``datasets``) costs up to seconds; a source that changed is opened again, so
    an image's index never names another image."""
    return open_pairs(location, scale, lr_source=lr, split=split, files=files)


def _lr_scale(location: str, names: Sequence[str]) -> int:
    """The scale of an official LR set, from its names: ``0001x2`` -> 2, the same for every image."""
    scales = {m.group(1) if (m := re.search(r"x(\d+)$", n)) else None for n in names}
    if len(scales) != 1 or None in scales:
        raise SettingsError(
            f"lr_data {location}: its images are not all named <name>x<scale> with one scale (as "
            "DIV2K's 0001x2.png), so the scale and the images they go with are unknown"
        )
    return int(scales.pop())


def plan_sources(job: PrepareJob) -> list[SourcePlan]:
    """Every source opened (names only) with its digest, each official LR set paired with the one
    source and scale its names fit; what a user can get wrong is refused here, before Ray."""
    files, split = job.files, job.split
    digests = {where: source_digest(where, files, split) for where in (*job.sources, *job.lr_data)}
    opened = [_opened(s, job.scale[0], None, split, files, (digests[s]["sha256"], "")) for s in job.sources]
    seen: dict[str, str] = {}
    for location, pairs in zip(job.sources, opened, strict=True):
        if pairs.name in seen:
            raise SettingsError(
                f"sources {seen[pairs.name]} and {location} are both named {pairs.name}: their shards "
                "would clash; give one of them another folder or file name"
            )
        seen[pairs.name] = location
    official: dict[tuple[int, int], str] = {}
    for lr in job.lr_data:
        names = _opened(lr, 1, None, split, files, (digests[lr]["sha256"], "")).names
        scale = _lr_scale(lr, names)
        if scale not in job.scale:
            raise SettingsError(f"lr_data {lr} holds x{scale} LR images, but --scale asks for {job.scale}")
        stems = {n[: -len(f"x{scale}")] for n in names}
        fits = [i for i, pairs in enumerate(opened) if set(pairs.names) <= stems]
        if not fits:
            raise SettingsError(f"lr_data {lr}: no source has its images (x{scale}) for each of its own")
        if (fits[0], scale) in official:
            raise SettingsError(
                f"lr_data {official[fits[0], scale]} and {lr} are both x{scale} LR of {job.sources[fits[0]]}"
            )
        official[fits[0], scale] = lr
    plans = []
    for i, (location, pairs) in enumerate(zip(job.sources, opened, strict=True)):
        taken = {s: official[i, s] for s in job.scale if (i, s) in official}
        plan = SourcePlan(location, pairs.name, tuple(pairs.names), digests[location],
                          {s: taken.get(s, BICUBIC) for s in job.scale},
                          {where: digests[where] for where in taken.values()})  # fmt: skip
        # Each scale opened now: an LR set missing an image fails here, by name; a source's own LR shows.
        own = {s: OWN for s in job.scale if s not in taken and plan.pairs(s, split, files).lr is not None}
        plans.append(dataclasses.replace(plan, lr={**plan.lr, **own}))
    return plans


# -- one image -> one shard -----------------------------------------------------------------------


def crop_positions(height: int, width: int, crop: int, step: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of the sub-images of a ``height`` x ``width`` image, rows first:
    every ``step`` pixels, and a last row and column flush with the bottom and right edges, so
    no pixel is left out (BasicSR's ``extract_subimages`` with ``thresh_size`` 0). The image is
    at least ``crop`` in both sides."""

    def starts(length: int) -> list[int]:
        found = list(range(0, length - crop + 1, step))
        return [*found, length - crop] if found[-1] + crop < length else found

    return [(y, x) for y in starts(height) for x in starts(width)]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def prepare_image(job: PrepareJob, plan: SourcePlan, index: int) -> dict[str, Any]:
    """Write the shard of image ``index`` of ``plan``'s source; returns its ``index.json`` content.
    Raises a ``PipelineError`` for an image that cannot be used (the caller makes it an error row)."""
    files, scales, crop = job.files, job.scale, job.crop_size
    image = plan.images[index]
    pairs = {s: plan.pairs(s, job.split, files) for s in scales}
    raw = pairs[scales[0]].read_hr(index)
    grid = math.lcm(*scales)
    hr = crop_to_multiple(as_rgb8(raw), grid)
    height, width = hr.shape[:2]
    if min(height, width) < crop:
        largest = min(height, width) // grid * grid
        raise ImageTooSmallError(
            f"{plan.name}/{image} is {width}x{height} (cut to a multiple of {grid}), smaller than the "
            f"{crop}-px sub-images"
            + (f"; prepare it with --crop-size {largest} or less" if largest >= 12 else "")
        )
    positions = crop_positions(height, width, crop, job.step)
    arrays = {HR_NAME: np.stack([hr[y : y + crop, x : x + crop] for y, x in positions])}
    for s in scales:
        lr = make_pair(f"{plan.name}/{image}", raw, pairs[s].read_lr(index), s).lr
        c = crop // s
        arrays[lr_name(s)] = np.stack([lr[y // s : y // s + c, x // s : x // s + c] for y, x in positions])
    shard = shard_name(plan.name, image)
    written = {name: _npy(array) for name, array in arrays.items()}
    for name, data in written.items():
        files.write_bytes(join(job.dest, shard_file(shard, name)), data)
    index_record = {
        "shard": shard,
        "source": plan.location,
        "image": image,
        "height": height,
        "width": width,
        "crops": len(positions),
        "positions": positions,
        "lr": {str(s): plan.lr[s] for s in scales},
        "bytes": {name: len(data) for name, data in written.items()},
    }
    files.write_bytes(join(job.dest, shard_file(shard, INDEX_NAME)), json.dumps(index_record).encode())
    return index_record


def error_type(exc: PipelineError) -> str:
    """The name of what went wrong: the image error a ``DatasetError`` wraps (``CorruptImageError``...)."""
    return type(exc.__cause__ if isinstance(exc.__cause__, InvalidImageError) else exc).__name__


def _prepare_row(row: dict[str, Any], job: PrepareJob, plans: list[SourcePlan]) -> dict[str, Any]:
    """A Ray Data task's work: one image (``source``, ``index``) -> its outcome row."""
    out = {
        "source": row["source"],
        "index": row["index"],
        "crops": 0,
        "bytes": "",
        "error_type": "",
        "message": "",
    }
    try:
        record = prepare_image(job, plans[int(row["source"])], int(row["index"]))
        out.update(crops=record["crops"], bytes=json.dumps(record["bytes"]))
    except StorageError:
        raise  # the destination cannot be written: no image's fault, the run stops and says so
    except PipelineError as exc:
        out.update(error_type=error_type(exc), message=str(exc))
    return out


# -- the job --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrepareSummary:
    """What a run did: ``inputs`` = ``written`` + ``skipped`` (complete before) + ``failed``; and the
    set it leaves: ``shards`` with ``sub_images`` in ``bytes``, at ``scales``."""

    inputs: int
    written: int
    skipped: int
    failed: int
    shards: int
    sub_images: int
    bytes: int
    scales: tuple[int, ...]
    seconds: float


def _claim(job: PrepareJob, plans: Sequence[SourcePlan]) -> dict[str, Any]:
    """``prepare.json``: written when the destination is new; a destination prepared with other
    settings, from other sources or ones that changed since, or holding files pan did not write,
    is refused. Returns the claim (without the package version, which may change between runs)."""
    claim = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "scales": sorted(job.scale),
        "crop_size": job.crop_size,
        "step": job.step,
        "sources": [p.record() for p in plans],
    }
    files, location = job.files, join(job.dest, CLAIM_NAME)
    try:
        recorded = json.loads(files.read_bytes(location))
    except FileNotFoundError:
        others = [f for f in files.list_files(job.dest) if not f.split("/")[-1].startswith(".")]
        if others:
            raise DestinationError(
                f"{job.dest} holds files pan prepare did not write ({others[0]}...); choose a new or "
                "empty folder"
            ) from None
        files.write_bytes(location, _json({**claim, "package_version": __version__}))
        return claim
    except ValueError as exc:
        raise DestinationError(f"{location} is damaged ({exc}); prepare into a new folder") from exc
    differs = [key for key in claim if key != "sources" and recorded.get(key) != claim[key]]
    if differs:
        said = ", ".join(f"{key} {recorded.get(key)}" for key in differs)
        raise DestinationError(
            f"{job.dest} was prepared with {said}: finish it with those, or prepare into a new folder"
        )
    before = {s["location"]: s for s in recorded.get("sources", [])}
    if set(before) != {p.location for p in plans}:
        raise DestinationError(
            f"{job.dest} was prepared from {', '.join(before)}: finish it from those sources, or "
            "prepare into a new folder"
        )
    for source in claim["sources"]:
        if before[source["location"]] != source:
            raise DestinationError(
                f"{source['location']} changed since {job.dest} was prepared from it (its digest or its "
                "LR differs); prepare into a new folder"
            )
    return claim


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=1) + "\n").encode()


def _complete_shards(job: PrepareJob) -> set[str]:
    """The shards of the destination that are complete (their ``index.json`` is written last),
    from one listing of ``shards/``."""
    suffix = "/" + INDEX_NAME
    listed = job.files.list_files(join(job.dest, SHARDS_DIR))
    return {f[: -len(suffix)] for f in listed if f.endswith(suffix)}


def _read_indexes(job: PrepareJob, shards: Sequence[str]) -> dict[str, dict[str, Any]]:
    def read(shard: str) -> dict[str, Any]:
        return json.loads(job.files.read_bytes(join(job.dest, shard_file(shard, INDEX_NAME))))

    with ThreadPoolExecutor(INDEX_READS_IN_FLIGHT) as pool:
        return dict(zip(shards, pool.map(read, shards), strict=True))


class _Outcomes:
    """Each image's outcome, recorded once: ``done`` (shard -> its index: crops and bytes),
    ``errors`` (rows of ``errors.jsonl``) and the counts by outcome."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.done: dict[str, dict[str, Any]] = {}
        self.errors: list[dict[str, Any]] = []

    def fail(self, plan: SourcePlan, image: str, kind: str, message: str) -> None:
        self.counts["failed"] += 1
        self.errors.append({"source": plan.location, "image": image, "error_type": kind, "message": message})

    def add(self, how: str, records: dict[str, dict[str, Any]]) -> None:
        self.counts[how] += len(records)
        self.done.update(records)


def _todo(job: PrepareJob, plans: Sequence[SourcePlan], outcomes: _Outcomes) -> list[dict[str, int]]:
    """The images to prepare: all but those whose shard is complete (recorded as skipped) and
    those whose name another image of their source took first (recorded as failed)."""
    complete = _complete_shards(job)
    todo, skipped, owner = [], [], {}
    for i, plan in enumerate(plans):
        for j, image in enumerate(plan.images):
            shard = shard_name(plan.name, image)
            if shard in owner:
                message = f"{plan.name}/{image}: {plan.images[owner[shard]]} of the source has this name too"
                outcomes.fail(plan, image, "DatasetError", message + "; rename one")
            elif shard in complete:
                skipped.append(shard)
            else:
                todo.append({"source": i, "index": j})
            owner.setdefault(shard, j)
    outcomes.add("skipped", _read_indexes(job, skipped))
    return todo


ProgressCallback = Callable[[Counter, int], None]


def run_prepare(job: PrepareJob, on_progress: ProgressCallback | None = None) -> PrepareSummary:
    """Prepare (or finish preparing) ``job.dest``; returns the run's summary.

    ``on_progress(counts, total)``: after each batch of images comes back, the images by outcome
    (written, failed, skipped) and how many there are. Raises the ``PipelineError`` that names
    what a user can fix (settings, sources, the destination) before any image is read.
    """
    started = time.perf_counter()
    for source in (*job.sources, *job.lr_data):
        if is_within(job.dest, source) or is_within(source, job.dest):
            raise DestinationError(
                f"the destination {job.dest} and the source {source} overlap: keep them apart"
            )
    plans = plan_sources(job)
    job.files.check_writable(job.dest)
    claim = _claim(job, plans)
    outcomes = _Outcomes()
    todo = _todo(job, plans, outcomes)
    total = sum(len(p.images) for p in plans)
    report = (lambda: on_progress(outcomes.counts, total)) if on_progress else (lambda: None)
    report()
    if todo:
        _compute(job, plans, todo, outcomes, report)
    if len(outcomes.errors) + len(outcomes.done) != total:  # a bug: never a silently short set
        raise RuntimeError(
            f"{total} images, but {len(outcomes.done)} shards and {len(outcomes.errors)} errors"
        )
    manifest = _write_manifest(job, claim, outcomes, total)
    counts = manifest["counts"]
    return PrepareSummary(
        total,
        outcomes.counts["written"],
        outcomes.counts["skipped"],
        outcomes.counts["failed"],
        counts["shards"],
        counts["sub_images"],
        counts["bytes"],
        tuple(sorted(job.scale)),
        time.perf_counter() - started,
    )


def _compute(
    job: PrepareJob,
    plans: Sequence[SourcePlan],
    todo: list[dict[str, int]],
    outcomes: _Outcomes,
    on_batch: Callable[[], None],
) -> None:
    """Prepare ``todo`` on Ray Data, a task of one CPU per image, recording each as it comes back."""
    import ray.data

    from pipeline.ray_runtime.pool import data_context, dataset_batches
    from pipeline.ray_runtime.session import connect

    connect(job.address)
    data_context()
    dataset = ray.data.from_items(todo, override_num_blocks=len(todo))
    dataset = dataset.map(_prepare_row, fn_kwargs={"job": job, "plans": list(plans)}, num_cpus=1)
    with dataset_batches(dataset) as batches:
        for batch in batches:
            for k in range(len(batch["source"])):
                plan = plans[int(batch["source"][k])]
                image = plan.images[int(batch["index"][k])]
                if batch["error_type"][k]:
                    outcomes.fail(plan, image, str(batch["error_type"][k]), str(batch["message"][k]))
                else:
                    record = {"crops": int(batch["crops"][k]), "bytes": json.loads(batch["bytes"][k])}
                    outcomes.add("written", {shard_name(plan.name, image): record})
            on_batch()


def _write_manifest(
    job: PrepareJob, claim: dict[str, Any], outcomes: _Outcomes, total: int
) -> dict[str, Any]:
    """``errors.jsonl`` (this run's failures), then ``manifest.json``: the claim, the package version,
    the counts (the set's, and failures by source) and every shard. Returns the manifest."""
    errors = outcomes.errors
    job.files.write_bytes(join(job.dest, ERRORS_NAME), "".join(json.dumps(e) + "\n" for e in errors).encode())
    done = outcomes.done
    shards = [{"name": s, "crops": done[s]["crops"], "bytes": done[s]["bytes"]} for s in sorted(done)]
    failed = Counter(e["source"] for e in errors)
    counts = {
        "images": total,
        "shards": len(shards),
        "failed": len(errors),
        "sub_images": sum(s["crops"] for s in shards),
        "bytes": sum(sum(s["bytes"].values()) for s in shards),
    }
    manifest = {
        **claim,
        "sources": [{**source, "failed": failed[source["location"]]} for source in claim["sources"]],
        "package_version": __version__,
        "counts": counts,
        "shards": shards,
    }
    job.files.write_bytes(join(job.dest, MANIFEST_NAME), _json(manifest))
    return manifest
