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
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.core.model import PAN
from pipeline.core.tiling import DEFAULT_CONTEXT, MIN_TILE, TilePlan, blend_weights, check_tile, plan_axis
from pipeline.errors import DeviceError, first_line

AUTO = "auto"  # a setting decided at run time: the device, the tile size, the precision, the batch
PRECISIONS = ("fp32", "bf16", "fp16")
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


# Precisions that score within 0.02 dB PSNR_Y of fp32 on Set5 and Set14 (the "equal quality" of
# precision=auto), by device type. CPU bf16, with the skip in fp32 (``_compute``): -0.0045 dB at
# worst (Set5 x2), about 2x the speed of fp32 (benchmarks/README.md, "bf16 on the CPU"). CUDA fp16
# and bf16 are held to it by tests/test_gpu.py.
EQUAL_QUALITY = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
# A reduced precision must beat fp32 by this much to be picked: where they time alike (a CPU that
# emulates bf16, a busy machine) the choice would otherwise flip from actor to actor and run to run,
# while fp32 is the exact one. Where bf16 pays, it pays about 2x (benchmarks/README.md).
AUTO_MIN_SPEEDUP = 1.25


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 or newer, as torch's own compiler
    asks). Without them bf16 runs on reference code, about 10x slower than fp32, and timing it
    would cost ``auto`` seconds per engine for a precision that cannot win (benchmarks/README.md,
    "A CPU without bf16"). True when this torch cannot say: timing then decides."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if check is None else bool(check())


def auto_candidates(device: torch.device) -> list[str]:
    """The device's ``EQUAL_QUALITY`` precisions that it can run at speed (fp32 first)."""
    if device.type == "cuda":
        return [p for p in EQUAL_QUALITY["cuda"] if p != "bf16" or torch.cuda.is_bf16_supported()]
    return [p for p in EQUAL_QUALITY[device.type] if p != "bf16" or cpu_has_bf16_kernels()]


def fastest_precision(
    models: dict[str, PAN], device: torch.device, side: int | None = None, rounds: int = 3
) -> str:
    """Of ``models`` (precision -> PAN prepared in it on ``device``, fp32 among them), the
    precision whose residual (the part that runs in it) is fastest, timed on a ``side`` x ``side``
    window (best of ``rounds`` after a warm-up); fp32 when it is the only one, and unless a reduced
    precision is at least ``AUTO_MIN_SPEEDUP`` times as fast. A precision slower than fp32's best
    in a round is not timed again: it cannot win. ``side`` defaults to 96 on the CPU and 512 on a
    GPU, where a small window would time the ops' dispatch, the same in every precision."""
    if len(models) == 1:
        return next(iter(models))
    side = side or (512 if device.type == "cuda" else 96)
    x = torch.linspace(0, 1, 3 * side * side).reshape(1, 3, side, side).to(device)
    times = {}
    for precision, trial in models.items():
        with torch.inference_mode():
            xp = x.to(DTYPES[precision]).contiguous(memory_format=torch.channels_last)
            trial.residual(xp)
            best = math.inf
            for _ in range(rounds):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                trial.residual(xp)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - start)
                if best > times.get("fp32", math.inf):
                    break
        times[precision] = best
    fastest = min(times, key=times.get)
    chosen = fastest if times["fp32"] >= AUTO_MIN_SPEEDUP * times[fastest] else "fp32"
    timed = {p: f"{t * 1e3:.1f} ms" for p, t in times.items()}
    log.debug("precision auto on %s: %s, %s chosen", device, timed, chosen)
    return chosen


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
        prepared = {"fp32": self._fp32}  # precision -> model prepared in it; the one chosen is kept
        if precision == AUTO:
            for p in auto_candidates(self.device):
                if p not in prepared:
                    prepared[p] = self._prepare(model, DTYPES[p])
            precision = fastest_precision(prepared, self.device)
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
        if precision not in prepared:
            prepared[precision] = self._prepare(model, DTYPES[precision])
        self._model = prepared[precision]
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
        """The tile size used for an image of this size; 0 means the whole image (as ``tile``)."""
        if self.tile == 0:
            return 0
        if self.tile == AUTO:
            if height * width * self._bytes_per_px <= self.memory_budget:
                return 0
            side = int(math.sqrt(self.memory_budget / self._bytes_per_px)) // 8 * 8
            return max(side - 2 * self.context, MIN_TILE)
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
        with self._lock:
            return self._upscale_many_float(images)

    def _upscale_many_float(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        s = self.scale
        plans = [self.plan(*image.shape[1:]) for image in images]
        groups: dict[tuple[int, int], list[tuple[int, Any, Any]]] = {}
        for index, (py, px) in enumerate(plans):
            for wy in py.windows:
                for wx in px.windows:
                    groups.setdefault((py.length, px.length), []).append((index, wy, wx))
        outputs: list[np.ndarray | None] = [None] * len(images)

        def place(chunk: list[tuple[int, Any, Any]], results: np.ndarray) -> None:
            for (n, wy, wx), result in zip(chunk, results, strict=True):
                py, px = plans[n]
                if len(py.windows) == 1 and len(px.windows) == 1:  # the whole image
                    outputs[n] = result
                    continue
                if outputs[n] is None:
                    outputs[n] = np.zeros((3, py.size * s, px.size * s), dtype=np.float32)
                weight = np.outer(blend_weights(py, wy, s), blend_weights(px, wx, s))
                height, width = result.shape[1:]
                outputs[n][:, wy.start * s : wy.start * s + height, wx.start * s : wx.start * s + width] += (
                    result * weight
                )

        # One batch in flight while the CPU gathers the next and places the last (on a GPU; on the
        # CPU each launch computes before it returns, in the same order).
        in_flight = None
        for (length_y, length_x), windows in groups.items():
            batch = self._batch_for(length_y, length_x)
            for i in range(0, len(windows), batch):
                chunk = windows[i : i + batch]
                inputs = self._host_buffer((len(chunk), 3, length_y, length_x))
                staged = inputs.numpy()
                for k, (n, wy, wx) in enumerate(chunk):
                    staged[k] = images[n][:, wy.start : wy.start + length_y, wx.start : wx.start + length_x]
                launched = (chunk, self._launch(inputs))
                if in_flight is not None:
                    place(in_flight[0], self._collect(in_flight[1]))
                in_flight = launched
        if in_flight is not None:
            place(in_flight[0], self._collect(in_flight[1]))
        return outputs

    def upscale(self, image: np.ndarray) -> np.ndarray:
        """Upscale an HxWx3 / HxW / HxWx1 uint8 or uint16 array; same layout and dtype back."""
        return self.upscale_many([image])[0]

    def upscale_many(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """``upscale`` of each image, their windows batched together (``upscale_many_float``)."""
        for image in images:
            _check_pixels(image)
        planes = [_to_chw(image) for image in images]
        return [
            _from_chw(result, image)
            for result, image in zip(self.upscale_many_float(planes), images, strict=True)
        ]


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
    pixels = np.rint(result * float(np.iinfo(like.dtype).max)).astype(like.dtype)
    return pixels[..., None] if like.ndim == 3 and like.shape[2] == 1 else pixels


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return type(value).__name__
