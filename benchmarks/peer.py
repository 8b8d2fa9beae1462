"""Peer benchmark: our PAN engine against the ``super-image`` library (0.2.0) on the CPU, same weights.

Run ``bash benchmarks/peer_setup.sh`` once, then::

    benchmarks/.peer-venv/bin/python benchmarks/peer.py [--rounds 3] [--scale 4]

Contenders, on the same decoded images (PIL, RGB) and the same official weights
(``shared/weights/PANx{s}_DF2K.pth``, loaded strictly into both models); super-image's in this
process, ours in a process of its own (see "Two processes" below):

a. **super-image as its README uses it**: ``preds = model(ImageLoader.load_image(image))``, without
   ``inference_mode``/``no_grad`` (the README shows none), then the prediction to uint8 as
   ``ImageLoader.save_image`` does it (``* 255``, then OpenCV's saturating cast on writing: round
   and clip); no file is written.
b. **super-image used well**: the same model and loader, under ``torch.inference_mode()``, with the
   model and its input in ``channels_last``.
c. **our engine**: ``build_upscaler(InferenceSpec(weights=path, device="cpu"), s).upscale(pixels)``
   with every other setting at its default (precision ``auto``: bf16 on a CPU where it is at least
   1.25x fp32, else fp32; tile ``auto``, batch ``auto``, no compile); ``--precision fp32|bf16``
   runs ours in that precision instead.

Each contender's timed call goes from the PIL image to an H x W x 3 uint8 array (for ours,
``np.asarray(image)`` is inside the timing too).

Workloads (x4 by default): the 14 Set14 LR images (``LR_bicubic/X4``), and one 480x270 LR image
whose x4 output is 1920x1080: Set14's ``monarch.png`` (768x512 HR), centre-cropped to 16:9
(768x432) and resized to 480x270 with Pillow bicubic.

What is measured:

- **MP/s**: output megapixels of the workload / wall seconds of the contender's pass over it,
  median over ``--rounds`` rounds. Rounds are interleaved (every round runs every workload with
  every contender; the contender order rotates from round to round), after one untimed warm-up
  pass of each. torch runs on ``os.cpu_count()`` threads (``torch.set_num_threads``) for all.
- **ours / x**: our MP/s divided by contender x's.
- **PSNR_Y** on Set14 against ``HR/`` (cropped to 4x the LR size), with
  ``pipeline.core.metrics.psnr_y(sr, hr, crop=scale)``: the PAN paper's convention; mean over images.
- **GFLOP/s achieved** = 2 x MACs / second, in fp32. MACs are counted, not hard-coded: forward hooks
  on every ``nn.Conv2d`` of the model sum out_h x out_w x out_c x in_c / groups x kh x kw (x batch)
  over one whole-image forward pass. Nothing else is counted: biases, sigmoids, products,
  LeakyReLUs, residual additions and the nearest/bilinear interpolations are left out. The same
  count (the work the image needs) is used for every contender; what our engine actually executes
  (more, when it tiles and recomputes overlapping context) is counted by hooks on its model during
  a real ``upscale`` call and printed beside it.
- **contention**: the average number of cores other processes kept busy during the rounds
  (``/proc/stat`` minus this process's CPU time); on a busy machine the figures are noisy.
- **dense conv**: a 3x3 convolution 64 -> 64 channels on a 1 x 64 x 256 x 256 fp32 input,
  ``channels_last``, under ``inference_mode``, timed in each round (median): a reference for what
  this CPU reaches on a convolution that keeps the cores busy. Each contender's achieved GFLOP/s is
  also shown as a fraction of it.

Two processes: our engine makes the process that runs it keep the memory tensors free for reuse
(``pipeline.core.engine.keep_freed_memory``, a glibc setting that holds for the whole process). In one
process it would speed up super-image as well, which its users do not get. So our engine runs in a
spawned process of its own, with the same torch threads, and super-image in this one with glibc's
defaults: each contender in the state it has in real use. The processes take turns (one request at
a time), so they never compute at once; rounds stay interleaved; our pass is timed inside its
process, so the requests' transport is not in the timing. The dense conv is timed in this process.

Why ``torchvision`` is stubbed: super-image declares torchvision as a dependency, but this CPU torch
build has no matching torchvision wheel. Its model code and ``ImageLoader`` never use it; only its
dataset code (``data/datasets.py``, ``data/builder.py``: ``transforms.FiveCrop`` for training
augmentation) imports it, and ``super_image`` imports that code at import time. Empty modules in
``sys.modules`` let the import succeed; anything that really used torchvision would fail loudly.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Stub torchvision BEFORE importing super_image: super-image's dataset code imports
# ``torchvision.transforms`` at import time, but the model and ImageLoader used here never touch it,
# and this CPU torch has no matching torchvision to install.
for _name in ("torchvision", "torchvision.transforms", "torchvision.transforms.transforms"):
    sys.modules.setdefault(_name, types.ModuleType(_name))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flops import ConvMacs, dense_conv_gflops  # noqa: E402  (benchmarks/flops.py)
from images import HD_LR_SIZE, SHARED, hd_lr, rgb  # noqa: E402  (benchmarks/images.py)
from PIL import Image  # noqa: E402
from super_image import ImageLoader, PanConfig, PanModel  # noqa: E402
from torch import nn  # noqa: E402

from pipeline.config.settings import InferenceSpec  # noqa: E402
from pipeline.core.engine import Upscaler, build_upscaler  # noqa: E402
from pipeline.core.metrics import psnr_y  # noqa: E402
from pipeline.io.storage import Files  # noqa: E402

Run = Callable[[Image.Image], np.ndarray]  # PIL RGB image -> H x W x 3 uint8


# -- workloads --------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    images: list[Image.Image]  # LR, RGB
    hrs: list[np.ndarray] | None  # HR uint8 RGB, cropped to scale x LR, for PSNR; None: no reference
    scale: int

    @property
    def output_mp(self) -> float:
        return sum(im.width * im.height for im in self.images) * self.scale**2 / 1e6


def set14(scale: int) -> Workload:
    lr_dir = SHARED / "benchmarks" / "Set14" / "LR_bicubic" / f"X{scale}"
    hr_dir = SHARED / "benchmarks" / "Set14" / "HR"
    images, hrs = [], []
    for lr_path in sorted(lr_dir.glob("*.png")):
        lr = rgb(lr_path)
        hr = np.asarray(rgb(hr_dir / lr_path.name.replace(f"x{scale}.png", ".png")))  # baboonx4 -> baboon
        images.append(lr)
        hrs.append(hr[: lr.height * scale, : lr.width * scale])
    if not images:
        sys.exit(f"no images in {lr_dir}")
    return Workload(f"Set14 x{scale} ({len(images)} images)", images, hrs, scale)


def hd_image(scale: int) -> Workload:
    """One LR image of 480x270 (``images.hd_lr``)."""
    width, height = HD_LR_SIZE
    return Workload(
        f"{width}x{height} -> {width * scale}x{height * scale} (1 image)", [hd_lr(SHARED)], None, scale
    )


def workloads(scale: int) -> list[Workload]:
    return [set14(scale), hd_image(scale)]


# -- contenders -------------------------------------------------------------------------------------


class Contender:
    """One way of upscaling, run in this process: its pass over a workload, timed, and its outputs."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def seconds(self, workload: Workload) -> float:
        start = time.perf_counter()
        for image in workload.images:
            self.run(image)
        return time.perf_counter() - start

    def outputs(self, workload: Workload) -> list[np.ndarray]:
        return [self.run(image) for image in workload.images]


