"""Image pairs (HR + LR) for training and evaluation, read lazily (the training patches cut from
them: ``pipeline.training.patches``).

A ``PairSource`` is a sized, random-access list of pairs: ``pair(i)`` decodes item ``i`` when called
and nothing is decoded up front, so a training worker reads only the items it samples. Each pair is
a ``BenchmarkPair``: HR cropped at bottom/right to a multiple of the scale, and LR (the source's, or
made from that HR with the MATLAB bicubic ``imresize``); both HxWx3 uint8 RGB.

``open_pairs`` reads:
- a folder in the benchmark layout: ``HR/<name>.<ext>`` and, when present,
  ``LR_bicubic/X{s}/<name>x{s}.<ext>``, local or at a URL (``s3://.../Set5``: copied to the temp
  folder first, so a cluster's driver needs no local copy);
- a folder that holds only images (walked recursively, sorted by path), e.g. BSDS200: HR only;
  local, or a URL prefix (``s3://bucket/photos``) read image by image through ``files``;
- an archive of images (``.zip``/``.tar``/``.tar.gz``, local or URL), read by ``datasets``'
  imagefolder builder: DIV2K's official zips (``div2k_urls``);
- anything ``datasets.load_dataset`` loads (a hub id, a Parquet file or folder, an imagefolder
  with metadata) with an ``hr`` image column (or ``image``) and an optional ``lr`` one.

``lr_source`` names a second source of those kinds whose images are the LR ones (a DIV2K
``..._LR_bicubic_X{s}.zip``); they are paired with HR by name: ``0001`` <-> ``0001x{s}`` (or ``0001``).
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from pipeline.errors import DatasetError, InvalidImageError, PipelineError, first_line
from pipeline.imaging import IMAGE_SUFFIXES, decode_image, imresize
from pipeline.io.hub import is_repo_id, offline_mode, unreachable_reason
from pipeline.io.storage import Files, is_url, join

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
DIV2K_URL = "https://data.vision.ee.ethz.ch/cvl/DIV2K"
FORMS_THAT_WORK = (
    "a folder with HR/ (and optionally LR_bicubic/X{s}/), a folder or URL prefix of images, a Parquet file "
    "or folder, an imagefolder, DIV2K's official zips (DIV2K_train_HR.zip, with LR from "
    "DIV2K_train_LR_bicubic_X{s}.zip or made with bicubic), or a hub dataset stored as Parquet with an "
    "'hr' image column (optional 'lr')"
)


@dataclass(frozen=True)
class BenchmarkPair:
    """One image: HR cropped to a multiple of the scale, and its LR; both HxWx3 uint8."""

    name: str
    hr: np.ndarray
    lr: np.ndarray


def as_rgb8(pixels: np.ndarray) -> np.ndarray:
    """HxWx3 uint8: grayscale replicated, 16-bit rounded down to 8 bits."""
    if pixels.dtype == np.uint16:
        pixels = np.rint(pixels / 257.0).astype(np.uint8)
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels


def crop_to_multiple(image: np.ndarray, scale: int) -> np.ndarray:
    h, w = image.shape[:2]
    return image[: h - h % scale, : w - w % scale]


def make_pair(name: str, hr: np.ndarray, lr: np.ndarray | None, scale: int) -> BenchmarkPair:
    """Crop HR, make LR with MATLAB bicubic when absent, and check the sizes agree."""
    hr = crop_to_multiple(as_rgb8(hr), scale)
    lr = imresize(hr, 1.0 / scale) if lr is None else as_rgb8(lr)
    if (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2]:
        raise DatasetError(
            f"{name}: LR is {lr.shape[1]}x{lr.shape[0]}, which is not HR "
            f"{hr.shape[1]}x{hr.shape[0]} divided by {scale}"
        )
    return BenchmarkPair(name, hr, lr)


def div2k_urls(split: Literal["train", "valid"], scale: int) -> tuple[str, str]:
    """(HR zip URL, bicubic LR zip URL) of DIV2K's official archives: ``open_pairs(hr, s, lr_source=lr)``."""
    if split not in ("train", "valid") or scale not in (2, 3, 4):
        raise ValueError(f"DIV2K has splits train/valid and bicubic LR at x2/x3/x4, not {split!r} x{scale}")
    return f"{DIV2K_URL}/DIV2K_{split}_HR.zip", f"{DIV2K_URL}/DIV2K_{split}_LR_bicubic_X{scale}.zip"


