"""Prepared training sets: their layout, opening one, dividing it among Ray Train workers, and
cutting patches from it at memory speed (``pan prepare`` makes them: ``pipeline.training.prepare``).

Layout under the set's folder or URL:
- ``shards/<source>/<image>/``: one shard per source image (``shard_name``). ``hr.npy``: its HR
  sub-images, uint8 N x C x C x 3 (RGB, C the crop size). ``x<s>.npy`` for each scale s: the LR
  sub-images, uint8 N x C/s x C/s x 3, slices of the whole image's LR at the same place, so LR
  pixel (y, x) of sub-image i covers HR pixels (s*y .. s*y+s-1, s*x .. s*x+s-1) of HR sub-image i.
  ``index.json``, written last, says the shard is complete: where each sub-image lies in the image
  (``positions``, HR pixels), the image's size once cut to a multiple of every scale, and where
  each scale's LR came from.
- ``prepare.json``: what the set is made of (sources and their digests, scales, crop size, step),
  written when the first run starts; a later run with other settings or changed sources is refused.
- ``manifest.json``: written last by a run that took every input: ``prepare.json``'s content, the
  package version, the counts, and every shard with its sub-images and bytes. It makes the folder a
  prepared set (``open_prepared``); without it the preparation is unfinished.
- ``errors.jsonl``: the images the last run could not use (corrupt, too small...), one JSON object a
  line: ``source``, ``image``, ``error_type``, ``message``.

Plain uint8 ``.npy`` arrays: memory-mapped, a patch is a strided copy out of the page cache, with
nothing to decode (benchmarks/README.md, ``prepared_input.py``). A worker reads only its share of
the shards (``PreparedSet.shares``); from a URL it copies its share to the node's disk once
(``node_cache``) and maps the copies.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import DatasetError
from pipeline.io.storage import Files, is_url, join

FORMAT = "pan-prepared"
FORMAT_VERSION = 1  # raised when the layout changes: an older reader then refuses the set by name
MANIFEST_NAME = "manifest.json"
CLAIM_NAME = "prepare.json"
ERRORS_NAME = "errors.jsonl"
SHARDS_DIR = "shards"
INDEX_NAME = "index.json"
HR_NAME = "hr.npy"
# Shard files copied at once to a node: object stores answer each GET in tens of ms whatever its
# size, so a few in flight keep the link busy without holding many 30 MB shards in memory.
DOWNLOADS_IN_FLIGHT = 8


def dihedral(image: np.ndarray, k: int) -> np.ndarray:
    """Element ``k`` (0..7) of the dihedral group on an HxWxC array: rotate k%4 quarter turns, then
    mirror left-right when k >= 4."""
    image = np.rot90(image, k % 4)
    return image[:, ::-1] if k >= 4 else image


def lr_name(scale: int) -> str:
    return f"x{scale}.npy"


def shard_name(source: str, image: str) -> str:
    """The shard of ``image`` (its name in the source: a path without suffix) of source ``source``."""
    return f"{source}/{image}"


def shard_file(shard: str, name: str) -> str:
    """A file of a shard (``HR_NAME``, ``lr_name(s)``, ``INDEX_NAME``), relative to the set."""
    return f"{SHARDS_DIR}/{shard}/{name}"


@dataclass(frozen=True)
class Shard:
    """One shard of a set: its name, its number of sub-images, and the bytes of each of its files."""

    name: str
    crops: int
    bytes: dict[str, int]


@dataclass(frozen=True)
class PreparedSet:
    """A prepared set, as its manifest describes it. ``id`` names where it is and what it is made
    of (format, scales, crop size, step, its sources' and LR sets' digests): its shards are a
    function of these, so node-local copies of two sets never mix, and copies made before a re-run
    that added shards stay valid after it."""

    location: str
    scales: tuple[int, ...]
    crop_size: int
    step: int
    shards: tuple[Shard, ...]
    id: str

    @property
    def crops(self) -> int:
        return sum(s.crops for s in self.shards)

    def check(self, scale: int, patch_size: int, workers: int) -> None:
        """Refuse, naming what to change, a training run this set cannot feed: another scale, an LR
        patch larger than the LR sub-images, more workers than shards (each reads its own)."""
        if scale not in self.scales:
            have = ", ".join(f"x{s}" for s in self.scales)
            raise DatasetError(
                f"{self.location} is prepared at {have}, not x{scale}: prepare a set with --scale {scale}"
            )
        if patch_size > self.crop_size // scale:
            raise DatasetError(
                f"{self.location} holds {self.crop_size}-px sub-images, {self.crop_size // scale} px at "
                f"x{scale}: smaller than the {patch_size}-px LR patch; use a smaller --patch-size"
            )
        self._check_workers(workers)

    def _check_workers(self, workers: int) -> None:
        if workers > len(self.shards):
            raise DatasetError(
                f"{self.location} holds {len(self.shards)} shard(s) (one per image), fewer than the "
                f"{workers} workers that each read their own; use at most {len(self.shards)} workers"
            )

    def shares(self, world: int) -> list[tuple[Shard, ...]]:
        """The shards each of ``world`` workers reads: disjoint, together the whole set, and about
        equal in sub-images (largest first to the worker holding fewest), the same on every worker."""
        self._check_workers(world)
        loads, shares = [0] * world, [[] for _ in range(world)]
        for shard in sorted(self.shards, key=lambda s: (-s.crops, s.name)):
            rank = min(range(world), key=lambda r: (loads[r], r))
            shares[rank].append(shard)
            loads[rank] += shard.crops
        return [tuple(sorted(share, key=lambda s: s.name)) for share in shares]

    def sampler(
        self, shards: Sequence[Shard], scale: int, files: Files, *, seed: Sequence[int]
    ) -> PatchSampler:
        """A ``PatchSampler`` over ``shards`` at ``scale``, their files memory-mapped where they lie
        (a local set) or from copies on this node (a set at a URL: ``node_cache``)."""
        names = (HR_NAME, lr_name(scale))
        if is_url(self.location):
            paths = _copy_to_node(self, shards, names, files)
        else:
            paths = [[Path(self.location, shard_file(s.name, n)) for n in names] for s in shards]
        hr = [np.load(p[0], mmap_mode="r") for p in paths]
        lr = [np.load(p[1], mmap_mode="r") for p in paths]
        return PatchSampler(hr, lr, scale, np.random.default_rng(list(seed)))


def open_prepared(location: str, files: Files) -> PreparedSet | None:
    """The prepared set at ``location``, or None when it is none (other training sources: an
    archive, Parquet, a hub id...). A preparation that has not finished (``prepare.json`` without
    ``manifest.json``) is refused by name: training on part of a set would go unnoticed."""
    if not is_url(location) and not Path(location).is_dir():
        return None
    try:
        data = files.read_bytes(join(location, MANIFEST_NAME))
    except FileNotFoundError:
        if files.exists(join(location, CLAIM_NAME)):
            raise DatasetError(
                f"{location}: its preparation has not finished (no {MANIFEST_NAME}); run the same "
                "pan prepare again to finish it"
            ) from None
        return None
    try:
        manifest = json.loads(data)
        if manifest.get("format") != FORMAT:
            return None  # someone else's manifest.json: not a prepared set
        if manifest.get("version") != FORMAT_VERSION:
            raise DatasetError(
                f"{location} is a prepared set of format {manifest.get('version')}; this pan reads "
                f"{FORMAT_VERSION}: prepare it again with this pan"
            )
        shards = tuple(Shard(s["name"], int(s["crops"]), dict(s["bytes"])) for s in manifest["shards"])
        return PreparedSet(
            location,
            tuple(manifest["scales"]),
            int(manifest["crop_size"]),
            int(manifest["step"]),
            shards,
            _identity(location, manifest),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DatasetError(
            f"{join(location, MANIFEST_NAME)} is damaged ({exc}); run pan prepare again"
        ) from exc


def _identity(location: str, manifest: dict[str, Any]) -> str:
    made_of = [manifest[k] for k in ("format", "version", "scales", "crop_size", "step")]
    sources = [(s["location"], s["digest"], s["lr"]) for s in manifest["sources"]]
    return hashlib.sha256(json.dumps([location, made_of, sources], sort_keys=True).encode()).hexdigest()[:16]


def node_cache(prepared: PreparedSet) -> Path:
    """Where a node keeps its copies of a set at a URL: under the temp folder, by the set's ``id``.
    Kept after the run: a restarted worker, a resumed run or the next run on the node maps them
    again instead of copying them again; delete the folder to free the disk."""
    return Path(tempfile.gettempdir()) / "pan-prepared" / prepared.id


def _copy_to_node(
    prepared: PreparedSet, shards: Sequence[Shard], names: Sequence[str], files: Files
) -> list[list[Path]]:
    """Local paths of the files ``names`` of each shard, copied from the set's URL to
    ``node_cache`` unless a complete copy (its size as the manifest says) is there already. Copies
    are written atomically, so workers sharing a node never map a half-written file."""
    root = node_cache(prepared)
    paths = [[root / shard_file(s.name, n) for n in names] for s in shards]
    wanted = [
        (join(prepared.location, shard_file(s.name, n)), path)
        for s, row in zip(shards, paths, strict=True)
        for n, path in zip(names, row, strict=True)
        if not (path.exists() and path.stat().st_size == s.bytes.get(n))
    ]

    def copy(item: tuple[str, Path]) -> None:
        files.write_bytes(str(item[1]), files.read_bytes(item[0]))

    with ThreadPoolExecutor(DOWNLOADS_IN_FLIGHT) as pool:
        list(pool.map(copy, wanted))
    return paths


class PatchSampler:
    """Random aligned (LR, HR) patch pairs from sub-images: ``hr[i]`` is uint8 N_i x C x C x 3 and
    ``lr[i]`` its LR, N_i x C/s x C/s x 3 (arrays or memory maps).

    ``batch(n, p)`` -> ``(lr, hr)``: uint8 n x 3 x p x p and n x 3 x sp x sp, channels first as the
    model takes them. Sub-images are taken in a random order, each once per pass (as the authors'
    loader shuffles its sub-images), with a new random position and one of the 8 flips and
    rotations each time: the LR patch at (y, x) goes with the HR patch at (s*y, s*x), and both get
    the same transform. Randomness comes from ``rng`` alone (a numpy ``Generator``).

    Each patch is one strided copy into the channels-first batch, its transform folded into the
    source's strides: several times faster than copying a rotation or a mirror of 3-byte pixels
    into a channels-last array (benchmarks/README.md, ``prepared_input.py``).
    """

    def __init__(self, hr: Sequence[np.ndarray], lr: Sequence[np.ndarray], scale: int, rng: Any) -> None:
        if not hr or len(hr) != len(lr):
            raise ValueError(f"need as many HR as LR arrays, at least one: {len(hr)} and {len(lr)}")
        self.hr, self.lr, self.scale, self.rng = list(hr), list(lr), scale, rng
        counts = np.array([len(a) for a in self.hr])
        self._ends = np.cumsum(counts)
        self._starts = self._ends - counts
        self.lr_size = int(self.lr[0].shape[1])
        self._order = np.empty(0, dtype=np.int64)
        self._next = 0

    def __len__(self) -> int:
        """Sub-images: one pass takes each once."""
        return int(self._ends[-1])

    def _picks(self, n: int) -> np.ndarray:
        """The next ``n`` sub-images of the pass, starting a new shuffled pass where one runs out."""
        picks = []
        while n:
            if self._next == len(self._order):
                self._order, self._next = self.rng.permutation(len(self)), 0
            take = self._order[self._next : self._next + n]
            picks.append(take)
            self._next += len(take)
            n -= len(take)
        return np.concatenate(picks)

    def batch(self, n: int, patch: int, *, augment: bool = True) -> tuple[np.ndarray, np.ndarray]:
        if not 1 <= patch <= self.lr_size:
            raise ValueError(f"an LR patch of {patch} px does not fit in {self.lr_size}-px LR sub-images")
        s = self.scale
        lr_out = np.empty((n, 3, patch, patch), np.uint8)
        hr_out = np.empty((n, 3, s * patch, s * patch), np.uint8)
        picks = self._picks(n)
        shards = np.searchsorted(self._ends, picks, side="right")
        items = picks - self._starts[shards]
        ys, xs = self.rng.integers(0, self.lr_size - patch + 1, size=(2, n))
        turns = self.rng.integers(0, 8, size=n) if augment else np.zeros(n, dtype=np.int64)
        for i, (shard, item, y, x, k) in enumerate(zip(shards, items, ys, xs, turns, strict=True)):
            lr = self.lr[shard][item, y : y + patch, x : x + patch]
            hr = self.hr[shard][item, s * y : s * (y + patch), s * x : s * (x + patch)]
            lr_out[i] = dihedral(lr, int(k)).transpose(2, 0, 1)
            hr_out[i] = dihedral(hr, int(k)).transpose(2, 0, 1)
        return lr_out, hr_out