def load_super_image(weights: Path, scale: int) -> PanModel:
    """super-image's PanModel with the official weights; the key sets must match exactly."""
    model = PanModel(PanConfig(scale=scale))
    state = torch.load(weights, weights_only=True)
    own = set(model.state_dict())
    missing, unexpected = own - set(state), set(state) - own
    if missing or unexpected:
        sys.exit(f"{weights} does not fit super-image's PanModel: missing {missing}, unexpected {unexpected}")
    model.load_state_dict(state, strict=True)  # PanModel's own override; raises on any mismatch
    return model.eval()  # what from_pretrained does; PAN has no dropout or batch norm


def to_uint8(preds: torch.Tensor) -> np.ndarray:
    """As ``ImageLoader.save_image``: first image, HWC, x 255; cv2.imwrite then rounds and clips."""
    pixels = preds.data.cpu().numpy()[0].transpose(1, 2, 0) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def readme_style(model: PanModel) -> Contender:
    def run(image: Image.Image) -> np.ndarray:
        inputs = ImageLoader.load_image(image)
        preds = model(inputs)
        return to_uint8(preds)

    return Contender(run)


def used_well(model: PanModel) -> Contender:
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(image: Image.Image) -> np.ndarray:
        inputs = ImageLoader.load_image(image).contiguous(memory_format=torch.channels_last)
        return to_uint8(model(inputs))

    return Contender(run)


