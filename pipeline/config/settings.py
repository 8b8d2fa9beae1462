"""The settings of every job, declared once: one frozen pydantic model per job kind (``upscale``,
``train``, ``eval``). Each field holds its type, its default and its help (the field's
description); the spec files in ``jobs/``, ``pan run --set`` and the flags of ``pan upscale``,
``pan train`` and ``pan eval`` are all derived from these models. Torch-free, so ``pan --help``
and ``pan validate`` stay quick.

Conventions, kept everywhere:
- ``"auto"`` (``AUTO``) means "decide at run time": the device (a GPU when the actor has one, else
  the CPU) and the tile size (the whole image when it fits in memory, else tiles). ``tile: 0``
  always means the whole image at once; there is no ``None`` tile.
- Places are typed ``Location`` (a local path or URL) or ``Source`` (that, or a Hugging Face repo
  id): validation makes local paths absolute, so a job means on Ray workers (whose working folder
  is not the user's) what it meant where it was typed. Relative paths in a spec file are read
  from the folder ``pan`` runs in, like paths given as flags.
- A spec file is YAML: ``kind:`` (which job), optionally ``schedule:`` (a cron line: the spec runs
  on a schedule, and ``pan submit`` names its submission by the day), and that job's fields.
  Anything else is refused, naming the key and the file. Every problem of a spec is reported at
  once, each naming its key (``InvalidSettingsError``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Literal,
)

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
)

from pipeline.core import AUTO, PRECISIONS, SCALES
from pipeline.core.tiling import DEFAULT_CONTEXT, MIN_TILE, check_tile
from pipeline.errors import SettingsError
from pipeline.imaging.codec import DEFAULT_MAX_PIXELS, PNG_FAST, check_png_level
from pipeline.imaging.gate import MAX_PATTERN_LEVELS, MIN_PSNR_VS_INPUT
from pipeline.io.hub import DEFAULT_WEIGHTS, resolve_source
from pipeline.io.storage import Files, join, resolve_location

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations only

# -- the vocabulary of settings -------------------------------------------------------------------

SCALE_PLACEHOLDER = "{scale}"  # in eval weights: replaced by each scale

SINKS = {
    "png": ("png",),
    "parquet": ("parquet",),
    "both": ("png", "parquet"),
}  # format -> the sinks it writes
Location = Annotated[str, AfterValidator(resolve_location)]
Source = Annotated[str, AfterValidator(resolve_source)]
Scale = Annotated[Literal[SCALES], Field(description="upscaling factor")]
Weights = Annotated[Source, Field(description="hub repo id, folder, weights file or URL of the PAN weights")]


def _device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ValueError(f"device {value!r} is unknown: use auto, cpu, cuda or cuda:N")
    return value


Device = Annotated[
    str,
    AfterValidator(_device),
    Field(
        description="where the model runs: auto (the GPU given to each actor, else the CPU), cpu, cuda[:N]",
    ),
]
Precision = Annotated[
    Literal[(*PRECISIONS, AUTO)],
    Field(
        description="fp32; bf16 (CPU and recent GPUs); fp16 (GPU only); auto: by what the device is, of "
        "those within 0.02 dB of fp32: bf16 on CPUs with native bf16 (AVX512_BF16, AMX) and GPUs of compute "
        "capability 8.0+, fp16 on 7.x, else fp32; an upscaling destination keeps its first outputs' precision"
    ),
]


def _tile(value: Any) -> Any:
    if value == AUTO:
        return value
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"tile {value!r} is neither {AUTO} nor a number of pixels")
    return check_tile(value)


Tile = Annotated[
    int | Literal[AUTO],
    BeforeValidator(_tile),
    Field(
        description=f"input tile size in pixels: auto (the whole image when it fits in memory, else "
        f"tiles), 0 (always the whole image) or at least {MIN_TILE}"
    ),
]


def _png_level(value: Any) -> Any:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return check_png_level(value)


PngLevel = Annotated[
    int | Literal[PNG_FAST],
    BeforeValidator(_png_level),
    Field(
        description=f"{PNG_FAST}: 8-bit RGB(A) through fpng, 7.5-9.5x the speed of zlib level 1 for files "
        "1.2-1.3x its size (16-bit and gray: level 1); 0-9: every PNG through libpng at this zlib level (1: "
        "the fastest, as small as 2-6; 7-9: 1-2.5% smaller for 10-40x the CPU)",
    ),
]
GpuWait = Annotated[
    float,
    Field(
        ge=0,
        description="seconds to wait for GPUs the cluster's autoscaler adds (a cluster resting at zero GPU "
        "nodes) before failing",
    ),
]
RayAddress = Annotated[
    str | None,
    Field(
        description="Ray cluster to join: auto (the one `ray start` began on this machine), HOST:PORT or "
        "ray://...; default: RAY_ADDRESS, else a new local Ray of this command's own"
    ),
]
Actors = Annotated[
    int | None,
    Field(
        ge=1, description="model actors (default: one per GPU, else one per CPU; extra ones share the GPUs)"
    ),
]
ActorCpus = Annotated[float, Field(gt=0, description="CPUs reserved per CPU actor (fractional)")]
StorageOptions = Annotated[
    dict[str, Any],
    Field(
        description='fsspec options for URLs, used by every read and write of the job, e.g. {"anon": true} '
        'or {"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}} (JSON)'
    ),
]


def _unique(values: tuple) -> tuple:
    """Repeats are harmless (``--scale 2 --scale 2``): the first of each, in order."""
    return tuple(dict.fromkeys(values))


def _as_tuple(value: Any) -> Any:
    """A single value where a list is expected (``scale: 2``) is a list of one."""
    return (value,) if isinstance(value, str | int) else value


class JobSpec(BaseModel):
    """What every job's settings share: frozen, unknown keys refused, defaults validated too."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
    kind: ClassVar[str]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> Self:
        """Settings from a spec file, overridden by the keyword arguments."""
        from pipeline.config.specfile import ENVELOPE, build_job, read_spec_file

        spec = read_spec_file(path)
        if spec.get("kind", cls.kind) != cls.kind:
            raise SettingsError(f"{path} is a {spec['kind']!r} job spec, not {cls.kind!r}")
        settings = {k: v for k, v in spec.items() if k not in ENVELOPE}
        return build_job(cls, {**settings, **overrides}, path)

    @property
    def files(self) -> Files:
        """How the job reaches its files: its ``storage_options``, once, for every read and write
        in every process of the job (``pipeline.io.storage.Files``)."""
        return Files(self.storage_options)


