"""Tiled, batched PAN inference on one device.

Array contract: ``Upscaler.upscale`` takes an H x W x 3 RGB or H x W (or H x W x 1) grayscale
``np.ndarray`` of dtype uint8 or uint16 and returns (scale*H) x (scale*W) in the same layout and
dtype. Values are mapped to [0, 1] by the dtype's maximum, the network output is clamped to [0, 1],
scaled back and rounded (the evaluation convention). Grayscale is run as RGB with equal channels and
averaged back.

Large images are cut into tiles: each tile's core is read with ``context`` pixels of image around
it, all windows have one shape (so they batch), and neighbouring cores cross-fade over a few pixels
with linear ramps, which blends the seams away. With the default context, tiled output equals
whole-image output within one level in fp32 and within 4 levels in bf16 (``pipeline.core.tiling`` says
why and what was measured). Tiles that come out non-finite in reduced precision are recomputed in
fp32.

``upscale_many`` runs several images together: their windows are grouped by shape and each group
goes through the model in batches, so equal-shape windows of different images share a forward
pass. With tiles, every window of an image larger than the tile has the tile's window shape, so a
few fixed shapes recur (shape buckets): compiled graphs (``compile``) and cuDNN plans are reused.
``build_upscaler`` turns an ``InferenceSpec`` into an ``Upscaler``: the one way jobs and commands
make one.
"""

from __future__ import annotations

import copy
import ctypes
import logging
import math
import os
import platform
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.core import AUTO, PRECISIONS
from pipeline.core.model import PAN
from pipeline.core.tiling import DEFAULT_CONTEXT, MIN_TILE, TileAssembler, TilePlan, check_tile, plan_axis
from pipeline.errors import DeviceError, first_line

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # one per PRECISIONS
MAX_BATCH = 16
MAX_COMPILED_SHAPES = 8  # window shapes compiled per Upscaler; others run eagerly
MAX_GRAPHED_SHAPES = 32  # batch shapes kept as CUDA graphs per Upscaler (on a GPU, without compile)
SHAPES_REMEMBERED = 1024  # batch shapes remembered as seen once, to graph them when they recur
log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when visible, else CPU. Asking for CUDA without one is an error."""
    if device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} asked for, but CUDA sees no GPU on this machine "
                f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); use --device cpu"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"{device} asked for, but CUDA sees {torch.cuda.device_count()} GPU(s)")
    elif resolved.type != "cpu":
        raise DeviceError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    return resolved


# Precisions that score within 0.02 dB PSNR_Y of fp32 on Set5 and Set14 (the "equal quality" that
# ``precision=auto`` may trade for speed), by device type. CPU bf16, with the skip in fp32
# (``_compute``): -0.0045 dB at worst (Set5 x2; benchmarks/README.md, "bf16 on the CPU"). CUDA fp16
# and bf16 are held to it by tests/test_gpu.py.
EQUAL_QUALITY = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
# CPU features (Linux /proc/cpuinfo flags) that run bf16 natively. With them, oneDNN's bf16
# convolutions ran PAN 1.9-2.3x as fast as fp32 (AMD EPYC with avx512_bf16, benchmarks/README.md,
# "precision auto"); without them it emulates bf16 (AVX-512) or runs reference code (AVX2: 9-12x
# slower than fp32, measured), so fp32 is the fast one there.
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# GPUs: from compute capability 8.0 the tensor cores run bf16 as fast as fp16, and bf16 does not
# overflow where fp16 can (an overflowing window is recomputed in fp32); 7.x has fp16 tensor cores
# only; older GPUs have neither.
CUDA_BF16_CAPABILITY, CUDA_FP16_CAPABILITY = (8, 0), (7, 0)


def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as info:
            line = next((line for line in info if line.startswith("flags")), "")
    except OSError:  # not Linux: no flags to go by
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def auto_precision(device: torch.device) -> tuple[str, str]:
    """``precision=auto``'s choice for ``device``, and why: decided from what the device is (the
    tables above), never from a timing, which a busy machine skews and which would then split one
    run, or one destination, between precisions. Costs a file read (CPU) or a device query."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        name = f"{torch.cuda.get_device_name(device)}, compute capability {capability[0]}.{capability[1]},"
        if capability >= CUDA_BF16_CAPABILITY and torch.cuda.is_bf16_supported():
            return "bf16", f"{name} has bf16 tensor cores"
        if capability >= CUDA_FP16_CAPABILITY:
            return "fp16", f"{name} has fp16 tensor cores"
        return "fp32", f"{name} has no tensor cores"
    native = sorted(_cpu_flags().intersection(CPU_BF16_FLAGS))
    if native:
        return "bf16", f"this CPU runs bf16 natively: {', '.join(native)}"
    return "fp32", f"this CPU has no native bf16: no {' or '.join(CPU_BF16_FLAGS)}"