class OursProcess(Contender):
    """Our engine with the defaults (``--precision`` aside), in a spawned process of its own (see
    "Two processes" in the module docstring); workloads are named by their index in ``workloads``."""

    def __init__(self, scale: int, precision: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        args = (child, scale, precision, torch.get_num_threads())
        self._process = context.Process(target=_serve_ours, args=args, daemon=True)
        self._process.start()
        self._names = [w.name for w in workloads(scale)]
        self.precision = self._ask("precision")

    def _ask(self, what: str, workload: Workload | None = None) -> Any:
        self._conn.send((what, None if workload is None else self._names.index(workload.name)))
        ok, value = self._conn.recv()
        if not ok:
            raise RuntimeError(f"our engine's process failed:\n{value}")
        return value

    def seconds(self, workload: Workload) -> float:
        return self._ask("seconds", workload)

    def outputs(self, workload: Workload) -> list[np.ndarray]:
        return self._ask("outputs", workload)

    def cpu_seconds(self) -> float:
        """CPU seconds our engine's process has used."""
        return self._ask("cpu")

    def executed(self, workload: Workload) -> tuple[int, list[int]]:
        """Conv MACs the engine executes on the workload, and the tile sizes it uses."""
        return self._ask("executed", workload)

    def close(self) -> None:
        self._conn.send(("exit", None))
        self._process.join(timeout=30)


def _serve_ours(conn: Any, scale: int, precision: str, threads: int) -> None:
    """The body of ``OursProcess``: answers its requests until told to exit."""
    import traceback

    torch.set_num_threads(threads)
    spec = InferenceSpec(weights=str(SHARED / "weights" / f"PANx{scale}_DF2K.pth"), device="cpu",
                         precision=precision)  # fmt: skip
    upscaler = build_upscaler(spec, scale, files=Files())
    ours = Contender(lambda image: upscaler.upscale(np.asarray(image)))
    loads = workloads(scale)
    while True:
        what, index = conn.recv()
        if what == "exit":
            return
        try:
            if what == "precision":
                value = upscaler.precision
            elif what == "cpu":
                value = time.process_time()
            elif what == "seconds":
                value = ours.seconds(loads[index])
            elif what == "outputs":
                value = ours.outputs(loads[index])
            else:  # executed
                tiles = sorted({upscaler.tile_size(im.height, im.width) for im in loads[index].images})
                value = (engine_macs(upscaler, loads[index]), tiles)
            conn.send((True, value))
        except Exception:
            conn.send((False, traceback.format_exc()))


# -- counting and timing ----------------------------------------------------------------------------


def model_macs(model: nn.Module, workload: Workload) -> int:
    """Conv MACs of one whole-image forward pass per image of the workload."""
    total = 0
    with torch.inference_mode():
        for image in workload.images:
            with ConvMacs(model) as counter:
                model(ImageLoader.load_image(image))
            total += counter.macs
    return total


def engine_macs(upscaler: Upscaler, workload: Workload) -> int:
    """Conv MACs our engine executes on the workload (tiles and their context included)."""
    with ConvMacs(upscaler.model) as counter:  # the engine's own prepared copy of PAN
        for image in workload.images:
            upscaler.upscale(np.asarray(image))
    return counter.macs


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class Result:
    seconds: list[float] = field(default_factory=list)
    psnr: float | None = None


def mean_psnr(contender: Contender, workload: Workload) -> float | None:
    if workload.hrs is None:
        return None
    pairs = zip(contender.outputs(workload), workload.hrs, strict=True)
    return statistics.fmean(psnr_y(sr, hr, crop=workload.scale) for sr, hr in pairs)


def max_level_difference(a: Contender, b: Contender, workload: Workload) -> int:
    pairs = zip(a.outputs(workload), b.outputs(workload), strict=True)
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in pairs)


def benchmark(
    contenders: dict[str, Contender], workloads: list[Workload], rounds: int
) -> tuple[dict[tuple[str, str], Result], list[float]]:
    """Warm-up (and PSNR) once, then ``rounds`` interleaved timed rounds; the dense conv each round."""
    results = {(w.name, c): Result() for w in workloads for c in contenders}
    for w in workloads:
        for c, contender in contenders.items():
            results[w.name, c].psnr = mean_psnr(contender, w)
            contender.seconds(w)
    dense = []
    names = list(contenders)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for w in workloads:
            for c in order:
                results[w.name, c].seconds.append(contenders[c].seconds(w))
        dense.append(dense_conv_gflops())
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return results, dense