# ---------------------------------------------------------------------------------------------
# named lists of encoded images


def _decode(data: bytes, name: str) -> np.ndarray:
    try:
        return decode_image(data, name=name).pixels
    except InvalidImageError as exc:
        raise DatasetError(str(exc)) from exc


class _Images(ABC):
    """A list of encoded images with names (path without suffix); ``read(i)`` decodes image i."""

    names: list[str]

    @abstractmethod
    def read(self, index: int) -> np.ndarray: ...


class _FileImages(_Images):
    def __init__(self, files: list[Path], root: Path) -> None:
        self.files = files
        self.names = [f.relative_to(root).with_suffix("").as_posix() for f in files]

    def read(self, index: int) -> np.ndarray:
        path = self.files[index]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"cannot read {path}: {exc}") from exc
        return _decode(data, str(path))


class _ColumnImages(_Images):
    """One image column of a ``datasets.Dataset``, read a row at a time with our decoder."""

    def __init__(self, ds: Any, column: str, source: str, files: Files) -> None:
        import datasets
        import pyarrow.compute as pc

        if not isinstance(ds.features[column], datasets.Image):
            raise DatasetError(
                f"column '{column}' of {source} holds {ds.features[column]}, not images (a Parquet export "
                f"of a loading-script dataset keeps only file paths); use {FORMS_THAT_WORK}"
            )
        # decode=False: our decoder and mode rules, not Pillow's via datasets.
        self.ds = ds.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        self.column, self.files = column, files
        # Only the path child is read: the table is memory-mapped, so embedded bytes are not loaded.
        paths = pc.struct_field(self.ds.with_format("arrow")[:][column], "path").to_pylist()
        self.names = [_path_stem(p) or f"{i:04d}" for i, p in enumerate(paths)]

    def read(self, index: int) -> np.ndarray:
        cell = self.ds[index][self.column]
        data, path = cell.get("bytes"), cell.get("path")
        if data is None and path:
            try:
                data = self.files.read_bytes(path)
            except (OSError, PipelineError) as exc:
                raise DatasetError(f"cannot read {path}: {exc}") from exc
        return _decode(data or b"", self.names[index])


class _UrlImages(_Images):
    """The images under a URL prefix (``rels``: their paths under it, sorted), read through ``files``."""

    def __init__(self, source: str, rels: list[str], files: Files) -> None:
        self.source, self.rels, self.files = source, rels, files
        self.names = [PurePosixPath(rel).with_suffix("").as_posix() for rel in rels]

    def read(self, index: int) -> np.ndarray:
        location = join(self.source, self.rels[index])
        try:
            data = self.files.read_bytes(location)
        except (OSError, PipelineError) as exc:
            raise DatasetError(f"cannot read {location}: {exc}") from exc
        return _decode(data, location)


def _path_stem(path: str | None) -> str:
    # imagefolder on an archive gives fsspec chained URLs: "zip://DIV2K_train_HR/0001.png::/x/a.zip".
    member = (path or "").split("::")[0].split("://")[-1]
    return PurePosixPath(member).stem


def _match_by_name(hr_names: Sequence[str], lr: _Images, scale: int, where: object) -> list[int]:
    """For each HR name, the index of its LR image: ``<name>x{s}`` or else ``<name>``."""
    index = {name: i for i, name in enumerate(lr.names)}
    rows = []
    for name in hr_names:
        row = index.get(f"{name}x{scale}", index.get(name))
        if row is None:
            raise DatasetError(f"{where} has no LR image for {name}")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# pair sources


class PairSource(ABC):
    """A sized, random-access list of ``BenchmarkPair``s at ``scale``; ``pair(i)`` decodes item i now."""

    name: str
    scale: int

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def pair(self, index: int) -> BenchmarkPair: ...

    def __iter__(self) -> Iterator[BenchmarkPair]:
        return (self.pair(i) for i in range(len(self)))