def bytes_per_lr_pixel(model: PAN, dtype: torch.dtype = torch.float32) -> int:
    """An estimate of peak memory per input pixel of a whole-image ``upscale`` (activations under
    inference_mode, and the output's conversion): the LR trunk's live tensors plus the HR stage's
    at scale**2, a little above the peak measured (benchmarks/README.md). It must not be far above:
    an overestimate tiles images that would fit whole, and tiles compute their context again."""
    cfg = model.config
    elements = 4 * cfg.nf + 3 * cfg.unf * cfg.scale**2
    return elements * torch.finfo(dtype).bits // 8


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEPT_FREE_BYTES = (1 << 31) - 1  # freed memory at the top of the heap a process keeps for reuse


def keep_freed_memory() -> bool:
    """Make this process reuse the memory tensors free instead of handing it back to the kernel
    (glibc only; elsewhere nothing changes). Returns whether it applied; calling it again is harmless.

    Why: glibc serves large allocations with a fresh ``mmap`` and unmaps them on free, so each of
    PAN's large activations (24 channels at the output's size at x4) would arrive as zeroed pages,
    a page fault per 4 KB, a quarter of a 1080p pass's CPU time (benchmarks/README.md). With every
    chunk taken from the heap (no ``mmap``) and the heap trimmed only past ``KEPT_FREE_BYTES`` of
    free memory, later passes fault almost no page. The cost: the process keeps the memory of its
    largest image (which ``memory_budget`` bounds), as a caching allocator would. Process-wide:
    every ``Upscaler`` sets it; training does not (no gain on its small patches)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


def default_memory_budget(device: torch.device, share: float = 1.0) -> int:
    """Bytes of activations we allow per batch: half the free GPU memory, times ``share`` (the
    part of the GPU this engine's process holds, when actors share it), or 1 GiB on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2 * min(share, 1.0))
    return 1 << 30


class Upscaler:
    """PAN on a device, with tiling and batching.

    ``tile``: input tile size in pixels; ``0`` runs the whole image at once; ``"auto"`` runs it
    whole when it fits ``memory_budget`` (bytes of activations) and tiles it otherwise.
    ``context``: input pixels read around each tile's core. With the default 24, tiled output equals
    whole-image output within one level in fp32 and within 4 levels in bf16; with 40 or more (PAN's
    receptive field plus half the blend), within one level in any precision (``pipeline.core.tiling``).
    ``precision``: fp32 everywhere; bf16 on CPU and recent GPUs; fp16 on CUDA only.
    ``memory_share``: the part of its GPU this process holds (actors sharing a GPU), which scales
    the default ``memory_budget``.
    ``compile``: ``torch.compile`` the model, one graph per window shape for the first
    ``MAX_COMPILED_SHAPES`` shapes (later shapes run eagerly); if compiling fails, eager throughout.
    ``cuda_graphs``: on a GPU without ``compile``, replay batch shapes that recur from CUDA graphs
    (``_CudaGraphs``); off, every pass runs eagerly.

    One call computes at a time: calls from several threads (a Ray actor taking two batches at
    once) wait their turn, since recording a CUDA graph must not meet another thread's kernels.
    """

    def __init__(
        self,
        model: PAN,
        *,
        device: str = AUTO,
        precision: str = "fp32",
        tile: int | str = AUTO,
        context: int = DEFAULT_CONTEXT,
        batch_size: int | str = AUTO,
        memory_budget: int | None = None,
        memory_share: float = 1.0,
        compile: bool = False,
        cuda_graphs: bool = True,
    ) -> None:
        if precision not in (*PRECISIONS, AUTO):
            raise ValueError(f"precision must be one of {PRECISIONS} or {AUTO}, got {precision!r}")
        if tile != AUTO:
            check_tile(tile)
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}")
        self.device = resolve_device(device)
        keep_freed_memory()
        self._fp32 = self._prepare(model, torch.float32)
        if precision == AUTO:
            precision, why = auto_precision(self.device)
            log.info("precision auto: %s (%s)", precision, why)
        if precision == "fp16" and self.device.type != "cuda":
            raise DeviceError("fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        if precision == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise DeviceError("this GPU has no bf16 support; use fp16 or fp32")
        self.precision = precision
        self.scale = model.scale
        self.tile = tile
        self.context = context
        self.batch_size = batch_size
        self.memory_budget = memory_budget or default_memory_budget(self.device, memory_share)
        self._bytes_per_px = bytes_per_lr_pixel(model, DTYPES[precision])
        self.weights_info = getattr(model, "weights_info", None)
        self._model = self._fp32 if precision == "fp32" else self._prepare(model, DTYPES[precision])
        self._compiled = torch.compile(self._model.residual, dynamic=False) if compile else None
        self._compiled_shapes: set[tuple[int, ...]] = set()
        graphs = self.device.type == "cuda" and cuda_graphs and not compile  # compiled code is not captured
        self._graphs = _CudaGraphs(self._compute, self.device, MAX_GRAPHED_SHAPES) if graphs else None
        self._lock = threading.Lock()  # one call at a time (the class's docstring)

    def _prepare(self, model: PAN, dtype: torch.dtype) -> PAN:
        prepared = copy.deepcopy(model).eval().requires_grad_(False)
        return prepared.to(device=self.device, dtype=dtype, memory_format=torch.channels_last)

    @property
    def model(self) -> PAN:
        """The PAN this engine runs: its own copy, on its device, in its precision, channels_last."""
        return self._model

    @property
    def graphed_shapes(self) -> int:
        """How many batch shapes this engine replays from CUDA graphs (0 on a CPU)."""
        return 0 if self._graphs is None else len(self._graphs)

    # -- planning -------------------------------------------------------------------------------

    def tile_size(self, height: int, width: int) -> int:
        """The tile size used for an image of this size; 0 means the whole image (as ``tile``).

        ``auto``: the whole image when it fits ``memory_budget``; else, of the tiles whose window
        fits it (in steps of 8 px, the windows' sides staying multiples of 8), the one that
        computes the fewest window pixels for this image, the largest of equals. Windows are all
        of one length, so a tile that divides the image badly leaves last windows that mostly
        recompute their neighbours' pixels: a 4000 x 3000 input at x4 in bf16 on the CPU's budget
        computes 1.40 times its pixels in tiles of 584 (the largest that fit), 1.22 in tiles of 504."""
        if self.tile == 0:
            return 0
        if self.tile == AUTO:
            if height * width * self._bytes_per_px <= self.memory_budget:
                return 0
            side = int(math.sqrt(self.memory_budget / self._bytes_per_px)) // 8 * 8
            tiles = range(max(side - 2 * self.context, MIN_TILE), MIN_TILE - 1, -8)
            return min(tiles, key=lambda tile: _computed(height, width, tile, self.context))
        return int(self.tile)

    def _batch_for(self, tile_h: int, tile_w: int) -> int:
        if self.batch_size != AUTO:
            return max(1, int(self.batch_size))
        per_tile = tile_h * tile_w * self._bytes_per_px
        return int(min(MAX_BATCH, max(1, self.memory_budget // per_tile)))

    # -- running --------------------------------------------------------------------------------

    def _host_buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 CPU tensor to stage a batch in: pinned when the model is on a GPU, so that
        copies to and from it run asynchronously."""
        return torch.empty(shape, dtype=torch.float32, pin_memory=self.device.type == "cuda")

    @torch.inference_mode()
    def _launch(self, batch: torch.Tensor) -> _Pending:
        """Start the model on N x 3 x h x w float32 in [0, 1] (a ``_host_buffer``); ``_collect``
        gives N x 3 x sh x sw float32 clamped to [0, 1]. On a GPU nothing here waits for it: the
        copy in, the model and the copy out are queued on the stream, so the CPU can prepare the
        next batch and place the last one meanwhile."""
        cuda = self.device.type == "cuda"
        x = batch.to(self.device, non_blocking=cuda).contiguous(memory_format=torch.channels_last)
        out, finite = self._run(x)
        if not cuda:
            return _Pending(x, out, finite, None)
        host = self._host_buffer(tuple(out.shape))
        host.copy_(out, non_blocking=True)
        finite = None if finite is None else finite.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Pending(x, host, finite, done)

    @torch.inference_mode()
    def _collect(self, pending: _Pending) -> np.ndarray:
        """The result of a ``_launch``, once the device has it; tiles that overflowed in reduced
        precision are recomputed in fp32 first."""
        if pending.done is not None:
            pending.done.synchronize()
        out = pending.out
        if pending.finite is not None and not bool(pending.finite.all()):
            bad = ~pending.finite
            out[bad] = self._fp32(pending.x[bad.to(self.device)]).clamp_(0, 1).to(out.device)
        return out.numpy()

    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``_compute`` of ``x``: replayed as a CUDA graph when its shape recurs and its activations
        fit the graphs' share of the memory budget (each graph keeps its own), else eagerly."""
        batch, _, height, width = x.shape
        graph_budget = self.memory_budget // MAX_GRAPHED_SHAPES
        if self._graphs is not None and batch * height * width * self._bytes_per_px <= graph_budget:
            try:
                return self._graphs(x)
            except RuntimeError as exc:  # capture refused (a driver or op without graph support)
                log.warning("CUDA graphs failed (%s); running eagerly", first_line(exc))
                self._graphs = None
        return self._compute(x)

    def _compute(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """PAN on float32 ``x`` on the device: (the output clamped to [0, 1], which windows came
        out finite, or None in fp32)."""
        # The network's detail in the run's precision, the bilinear image path in fp32: in bf16 the
        # input itself loses up to half a level, which the skip would carry straight to the output
        # (Set5 x2: -0.0201 dB with everything in bf16, -0.0045 dB so; benchmarks/README.md).
        out = self._forward(x.to(DTYPES[self.precision])).float() + self._fp32.skip(x)
        finite = None if self._model is self._fp32 else torch.isfinite(out).flatten(1).all(dim=1)
        return out.clamp_(0, 1), finite

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's residual on ``x``: compiled for the shapes the cache holds, else eager."""
        shape = tuple(x.shape)
        if self._compiled is not None and (
            shape in self._compiled_shapes or len(self._compiled_shapes) < MAX_COMPILED_SHAPES
        ):
            try:
                out = self._compiled(x)
            except Exception as exc:  # no C++ compiler, an unsupported op...: eager is always right
                log.warning("torch.compile failed (%s); running eagerly", first_line(exc))
                self._compiled = None
            else:
                self._compiled_shapes.add(shape)
                return out
        return self._model.residual(x)

    def plan(self, height: int, width: int) -> tuple[TilePlan, TilePlan]:
        """The tile windows along y and x for an image of this size."""
        tile = self.tile_size(height, width)
        if tile == 0:
            return plan_axis(height, height, 0), plan_axis(width, width, 0)
        return plan_axis(height, tile, self.context), plan_axis(width, tile, self.context)

    def upscale_float(self, image: np.ndarray) -> np.ndarray:
        """3 x H x W float32 in [0, 1] -> 3 x sH x sW float32 in [0, 1]."""
        return self.upscale_many_float([image])[0]

    def upscale_many_float(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``upscale_float`` of each image; windows of equal shape share forward passes, whichever
        image they come from."""
        s = self.scale
        outputs = [_FloatOutput((3, image.shape[1] * s, image.shape[2] * s)) for image in images]
        with self._lock:
            self._upscale_many(images, outputs)
        return [output.array for output in outputs]

    def upscale(self, image: np.ndarray) -> np.ndarray:
        """Upscale an HxWx3 / HxW / HxWx1 uint8 or uint16 array; same layout and dtype back."""
        return self.upscale_many([image])[0]

    def upscale_many(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``upscale`` of each image, their windows batched together as in ``upscale_many_float``.

        Memory: the pixels out, the memory budget's activations, and little more. No whole image
        is held in float: windows are read from the pixels as they are batched, and a tiled
        image's output is converted to pixels as its rows become final (``TileAssembler``), so a
        12 MP input at x4 needs its 576 MB of 8-bit output, not 2.3 GB per float copy of it."""
        for image in images:
            _check_pixels(image)
        outputs = [_PixelOutput(image, self.scale) for image in images]
        with self._lock:
            self._upscale_many(images, outputs)
        return [output.array for output in outputs]

    def _upscale_many(
        self, images: Sequence[np.ndarray], outputs: Sequence[_FloatOutput | _PixelOutput]
    ) -> None:
        """Each image through the model into its output: ``images`` as ``upscale_float`` takes them
        (3 x H x W float) or as ``upscale`` does (integer pixels; ``_read_window`` reads either).

        Windows are grouped by shape, each image's in raster order (tile rows top to bottom, each
        left to right), which is the order ``TileAssembler`` needs; groups run one after another,
        so one tiled image at a time is being assembled."""
        s = self.scale
        plans = [self.plan(*_image_size(image)) for image in images]
        assemblers = [
            None if len(py.windows) == len(px.windows) == 1 else TileAssembler(py, px, s, output.write)
            for (py, px), output in zip(plans, outputs, strict=True)
        ]
        groups: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for index, (py, px) in enumerate(plans):
            for row in range(len(py.windows)):
                for column in range(len(px.windows)):
                    groups.setdefault((py.length, px.length), []).append((index, row, column))

        def place(chunk: list[tuple[int, int, int]], results: np.ndarray) -> None:
            for (n, row, column), result in zip(chunk, results, strict=True):
                if assemblers[n] is None:  # the whole image
                    outputs[n].whole(result)
                else:
                    assemblers[n].add(row, column, result)

        # One batch in flight while the CPU gathers the next and places the last (on a GPU; on the
        # CPU each launch computes before it returns, in the same order).
        in_flight = None
        for (length_y, length_x), windows in groups.items():
            batch = self._batch_for(length_y, length_x)
            for i in range(0, len(windows), batch):
                chunk = windows[i : i + batch]
                inputs = self._host_buffer((len(chunk), 3, length_y, length_x))
                staged = inputs.numpy()
                for k, (n, row, column) in enumerate(chunk):
                    py, px = plans[n]
                    top, left = py.windows[row].start, px.windows[column].start
                    staged[k] = _read_window(images[n], top, left, length_y, length_x)
                launched = (chunk, self._launch(inputs))
                if in_flight is not None:
                    place(in_flight[0], self._collect(in_flight[1]))
                in_flight = launched
        if in_flight is not None:
            place(in_flight[0], self._collect(in_flight[1]))


class _CudaGraphs:
    """``compute`` (a tensor -> tensors) replayed from CUDA graphs, one per input shape that recurs.

    Run eagerly, each of PAN's ~270 ops per forward pass is dispatched from Python, which costs
    milliseconds per pass whatever its size: on Set14-sized images a GPU spends most of its time
    waiting for that dispatch (benchmarks/README.md, "gpu_pipeline.py"). A graph replays the whole
    pass in one call. A shape is recorded the second time it comes, so a shape seen once never pays
    for the recording (a warm-up pass and the capture). The first ``limit`` shapes recorded are kept
    for good, later ones run eagerly: dropping graphs to record new ones would, on a stream of more
    shapes than that, record each shape again and again. Each graph keeps the memory of its pass's
    activations, so the caller offers only shapes small enough.

    A replay writes the same output tensors each time: read them (or queue a copy of them on the
    stream) before the next call with that shape."""

    def __init__(self, compute: Callable[[torch.Tensor], Any], device: torch.device, limit: int) -> None:
        self._compute = compute
        self._device = device
        self._limit = limit
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]] = {}
        self._seen: OrderedDict[tuple[int, ...], None] = OrderedDict()  # shapes seen once, bounded

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, x: torch.Tensor) -> Any:
        shape = tuple(x.shape)
        entry = self._graphs.get(shape)
        if entry is None:
            if len(self._graphs) >= self._limit:
                return self._compute(x)
            if shape not in self._seen:
                self._seen[shape] = None
                if len(self._seen) > SHAPES_REMEMBERED:
                    self._seen.popitem(last=False)
                return self._compute(x)
            del self._seen[shape]
            entry = self._graphs[shape] = self._record(x)
        graph, static_x, outputs = entry
        static_x.copy_(x)
        graph.replay()
        return outputs

    def _record(self, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, Any]:
        static_x = x.clone()  # the graph's input, in x's memory format
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(side):  # a warm-up off the capturing stream, as CUDA graphs ask
            self._compute(static_x)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self._compute(static_x)
        return graph, static_x, outputs


@dataclass
class _Pending:
    """A batch ``Upscaler._launch`` started: its input on the device (for the fp32 redo), the output
    (on the CPU, or being copied there until ``done``), and which windows came out finite."""

    x: torch.Tensor
    out: torch.Tensor
    finite: torch.Tensor | None
    done: torch.cuda.Event | None


def _check_pixels(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"expected a uint8 or uint16 numpy array, got {_describe(image)}")
    gray = image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1)
    if not gray and (image.ndim != 3 or image.shape[2] != 3):
        raise ValueError(f"expected HxWx3, HxW or HxWx1 pixels, got shape {image.shape}")
    if min(image.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {image.shape}")


def _computed(height: int, width: int, tile: int, context: int) -> int:
    """Input pixels the windows of ``tile`` and ``context`` read for an image of this size."""
    plan_y, plan_x = plan_axis(height, tile, context), plan_axis(width, tile, context)
    return len(plan_y.windows) * plan_y.length * len(plan_x.windows) * plan_x.length


def _image_size(image: np.ndarray) -> tuple[int, int]:
    """Height and width of 3 x H x W float planes or of integer pixels (H x W first)."""
    return image.shape[:2] if np.issubdtype(image.dtype, np.integer) else image.shape[1:]


def _read_window(image: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """A window of 3 x H x W float planes, or of integer pixels as ``_to_chw`` converts them."""
    if np.issubdtype(image.dtype, np.integer):
        return _to_chw(image[top : top + height, left : left + width])
    return image[:, top : top + height, left : left + width]


def _to_chw(image: np.ndarray) -> np.ndarray:
    """HxWx3 / HxW / HxWx1 integer pixels -> 3 x H x W float32 in [0, 1] (gray as equal channels)."""
    plane = image.reshape(image.shape[:2]) if image.ndim == 2 or image.shape[2] == 1 else image
    chw = plane.astype(np.float32) / float(np.iinfo(image.dtype).max)
    chw = np.broadcast_to(chw, (3, *chw.shape)) if plane.ndim == 2 else chw.transpose(2, 0, 1)
    return np.ascontiguousarray(chw)


def _from_chw(result: np.ndarray, like: np.ndarray) -> np.ndarray:
    """3 x sH x sW float in [0, 1] -> pixels in the layout and dtype of ``like`` (gray: channel mean)."""
    gray = like.ndim == 2 or like.shape[2] == 1
    result = result.mean(axis=0) if gray else result.transpose(1, 2, 0)
    scaled = result * float(np.iinfo(like.dtype).max)
    pixels = np.rint(scaled, out=scaled).astype(like.dtype)
    return pixels[..., None] if like.ndim == 3 and like.shape[2] == 1 else pixels


class _FloatOutput:
    """Where ``upscale_many_float`` puts an image's output (``array``, 3 x sH x sW float32): the
    model's output itself when the image ran whole, else assembled from ``TileAssembler``'s blocks."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.array: np.ndarray | None = None

    def whole(self, result: np.ndarray) -> None:
        self.array = result

    def write(self, top: int, left: int, block: np.ndarray) -> None:
        if self.array is None:
            self.array = np.empty(self.shape, dtype=np.float32)
        self.array[:, top : top + block.shape[1], left : left + block.shape[2]] = block


# Output pixels converted from float at a time: ``_from_chw``'s temporaries (a few arrays of 4 to
# 12 bytes per pixel) stay near 10 MB each, whatever the size of a block or a whole image's output;
# numpy's cost per call (microseconds) is nothing beside a million pixels' conversion.
CONVERT_PIXELS = 1 << 20


class _PixelOutput:
    """Where ``upscale_many`` puts an image's output (``array``): pixels in the layout and dtype of
    the input ``like``, ``scale`` times its height and width, converted (``_from_chw``) as blocks of
    float output arrive, ``CONVERT_PIXELS`` at a time. Each pixel comes once (``TileAssembler``)."""

    def __init__(self, like: np.ndarray, scale: int) -> None:
        self.like = like
        shape = (like.shape[0] * scale, like.shape[1] * scale, *like.shape[2:])
        self.array = np.empty(shape, dtype=like.dtype)

    def whole(self, result: np.ndarray) -> None:
        self.write(0, 0, result)

    def write(self, top: int, left: int, block: np.ndarray) -> None:
        height, width = block.shape[1:]
        step = max(1, CONVERT_PIXELS // width)
        for y in range(0, height, step):
            rows = block[:, y : y + step]
            self.array[top + y : top + y + rows.shape[1], left : left + width] = _from_chw(rows, self.like)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__