# -- how PAN runs -----------------------------------------------------------------------------------


class InferenceSpec(BaseModel):
    """How PAN runs, declared once: the weights and every engine setting. Jobs that run PAN inherit
    these fields (flat in spec files and flags: ``tile: 256``, ``--precision bf16``);
    ``pipeline.config.builder.build_upscaler`` is the one builder that turns them into an ``Upscaler``."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    weights: Weights = DEFAULT_WEIGHTS
    device: Device = AUTO
    # auto: upscaling is for pictures, and equal quality at about twice the speed is what users want;
    # evaluation (EvalJob) and training's validation keep fp32, the paper's protocol.
    precision: Precision = AUTO
    tile: Tile = AUTO
    context: int = Field(
        DEFAULT_CONTEXT,
        ge=0,
        description="input pixels read around each tile: with 24, tiled output is within 1 level of the "
        "whole image's in fp32 and 4 in bf16; with 40, within 1 in any precision (slower)",
    )
    batch_size: int | Literal[AUTO] = Field(
        AUTO, description="windows per forward pass: auto (as many as the memory budget holds, up to 16) or N"
    )
    compile: bool = Field(
        False, description="torch.compile the model, once per window shape (a bounded cache; eager beyond it)"
    )
    cuda_graphs: bool = Field(
        True,
        description="on a GPU, replay recurring batch shapes from CUDA graphs (each keeps its activations' "
        "memory); off: every pass eager",
    )

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if value != AUTO and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"batch_size {value!r} is neither {AUTO} nor a positive number")
        return value

    def inference(self) -> InferenceSpec:
        """These settings alone (from a job that inherits them)."""
        return InferenceSpec(**{name: getattr(self, name) for name in InferenceSpec.model_fields})


# -- the jobs ---------------------------------------------------------------------------------------


class UpscaleJob(JobSpec, InferenceSpec):
    """Every setting of a batch upscaling run (``pipeline.batch.job``)."""

    kind: ClassVar[str] = "upscale"

    source: Location = Field(description="folder or URL (s3://...) of images, Parquet or tar shards")
    dest: Location = Field(description="output folder or URL; it belongs to pan")
    scale: Scale
    format: Literal["png", "parquet", "both"] = Field(
        "png", description="outputs: a PNG tree, a Parquet catalogue, or both"
    )
    image_column: str = Field("image", description="image bytes column of Parquet shards")
    storage_options: StorageOptions = Field(default_factory=dict)
    overwrite: bool = Field(
        False, description="redo every input, replacing pan's earlier outputs (never files pan did not write)"
    )
    dest_inside_source: bool = Field(
        False, description="allow DEST inside SOURCE; DEST's files are then never read as inputs"
    )
    max_error_fraction: float | None = Field(
        None, ge=0, le=1, description="fail the run when a larger fraction of the inputs fails"
    )
    actors: Actors = None
    actor_cpus: ActorCpus = 0.5
    images_per_batch: int = Field(4, ge=1, description="images per model call of an actor")
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, description="refuse inputs with more pixels")
    min_psnr_vs_input: float | None = Field(
        MIN_PSNR_VS_INPUT,
        description="flag outputs that average back to their input (box filter) at a lower PSNR (dB) as "
        "suspect: photos measure 36 or more, noise PAN breaks on 19 or less; null: no such check",
    )
    max_pattern_levels: float | None = Field(
        MAX_PATTERN_LEVELS,
        description="flag outputs whose finest 2x2 pattern is stronger (RMS, 8-bit levels) as suspect: "
        "photos measure 4 or less, PAN's breakages 17 or more; null: no such check",
    )
    png_compress_level: PngLevel = PNG_FAST
    max_attempts: int = Field(
        3,
        ge=1,
        description="runs that try a failing input before it is reported as failed for good and skipped",
    )
    parquet_part_rows: int = Field(10_000, ge=1, description="rows per Parquet part, at most")
    parquet_part_bytes: int = Field(
        128 * 2**20,
        ge=1,
        description="bytes of PNG per Parquet part, about (a part closes when it is past this)",
    )
    rescan_dest: bool = Field(
        False,
        description="find finished outputs by listing DEST and reading its Parquet names instead of trusting "
        "its run ledger (after outputs were deleted or moved by hand); slow on big destinations",
    )
    wait_for_lease: bool = Field(
        False, description="wait while another run holds DEST's lease, instead of exiting with code 75"
    )
    lease_seconds: float = Field(
        300, ge=10, description="how long DEST's lease lasts unless renewed (every third of it) by a live run"
    )
    gpu_wait_seconds: GpuWait = 900
    address: RayAddress = None

    @property
    def sinks(self) -> tuple[str, ...]:
        return SINKS[self.format]


class TrainJob(JobSpec):
    """Every setting of a training run (``pipeline.training.job``)."""

    kind: ClassVar[str] = "train"

    data: Source = Field(
        description="training images: a prepared set (pan prepare; found by its manifest.json), or a folder, "
        "DIV2K zip, Parquet, imagefolder or hub id"
    )
    lr_data: Source | None = Field(
        None, description="the matching LR archive or folder (default: bicubic from the HR images)"
    )
    scale: Scale
    name: str = Field(pattern=r"^[\w.-]+$", description="run name, a folder under storage (the same resumes)")
    storage: Location = Field("runs", description="where runs live: folder or URL")
    workers: int = Field(1, ge=1, description="Ray Train workers (the most, with min_workers)")
    min_workers: int | None = Field(
        None,
        ge=1,
        description="elastic: keep training on as few as this many workers when nodes are lost (spot GPUs), "
        "resuming from the last checkpoint, and grow back to workers as they return; default: always workers",
    )
    gpu: bool = Field(False, description="one GPU per worker, nccl, AMP")
    max_steps: int = Field(1000, ge=1, description="train until this many iterations in all")
    batch_per_worker: bool = Field(
        False,
        description="batch_size and lr are per worker instead: N workers take N x batch_size patches a step "
        "at N x lr (the linear scaling rule; a different recipe from the paper's)",
    )
    batch_size: int = Field(
        32,
        ge=1,
        validate_default=True,
        description="LR patches per step over all workers (the paper's 32), however many there are",
    )
    patch_size: int = Field(64, ge=8, description="LR patch size in pixels")
    lr: float = Field(7e-4, gt=0, description="peak learning rate")
    min_lr: float = Field(1e-7, ge=0, description="learning rate at the end of each cosine period")
    restart_every: int = Field(250_000, ge=1, description="cosine period in steps (the paper: 4 x 250k)")
    init_weights: Source | None = Field(None, description="fine-tune from these weights")
    val_data: Source | None = Field(None, description="benchmark set for validation, e.g. a Set5 folder")
    val_every: int = Field(500, ge=1, description="validate and checkpoint every N steps")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="keep an EMA of the weights, e.g. 0.999")
    five_crop: bool = Field(False, description="the model card's five-crop pre-augmentation (image sources)")
    loader_workers: int = Field(
        0,
        ge=0,
        description="data loader processes per worker (image sources; a prepared set's are cut in a thread)",
    )
    cache_images: int = Field(
        64, ge=0, description="decoded images kept in memory per worker (image sources)"
    )
    max_failures: int = Field(2, ge=0, description="worker failures to recover from")
    seed: int = Field(0, description="random seed")
    log_every: int = Field(10, ge=1, description="record the loss every N steps")
    storage_options: StorageOptions = Field(default_factory=dict)
    gpu_wait_seconds: GpuWait = 900
    address: RayAddress = None

    @field_validator("min_workers")
    @classmethod
    def _at_most_workers(cls, value: int | None, info: Any) -> int | None:
        workers = info.data.get("workers")
        if value is not None and workers is not None and value > workers:
            raise ValueError(f"{value} is more than workers ({workers})")
        return value

    @field_validator("batch_size")
    @classmethod
    def _shared_by_the_workers(cls, value: int, info: Any) -> int:
        workers = info.data.get("workers")
        if workers is not None and not info.data.get("batch_per_worker") and value < workers:
            raise ValueError(
                f"{value} patches cannot be shared by {workers} workers: raise it, or set batch_per_worker"
            )
        return value

    @property
    def run_dir(self) -> str:
        return join(self.storage, self.name)


class PrepareJob(JobSpec):
    """Every setting of preparing a training set once (``pipeline.training.prepare``): sub-images of
    the HR images with their LR at each scale, which training cuts patches from at memory speed."""

    kind: ClassVar[str] = "prepare"

    sources: Annotated[
        tuple[Source, ...],
        BeforeValidator(_as_tuple),
        AfterValidator(_unique),
        Field(
            min_length=1,
            description="training images: folders or URL prefixes of images, zips like DIV2K's, Parquet, "
            "imagefolders or hub ids (repeatable; DF2K is DIV2K train + Flickr2K)",
        ),
    ]
    dest: Location = Field(
        description="folder or URL of the prepared set: new, empty, or prepared by an earlier run with these "
        "settings (which this run finishes)"
    )
    scale: Annotated[
        tuple[Literal[SCALES], ...],
        BeforeValidator(_as_tuple),
        AfterValidator(_unique),
        Field(min_length=1, description="upscaling factors to make LR sub-images for (repeatable)"),
    ]
    lr_data: Annotated[
        tuple[Source, ...],
        BeforeValidator(_as_tuple),
        AfterValidator(_unique),
        Field(
            description="official LR sets (e.g. DIV2K_train_LR_bicubic_X2.zip), each used for the source and "
            "scale its image names fit (<name>x<scale>); elsewhere LR is made with MATLAB bicubic "
            "(repeatable)"
        ),
    ] = ()
    crop_size: int = Field(
        360, ge=12, description="HR sub-image size in pixels (the authors' 360); a multiple of every scale"
    )
    step: int = Field(
        180,
        ge=1,
        description="HR pixels from one sub-image to the next (the authors' 180: neighbours overlap by half, "
        "so patches across their seams occur too); a multiple of every scale",
    )
    split: str | None = Field(None, description="dataset split (default: test, validation or the only one)")
    storage_options: StorageOptions = Field(default_factory=dict)
    address: RayAddress = None

    @field_validator("crop_size", "step")
    @classmethod
    def _multiple_of_every_scale(cls, value: int, info: Any) -> int:
        """Sub-images start and end on every scale's LR pixel grid, so their LR is a slice of the
        whole image's LR: crop and step are multiples of the scales' least common multiple."""
        scales = info.data.get("scale")
        if not scales:
            return value  # the scale itself is refused, and says so
        grid = math.lcm(*scales)
        if value % grid:
            lower = value - value % grid
            hint = f"{lower} or {lower + grid}" if lower else f"{grid}"
            every = ", ".join(map(str, scales))
            raise ValueError(f"{value} is not a multiple of {grid} (every scale's: {every}); use {hint}")
        return value


class EvalJob(JobSpec, InferenceSpec):
    """Every setting of a benchmark evaluation (``pipeline.evaluation.job``)."""

    kind: ClassVar[str] = "eval"

    data: Annotated[
        tuple[Source, ...],
        BeforeValidator(_as_tuple),
        AfterValidator(_unique),
        Field(
            min_length=1,
            description="benchmark sets: folder with HR/ (+ LR_bicubic/), image folder, Parquet, "
            "imagefolder or hub id (repeatable)",
        ),
    ]
    scale: Annotated[
        tuple[Literal[SCALES], ...],
        BeforeValidator(_as_tuple),
        AfterValidator(_unique),
        Field(min_length=1, description="upscaling factors (repeatable)"),
    ]
    weights: Weights = Field(
        DEFAULT_WEIGHTS,
        description=f"as for upscale; {SCALE_PLACEHOLDER} is replaced by each scale, "
        f"e.g. weights/PANx{SCALE_PLACEHOLDER}_DF2K.pth",
    )
    split: str | None = Field(None, description="dataset split (default: test, validation or the only one)")
    precision: Precision = "fp32"  # the paper's figures are fp32 ones; a reduced precision is asked for
    report: Location | None = Field(None, description="write the scores here as JSON")
    compare_dir: Location | None = Field(
        None, description="write bicubic | PAN | HR pictures as DIR/<set>/x<scale>/<image>.png"
    )
    storage_options: StorageOptions = Field(default_factory=dict)
    actors: Actors = None
    actor_cpus: ActorCpus = 0.5
    images_per_batch: int = Field(1, ge=1, description="images per model call of an actor")
    gpu_wait_seconds: GpuWait = 900
    address: RayAddress = None

    def weights_for(self, scale: int) -> str:
        return self.weights.replace(SCALE_PLACEHOLDER, str(scale))


KINDS: dict[str, type[JobSpec]] = {cls.kind: cls for cls in (UpscaleJob, PrepareJob, TrainJob, EvalJob)}

# -- spec files, --set and flags --------------------------------------------------------------------