class ImagePairs(PairSource):
    """HR images and, optionally, LR images: HR ``i`` goes with LR ``lr_rows[i]`` (default ``i``)."""

    def __init__(
        self,
        name: str,
        scale: int,
        hr: _Images,
        lr: _Images | None = None,
        lr_rows: Sequence[int] | None = None,
    ) -> None:
        self.name, self.scale, self.hr, self.lr = name, scale, hr, lr
        self.lr_rows = lr_rows

    def __len__(self) -> int:
        return len(self.hr.names)

    @property
    def names(self) -> list[str]:
        """The name of each pair, in order: its HR image's path under the source, without suffix."""
        return self.hr.names

    def read_hr(self, index: int) -> np.ndarray:
        """HR image ``index`` as decoded (not cropped): a job making several scales decodes it once."""
        return self.hr.read(index)

    def read_lr(self, index: int) -> np.ndarray | None:
        """The source's own LR image for HR ``index`` as decoded, or None when it has none."""
        if self.lr is None:
            return None
        return self.lr.read(self.lr_rows[index] if self.lr_rows is not None else index)

    def pair(self, index: int) -> BenchmarkPair:
        if not 0 <= index < len(self):
            raise IndexError(f"pair {index} of {len(self)} in {self.name}")
        return make_pair(self.hr.names[index], self.read_hr(index), self.read_lr(index), self.scale)


def open_pairs(
    source: str,
    scale: int,
    *,
    split: str | None = None,
    lr_source: str | None = None,
    files: Files | None = None,
) -> PairSource:
    """A lazy ``PairSource`` over ``source`` (see the module docstring for the forms it takes).

    ``lr_source``: LR images from a second source (its ``hr``/``image`` images or files), paired by
    name; it replaces any LR that ``source`` has. Without LR, LR is made with MATLAB bicubic.
    URLs are read through ``files`` (a job's ``Files``: its storage options; default, none).
    """
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, not {scale}")
    files = files or Files()
    name, hr, lr, lr_rows = _open(source, scale, split, files)
    if lr_source is not None:
        lr = _open(lr_source, scale, split, files)[1]
        lr_rows = _match_by_name(hr.names, lr, scale, lr_source)
    if not hr.names:
        raise DatasetError(f"{source} holds no images")
    return ImagePairs(name, scale, hr, lr, lr_rows)


def load_benchmark(
    source: str, scale: int, *, split: str | None = None, files: Files | None = None
) -> tuple[str, list[BenchmarkPair]]:
    """(dataset name, every pair decoded) for the sources ``open_pairs`` reads."""
    pairs = open_pairs(source, scale, split=split, files=files)
    return pairs.name, list(pairs)


def _open(
    source: str, scale: int, split: str | None, files: Files
) -> tuple[str, _Images, _Images | None, list[int] | None]:
    """(name, HR images, LR images or None, LR index of each HR image, or None for the same index)."""
    path = Path(_benchmark_copy(source, scale, files) or source)
    if (path / "HR").is_dir():
        return (path.name, *_benchmark_folder(path, scale))
    if path.is_dir():
        images = _only_images(path)
        if images:
            return path.name, _FileImages(images, path), None, None
        if not any(path.iterdir()):
            raise DatasetError(f"{source} is empty")
    elif "://" not in source and not path.exists():
        if not is_repo_id(source):
            raise DatasetError(f"{source}: no such file or folder")
        reason = unreachable_reason()
        if reason and not offline_mode():  # offline mode: `datasets` reads its cache, at once
            raise DatasetError(
                f"{source}: no such file or folder, and the Hugging Face hub cannot be asked for it as a "
                f"dataset id: {reason} (with HF_HUB_OFFLINE=1 a cached copy is used)"
            )
    if is_url(source) and not _data_file_builder(source):
        images = _url_images(source, files)
        if images is not None:
            return _source_name(source), images, None, None
    ds = _load_hf(source, split, files)
    hr_col = next((c for c in ("hr", "image") if c in ds.column_names), None)
    if hr_col is None:
        raise DatasetError(f"{source} has no 'hr' column (columns: {ds.column_names}); use {FORMS_THAT_WORK}")
    lr = _ColumnImages(ds, "lr", source, files) if "lr" in ds.column_names else None
    return _source_name(source), _ColumnImages(ds, hr_col, source, files), lr, None