def describe(workload: Workload, macs: int, contenders: dict[str, Contender]) -> None:
    """Print the workload's size, conv MACs per output pixel, and how far the outputs differ."""
    px = workload.output_mp * 1e6
    executed, tiles = contenders["ours"].executed(workload)
    print(
        f"{workload.name}: {workload.output_mp:.3f} output MP; conv MACs {macs / 1e9:.3f} G = "
        f"{macs / px:.0f} per output pixel; ours executes {executed / px:.0f} per output pixel "
        f"(tile sizes: {tiles}, 0 = whole image)"
    )
    diffs = {c: max_level_difference(contenders[c], contenders["ours"], workload) for c in ("readme", "well")}
    print(f"  largest difference from ours, 8-bit levels: readme {diffs['readme']}, well {diffs['well']}")


def cpu_seconds(ours: OursProcess) -> tuple[float, float, float]:
    """(wall, busy CPU seconds of the whole machine from /proc/stat, CPU seconds of this process and
    of our engine's)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), (sum(fields[:8]) - idle) / tick, time.process_time() + ours.cpu_seconds()


def others_cores(start: tuple[float, float, float], ours: OursProcess) -> float:
    """Average cores that other processes kept busy since ``start`` (a ``cpu_seconds()``)."""
    end = cpu_seconds(ours)
    return ((end[1] - start[1]) - (end[2] - start[2])) / (end[0] - start[0])


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} on {torch.get_num_threads()} "
        f"threads, numpy {np.__version__}, Python {platform.python_version()}"
    )


def table(
    results: dict[tuple[str, str], Result],
    workloads: list[Workload],
    labels: dict[str, str],
    macs: dict[str, int],
    dense: float,
) -> str:
    rows = [
        "| workload | contender | MP/s (median) | ours / this | PSNR_Y (dB) | GFLOP/s | of dense conv |",
        "|---|---|---|---|---|---|---|",
    ]
    for w in workloads:
        rates = {c: w.output_mp / statistics.median(results[w.name, c].seconds) for c in labels}
        for c, label in labels.items():
            psnr = results[w.name, c].psnr
            gflops = 2 * macs[w.name] * rates[c] / w.output_mp / 1e9
            rows.append(
                f"| {w.name} | {label} | {rates[c]:.3f} | {rates['ours'] / rates[c]:.2f} | "
                f"{'-' if psnr is None else f'{psnr:.3f}'} | {gflops:.1f} | {gflops / dense:.1%} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (default 3)")
    parser.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    parser.add_argument(
        "--precision",
        default=InferenceSpec.model_fields["precision"].default,
        help="ours: auto (the default setting: fastest at equal quality), fp32 or bf16",
    )
    args = parser.parse_args()

    torch.set_num_threads(os.cpu_count() or 1)
    weights = SHARED / "weights" / f"PANx{args.scale}_DF2K.pth"
    peer = load_super_image(weights, args.scale)
    print(f"super-image PanModel: {weights.name} loaded strictly (all {len(peer.state_dict())} keys match)")
    ours = OursProcess(args.scale, args.precision)
    contenders = {"readme": readme_style(peer), "well": used_well(peer), "ours": ours}
    labels = {
        "readme": "a. super-image, README use",
        "well": "b. super-image, inference_mode + channels_last",
        "ours": f"c. ours (defaults, precision {args.precision} -> {ours.precision}; own process)",
    }
    loads = workloads(args.scale)

    macs = {w.name: model_macs(peer, w) for w in loads}
    for w in loads:
        describe(w, macs[w.name], contenders)

    start = cpu_seconds(ours)
    results, dense = benchmark(contenders, loads, args.rounds)
    others = others_cores(start, ours)
    ours.close()
    dense_rate = statistics.median(dense)
    print(f"\nMachine: {machine()}")
    print(f"torch.set_num_threads({os.cpu_count()}) for all contenders; {args.rounds} interleaved rounds.")
    print(f"Other processes kept {others:.2f} of {os.cpu_count()} cores busy on average during the rounds.")
    print(
        f"Dense conv reference (3x3, 64->64, 1x64x256x256, channels_last fp32, inference_mode): "
        f"{dense_rate:.1f} GFLOP/s (median; rounds: {', '.join(f'{d:.1f}' for d in dense)})\n"
    )
    print(table(results, loads, labels, macs, dense_rate))
    print("\nSeconds per pass, by round:")
    for (wname, c), result in results.items():
        print(f"  {wname} | {labels[c]}: {', '.join(f'{s:.3f}' for s in result.seconds)}")


if __name__ == "__main__":
    main()
