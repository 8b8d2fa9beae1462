"""The ``pan`` command. Every error a user can cause ends in one line on stderr and exit code 2,
before any image is computed where it can be known before (``--debug`` adds the traceback).
Anything else is a bug and keeps its traceback. Ray's own logging stays hidden unless
``--verbose``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import DestinationError, PipelineError

EXIT_USER_ERROR = 2


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=int, choices=(2, 3, 4), required=True, help="upscaling factor")
    p.add_argument(
        "--weights",
        default=None,
        help="hub repo id, folder, weights file or fsspec URL (default: eugenesiow/pan)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument(
        "--tile",
        type=int,
        default=None,
        metavar="PX",
        help="input tile size in pixels, at least 32; 0 = whole image (default: automatic, by memory)",
    )


def _upscaler(args: argparse.Namespace):
    from pipeline.engine import AUTO, Upscaler
    from pipeline.hub import resolve_source
    from pipeline.tiling import check_tile
    from pipeline.weights import load_pretrained

    if args.tile is not None:
        check_tile(args.tile)  # before loading anything
    model = load_pretrained(resolve_source(args.weights) if args.weights else None, scale=args.scale)
    tile = AUTO if args.tile is None else args.tile
    return Upscaler(model, device=args.device, precision=args.precision, tile=tile)


def _refuse_overwriting_inputs(output: str, *inputs: str | None) -> None:
    """``upscale-image`` and ``compare`` never write over a file they read."""
    from pipeline.storage import same_location

    for source in inputs:
        if source and same_location(output, source):
            raise DestinationError(f"{output} is also an input: choose another output path")


def _check_output_folder(location: str) -> None:
    """Before computing: the folder ``location`` will be written in takes a write."""
    from pipeline.storage import check_writable, is_url, resolve_location

    folder = location.rsplit("/", 1)[0] if is_url(location) else str(Path(resolve_location(location)).parent)
    check_writable(folder)


def _read_image(location: str):
    from pipeline.imaging import decode_image
    from pipeline.storage import read_bytes

    return decode_image(read_bytes(location), name=location)


def _output_format(location: str) -> str:
    suffix = Path(location).suffix.lower().lstrip(".")
    formats = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
    if suffix not in formats:
        raise PipelineError(f"cannot tell the output format of {location}: end it in .png, .jpg or .webp")
    return formats[suffix]


def _save_picture(picture, location: str) -> None:
    import io

    from pipeline.storage import write_bytes

    buffer = io.BytesIO()
    picture.save(buffer, format=_output_format(location).upper())
    write_bytes(location, buffer.getvalue())


def cmd_upscale_image(args: argparse.Namespace) -> int:
    from pipeline.imaging import encode_image
    from pipeline.storage import write_bytes

    fmt = _output_format(args.output)
    _refuse_overwriting_inputs(args.output, args.input)
    if args.compare:
        _output_format(args.compare)
        _refuse_overwriting_inputs(args.compare, args.input, args.output)
    image = _read_image(args.input)
    upscaler = _upscaler(args)
    for location in (args.output, args.compare):
        if location:
            _check_output_folder(location)
    result = upscaler.upscale_image(image)
    write_bytes(args.output, encode_image(result, fmt, png_compress_level=args.png_compress_level))
    print(f"{args.input} ({image.width}x{image.height}) -> {args.output} ({result.width}x{result.height})")
    if args.compare:
        _write_comparison(upscaler, image.pixels, None, args.compare)
    return 0


def _write_comparison(upscaler, lr, hr, location: str) -> None:
    from pipeline.evaluate import as_rgb8, crop_to_multiple
    from pipeline.imaging import imresize
    from pipeline.metrics import psnr_y
    from pipeline.report import comparison_picture

    s = upscaler.scale
    lr = as_rgb8(lr)
    sr, bicubic = upscaler.upscale(lr), imresize(lr, float(s))
    if hr is None:
        panels = [("Bicubic", bicubic), ("PAN", sr)]
    else:
        hr = crop_to_multiple(as_rgb8(hr), s)
        if hr.shape != sr.shape:
            raise PipelineError(
                f"HR is {hr.shape[1]}x{hr.shape[0]} but the x{s} output is {sr.shape[1]}x{sr.shape[0]}"
            )
        panels = [
            (f"Bicubic {psnr_y(bicubic, hr, crop=s):.2f} dB", bicubic),
            (f"PAN {psnr_y(sr, hr, crop=s):.2f} dB", sr),
            ("HR", hr),
        ]
    _save_picture(comparison_picture(panels), location)
    print(f"comparison -> {location}")


def cmd_compare(args: argparse.Namespace) -> int:
    _output_format(args.output)
    _refuse_overwriting_inputs(args.output, args.input, args.hr)
    lr = _read_image(args.input).pixels
    hr = _read_image(args.hr).pixels if args.hr else None
    upscaler = _upscaler(args)
    _check_output_folder(args.output)
    _write_comparison(upscaler, lr, hr, args.output)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.eval_job import EvalJob, run_eval
    from pipeline.progress import JobProgress
    from pipeline.report import markdown_table
    from pipeline.storage import write_bytes

    settings = {
        k: getattr(args, k)
        for k in ("split", "device", "precision", "tile", "compare_dir", "address", "actors")
    }
    job = EvalJob(
        tuple(args.data),
        tuple(args.scale),
        args.weights,
        **{k: v for k, v in settings.items() if v is not None},
    )
    if args.report:
        _check_output_folder(args.report)
    with JobProgress("evaluating", unit="images") as progress:
        reports = run_eval(job, on_progress=lambda done, total: progress.update({"scored": done}, 0, total))
    print(markdown_table(reports))
    if args.report:
        # One (set, scale): the report object; several: a list of them.
        payload = reports[0].to_json() if len(reports) == 1 else [r.to_json() for r in reports]
        write_bytes(args.report, (json.dumps(payload, indent=2) + "\n").encode())
        print(f"report -> {args.report}")
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    from pipeline.progress import JobProgress
    from pipeline.upscale import UpscaleJob, check_error_fraction, run_upscale

    overrides = {k: getattr(args, k) for k in UPSCALE_FLAGS}
    if args.storage_options:
        try:
            overrides["storage_options"] = json.loads(args.storage_options)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"--storage-options is not JSON: {exc}") from exc
    overrides.update(source=args.source, dest=args.dest)
    for flag in ("overwrite", "dest_inside_source"):  # store_true flags: only a given one overrides the spec
        if getattr(args, flag):
            overrides[flag] = True
    job = _job_settings(UpscaleJob, args.config, overrides)
    with JobProgress("upscaling") as progress:
        summary = run_upscale(job, on_progress=progress.update)
    print(
        f"{summary['inputs']} inputs: {summary['succeeded']} succeeded, {summary['failed']} failed, "
        f"{summary['skipped']} skipped; {summary['output_megapixels']:.1f} MP out in "
        f"{summary['seconds']:.1f} s ({summary['output_megapixels_per_second']:.2f} MP/s) -> {job.dest}"
    )
    if summary["failed"]:
        print(f"errors table: {job.dest}/_errors", file=sys.stderr)
    check_error_fraction(job, summary)
    return 0


UPSCALE_FLAGS = (
    "scale", "weights", "format", "image_column", "device", "precision", "tile",
    "actors", "max_error_fraction", "address", "png_compress_level", "max_pixels",
)  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.train import TrainJob, run_training

    overrides = {k: getattr(args, k) for k in TRAIN_FLAGS}
    for flag in ("gpu", "five_crop"):  # store_true flags: only a given one overrides the spec
        if getattr(args, flag):
            overrides[flag] = True
    job = _job_settings(TrainJob, args.config, overrides)
    result = run_training(job)
    if result.error:
        raise PipelineError(f"training failed: {str(result.error).splitlines()[0]}")
    metrics = result.metrics or {}
    best = metrics.get("best_val_psnr_y")
    best_text = f", best val PSNR_Y {best:.3f} dB" if best not in (None, float("-inf")) else ""
    print(f"{job.name}: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.5f}{best_text}")
    print(f"metrics -> {job.run_dir}/metrics.jsonl; weights -> {job.run_dir}/export")
    return 0


TRAIN_FLAGS = (
    "data", "lr_data", "scale", "workers", "max_steps", "storage", "name", "batch_size", "patch_size", "lr",
    "init_weights", "val_data", "val_every", "ema_decay", "address",
)  # fmt: skip


def _job_settings(job_class, config: str | None, overrides: dict):
    """A job's settings: its YAML spec (if any) overridden by the flags that were given."""
    from pydantic import ValidationError

    try:
        if config:
            return job_class.from_yaml(config, **overrides)
        return job_class(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:  # name the first problem in one line
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        message = error["msg"].removeprefix("Value error, ")
        source = f" in {config}" if config else ""
        raise PipelineError(f"invalid job settings{source}: {where}: {message}") from exc


def cmd_weights(args: argparse.Namespace) -> int:
    from pipeline.weights import KNOWN_WEIGHTS

    print("|id|scale|params|Set5 PSNR_Y/SSIM_Y|source|reference|")
    print("|---|---|---|---|---|---|")
    for w in KNOWN_WEIGHTS:
        print(
            f"|{w.id}|x{w.scale}|{w.num_params:,}|{w.set5_psnr_y:.2f}/{w.set5_ssim_y:.4f}|{w.source}|{w.reference}|"
        )
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every user error: one line on stderr, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"pan: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--verbose", action="store_true", help="show Ray's own logs and warnings")
    parser = _Parser(prog="pan", description="PAN super-resolution, from one image to a cluster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("upscale-image", parents=[common], help="upscale one image file")
    p.add_argument("input", help="image file or URL")
    p.add_argument("output", help="output file or URL (.png, .jpg, .webp)")
    _add_model_options(p)
    p.add_argument("--png-compress-level", type=int, default=6, choices=range(10), metavar="0-9")
    p.add_argument("--compare", metavar="PICTURE", help="also write a bicubic | PAN picture here")
    p.set_defaults(handler=cmd_upscale_image)

    p = sub.add_parser("compare", parents=[common], help="write a side-by-side bicubic | PAN | HR picture")
    p.add_argument("input", help="low-resolution image")
    p.add_argument("output", help="picture to write (.png, .jpg, .webp)")
    p.add_argument("--hr", help="the high-resolution original: adds a panel and PSNR labels")
    _add_model_options(p)
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser(
        "eval", parents=[common], help="PSNR/SSIM on benchmark sets on Ray, with the bicubic baseline"
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="folder with HR/ (+ LR_bicubic/), image folder, Parquet, imagefolder or hub id (repeatable)",
    )
    p.add_argument(
        "--scale", type=int, choices=(2, 3, 4), action="append", required=True, help="(repeatable)"
    )
    p.add_argument(
        "--weights",
        default=None,
        help="as for upscale-image; '{scale}' is replaced per scale, e.g. weights/PANx{scale}_DF2K.pth",
    )
    p.add_argument("--device", default=None, help="where actors compute: auto (default), cpu, cuda")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--tile", type=int, metavar="PX", help="input tile size; 0 = whole image")
    p.add_argument("--split", default=None, help="dataset split (default: test, validation or the only one)")
    p.add_argument("--report", metavar="OUT.json", help="write the scores as JSON")
    p.add_argument("--compare-dir", metavar="DIR", help="write DIR/<set>/x<scale>/<image>.png pictures")
    p.add_argument("--actors", type=int, help="scoring actors (default: one per GPU, else one per CPU)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser(
        "upscale", parents=[common], help="upscale a folder, S3 prefix or shards on Ray (the batch job)"
    )
    p.add_argument("source", help="folder or URL (s3://...) of images, Parquet or tar shards")
    p.add_argument("dest", help="output folder or URL")
    p.add_argument("--config", metavar="YAML", help="job spec (see jobs/); flags override it")
    p.add_argument("--scale", type=int, choices=(2, 3, 4))
    p.add_argument("--weights", help="hub repo id, folder, file or URL (default: eugenesiow/pan)")
    p.add_argument("--format", choices=("png", "parquet", "both"))
    p.add_argument("--image-column", help="image bytes column of Parquet shards (default: image)")
    p.add_argument("--storage-options", metavar="JSON", help="fsspec options, e.g. '{\"anon\": true}'")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo every input, replacing pan's earlier outputs (even of other weights or scale)",
    )
    p.add_argument(
        "--dest-inside-source",
        action="store_true",
        help="allow DEST inside SOURCE; DEST's files are then never read as inputs",
    )
    p.add_argument("--max-error-fraction", type=float, metavar="F", help="fail when more inputs fail")
    p.add_argument("--device", help="where actors compute: auto (default), cpu, cuda")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--tile", type=int, metavar="PX", help="input tile size (>= 32); 0 = whole image")
    p.add_argument("--actors", type=int, help="model actors (default: one per GPU, else one per CPU)")
    p.add_argument(
        "--png-compress-level",
        type=int,
        choices=range(10),
        metavar="0-9",
        help="zlib level of the PNGs (default: 1, fastest; 6-9: files about 12%% smaller, 4.5-20x the CPU)",
    )
    p.add_argument("--max-pixels", type=int, help="refuse larger inputs (default: 40,000,000)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(handler=cmd_upscale)

    p = sub.add_parser(
        "train", parents=[common], help="train or fine-tune PAN on Ray Train (the same name resumes)"
    )
    p.add_argument("--config", metavar="YAML", help="job spec (see jobs/); flags override it")
    p.add_argument("--data", help="training images: folder, DIV2K zip, Parquet, imagefolder or hub id")
    p.add_argument("--lr-data", help="matching LR archive/folder (default: bicubic from HR)")
    p.add_argument("--scale", type=int, choices=(2, 3, 4))
    p.add_argument("--workers", type=int, help="Ray Train workers (default: 1)")
    p.add_argument("--max-steps", type=int, help="train until this many iterations in all")
    p.add_argument("--storage", help="where runs live: folder or s3:// URL (default: runs)")
    p.add_argument("--name", help="run name: the same name resumes")
    p.add_argument("--batch-size", type=int, help="LR patches per step over all workers (default: 32)")
    p.add_argument("--patch-size", type=int, help="LR patch size in pixels (default: 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 7e-4)")
    p.add_argument("--init-weights", help="fine-tune from these weights")
    p.add_argument("--val-data", help="benchmark set for validation, e.g. Set5")
    p.add_argument("--val-every", type=int, help="validate and checkpoint every N steps (default: 500)")
    p.add_argument("--ema-decay", type=float, help="keep an EMA of the weights (e.g. 0.999)")
    p.add_argument("--five-crop", action="store_true", help="the model card's five-crop pre-augmentation")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, nccl, AMP")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("weights", parents=[common], help="list the known published weights")
    p.set_defaults(handler=cmd_weights)
    return parser


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.raycluster import Terminated, quiet_ray, shutdown_on_exit

    args = build_parser().parse_args(argv)
    # Every command connects explicitly (raycluster.connect): a stray Ray call after the shutdown
    # must fail, not start a new Ray, dashboard and all, while the command exits.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    logging.basicConfig(format="pan: %(message)s", level=logging.INFO if args.verbose else logging.WARNING)
    quiet_ray(verbose=args.verbose)
    try:
        with shutdown_on_exit():
            return args.handler(args)
    except PipelineError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"pan: error: {_one_line(str(exc))}", file=sys.stderr)
    except OSError as exc:  # missing, unreadable or unwritable files, local or remote
        if args.debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        print(f"pan: error: {_one_line(exc.strerror or str(exc))}{where}", file=sys.stderr)
    except Terminated:
        print("pan: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("pan: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