def _benchmark_copy(source: str, scale: int, files: Files) -> str | None:
    """A local copy of a benchmark folder at a URL (``HR/`` + ``LR_bicubic/X<scale>/``, as on
    disk), or None when ``source`` is not one. Sets are small (Urban100: ~100 images); the copy
    lives in a temp folder of this process, removed at exit, so a changed set is never read stale."""
    if not is_url(source) or _data_file_builder(source):
        return None
    wanted = ("HR/", f"LR_bicubic/X{scale}/")
    listed = [f for f in files.list_files(source) if f.startswith(wanted)]
    if not any(f.startswith("HR/") for f in listed):
        return None
    if source not in _COPIES:
        folder = tempfile.mkdtemp(prefix="pan-benchmark-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _COPIES[source] = Path(folder) / source.rstrip("/").rsplit("/", 1)[-1]  # the set's name
    root = _COPIES[source]
    for rel in listed:  # another scale of a set already here adds its LR folder
        target = root / rel
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(files.read_bytes(join(source, rel)))
    return str(root)


_COPIES: dict[str, Path] = {}  # benchmark folder URL -> its local copy in this process


def _benchmark_folder(root: Path, scale: int) -> tuple[_Images, _Images | None, list[int] | None]:
    hr_files = sorted(p for p in (root / "HR").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not hr_files:
        raise DatasetError(f"{root / 'HR'} holds no images")
    hr = _FileImages(hr_files, root / "HR")
    lr_dir = root / "LR_bicubic" / f"X{scale}"
    if not lr_dir.is_dir():
        return hr, None, None
    lr = _FileImages(sorted(p for p in lr_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), lr_dir)
    return hr, lr, _match_by_name(hr.names, lr, scale, lr_dir)


def _url_images(source: str, files: Files) -> _UrlImages | None:
    """The images under the URL prefix ``source`` when it holds nothing else (hidden files aside), as
    ``_only_images`` takes a local folder; else None."""
    listed = [f for f in files.list_files(source) if not any(part.startswith(".") for part in f.split("/"))]
    if not listed or any(PurePosixPath(f).suffix.lower() not in IMAGE_SUFFIXES for f in listed):
        return None
    return _UrlImages(source, listed, files)


def _only_images(root: Path) -> list[Path] | None:
    """The folder's image files, sorted, when it holds nothing else (hidden files aside); else None.

    Anything else (Parquet, a metadata file, a loading script) goes to ``datasets`` instead.
    """
    files = [
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    if not files or any(p.suffix.lower() not in IMAGE_SUFFIXES for p in files):
        return None
    return sorted(files)


def _source_name(source: str) -> str:
    path = Path(source)
    if not (path.exists() or "://" in source):
        return source  # a hub id
    name = source.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    for suffix in (*ARCHIVE_SUFFIXES, ".parquet"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _data_file_builder(source: str) -> str | None:
    """The ``datasets`` builder for a single data file or URL (Parquet, image archive), else None."""
    if Path(source).is_dir():
        return None
    name = source.split("?")[0].lower()
    if name.endswith(".parquet"):
        return "parquet"
    return "imagefolder" if name.endswith(ARCHIVE_SUFFIXES) else None


def _load_hf(source: str, split: str | None, files: Files) -> Any:
    """A ``datasets.Dataset`` from a hub id, a Parquet file/folder, an image archive or an
    imagefolder; URLs read with ``files``' storage options."""
    import datasets

    builder = _data_file_builder(source)
    options = {"storage_options": files.options} if files.options else {}
    try:
        if builder:
            loaded = datasets.load_dataset(builder, data_files=source, split=split, **options)
        else:
            loaded = datasets.load_dataset(source, split=split, **options)
    except Exception as exc:
        text = str(exc)
        if "scripts are no longer supported" in text or re.search(r"\bfound \S+\.py\b", text):
            raise DatasetError(
                f"{source} is a loading-script dataset, which `datasets` 4 and later refuse to run; "
                f"use {FORMS_THAT_WORK}"
            ) from exc
        raise DatasetError(f"cannot load dataset {source}: {first_line(exc)}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        for preferred in ("test", "validation", "train"):
            if preferred in loaded and (len(loaded) == 1 or preferred != "train"):
                return loaded[preferred]
        raise DatasetError(f"{source} has splits {sorted(loaded)}; choose one with --split")
    return loaded
