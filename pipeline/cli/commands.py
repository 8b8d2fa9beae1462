"""What each ``pan`` command does."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from pipeline.cli.flags import _settings
from pipeline.errors import DestinationError, PipelineError, first_line


def _files(args: argparse.Namespace):
    """How ``upscale-image`` and ``compare`` reach their files: ``--storage-options``, once."""
    from pipeline.io.storage import Files

    return Files(args.storage_options)


def _upscaler(args: argparse.Namespace):
    from pipeline.config.builder import build_upscaler
    from pipeline.config.settings import InferenceSpec

    return build_upscaler(InferenceSpec(**_settings(args, InferenceSpec)), args.scale, files=_files(args))


def _refuse_overwriting_inputs(output: str, *inputs: str | None) -> None:
    """``upscale-image`` and ``compare`` never write over a file they read."""
    from pipeline.io.storage import same_location

    for source in inputs:
        if source and same_location(output, source):
            raise DestinationError(f"{output} is also an input: choose another output path")


def _check_output_folder(location: str, files) -> None:
    """Before computing: the folder ``location`` will be written in takes a write."""
    from pipeline.io.storage import is_url, resolve_location

    folder = location.rsplit("/", 1)[0] if is_url(location) else str(Path(resolve_location(location)).parent)
    files.check_writable(folder)


def _read_image(location: str, files):
    from pipeline.imaging import decode_image

    return decode_image(files.read_bytes(location), name=location)


def _output_format(location: str) -> str:
    suffix = Path(location).suffix.lower().lstrip(".")
    formats = {"png": "png", "jxl": "jxl", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
    if suffix not in formats:
        raise PipelineError(
            f"cannot tell the output format of {location}: end it in .png, .jxl, .jpg or .webp"
        )
    return formats[suffix]


def _save_picture(picture, location: str, files) -> None:
    import numpy as np

    from pipeline.imaging import DecodedImage, encode_image

    image = DecodedImage(np.asarray(picture.convert("RGB")), None, "RGB", None)
    files.write_bytes(location, encode_image(image, _output_format(location)))


def cmd_upscale_image(args: argparse.Namespace) -> int:
    from pipeline.imaging import encode_image, upscale_image

    files = _files(args)
    fmt = _output_format(args.output)
    _refuse_overwriting_inputs(args.output, args.input)
    if args.compare:
        _output_format(args.compare)
        _refuse_overwriting_inputs(args.compare, args.input, args.output)
    image = _read_image(args.input, files)
    upscaler = _upscaler(args)
    for location in (args.output, args.compare):
        if location:
            _check_output_folder(location, files)
    result = upscale_image(upscaler, image)
    files.write_bytes(args.output, encode_image(result, fmt, png_compress_level=args.png_compress_level))
    print(f"{args.input} ({image.width}x{image.height}) -> {args.output} ({result.width}x{result.height})")
    if args.compare:
        _write_comparison(upscaler, image.pixels, None, args.compare, files)
    return 0


def _write_comparison(upscaler, lr, hr, location: str, files) -> None:
    from pipeline.core.metrics import psnr_y
    from pipeline.evaluation.report import comparison_picture
    from pipeline.imaging import imresize
    from pipeline.io.pairs import as_rgb8, crop_to_multiple

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
    _save_picture(comparison_picture(panels), location, files)
    print(f"comparison -> {location}")


def cmd_compare(args: argparse.Namespace) -> int:
    _output_format(args.output)
    _refuse_overwriting_inputs(args.output, args.input, args.hr)
    files = _files(args)
    lr = _read_image(args.input, files).pixels
    hr = _read_image(args.hr, files).pixels if args.hr else None
    upscaler = _upscaler(args)
    _check_output_folder(args.output, files)
    _write_comparison(upscaler, lr, hr, args.output, files)
    return 0


def _run_eval(job) -> int:
    from pipeline.cli.progress import JobProgress
    from pipeline.evaluation.job import run_eval
    from pipeline.evaluation.report import markdown_table

    if job.report:
        _check_output_folder(job.report, job.files)
    with JobProgress("evaluating", unit="images") as progress:
        reports = run_eval(job, on_progress=lambda done, total: progress.update({"scored": done}, 0, total))
    print(markdown_table(reports))
    if job.report:
        # One (set, scale): the report object; several: a list of them.
        payload = reports[0].to_json() if len(reports) == 1 else [r.to_json() for r in reports]
        job.files.write_bytes(job.report, (json.dumps(payload, indent=2) + "\n").encode())
        print(f"report -> {job.report}")
    return 0


def _run_upscale(job) -> int:
    from pipeline.batch.job import check_error_fraction, run_upscale
    from pipeline.cli.progress import JobProgress

    def waiting(holder) -> None:
        print(f"pan: {job.dest} is held by {holder.describe()}; waiting for it", file=sys.stderr)

    with JobProgress("upscaling") as progress:
        summary = run_upscale(job, on_progress=progress.update, on_lease_wait=waiting)
    print(
        f"{summary.inputs} inputs: {summary.succeeded} succeeded, {summary.failed} failed, "
        f"{summary.skipped} skipped, {summary.given_up} given up; "
        f"{summary.output_megapixels:.1f} MP out in "
        f"{summary.seconds:.1f} s ({summary.output_megapixels_per_second:.2f} MP/s"
        + "".join(f", {n} in {p}" for p, n in sorted(summary.precision.items()))
        + f") -> {job.dest}"
    )
    _print_ignored(summary.ignored, summary.ignored_examples)
    if summary.suspect:
        print(
            f"{summary.suspect} outputs inconsistent with their inputs, flagged suspect in "
            f"{job.dest}/_errors (see --min-psnr-vs-input, --max-pattern-levels)",
            file=sys.stderr,
        )
    if summary.given_up:
        print(
            f"{summary.given_up} inputs failed --max-attempts {job.max_attempts} times and were not tried "
            f"again: pan runs {job.dest} --failed",
            file=sys.stderr,
        )
    if summary.failed or summary.suspect:
        print(f"errors table: {job.dest}/_errors", file=sys.stderr)
    check_error_fraction(job, summary)
    return 0


def _print_ignored(ignored: dict[str, int], examples: dict[str, list[str]]) -> None:
    """Say which files of the source were not inputs, so that none leaves a run unseen."""
    from pipeline.batch.sources import HIDDEN, OTHER

    why = {
        HIDDEN: "hidden (a name starting with '.')",
        OTHER: "not an image, .parquet or .tar shard (by extension)",
    }
    for kind, count in ignored.items():
        shown = ", ".join(examples.get(kind, ())) + (", ..." if count > len(examples.get(kind, ())) else "")
        print(f"not inputs: {count} file(s) {why[kind]}: {shown}", file=sys.stderr)


def _run_train(job) -> int:
    from pipeline.training.job import AlreadyTrained, run_training

    result = run_training(job)
    if isinstance(result, AlreadyTrained):
        print(f"{job.run_dir} already holds --max-steps {job.max_steps}: nothing to train (raise it)")
    if result.error:
        raise PipelineError(f"training failed: {first_line(result.error)}")
    metrics = result.metrics or {}
    best = metrics.get("best_val_psnr_y")
    best_text = f", best val PSNR_Y {best:.3f} dB" if best not in (None, float("-inf")) else ""
    print(f"{job.name}: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.5f}{best_text}")
    if metrics.get("data_wait_share") is not None:
        print(f"the steps waited for data {metrics['data_wait_share']:.1%} of their time")
    print(f"metrics -> {job.run_dir}/metrics.jsonl; weights -> {job.run_dir}/export")
    return 0


def _run_prepare(job) -> int:
    from pipeline.cli.progress import JobProgress
    from pipeline.training.prepare import run_prepare
    from pipeline.training.prepared import ERRORS_NAME

    with JobProgress("preparing", unit="images") as progress:
        summary = run_prepare(job, on_progress=lambda counts, total: progress.update(counts, 0, total))
    scales = ", ".join(f"x{s}" for s in summary.scales)
    print(
        f"{summary.inputs} images: {summary.written} written, {summary.failed} failed, {summary.skipped} "
        f"skipped in {summary.seconds:.1f} s; the set holds {summary.sub_images} sub-images of "
        f"{job.crop_size} px at {scales} in {summary.shards} shards ({summary.bytes / 1e9:.2f} GB) "
        f"-> {job.dest}"
    )
    if summary.failed:
        print(f"{summary.failed} images could not be used: {job.dest}/{ERRORS_NAME}", file=sys.stderr)
    return 0


RUNNERS = {"upscale": _run_upscale, "prepare": _run_prepare, "train": _run_train, "eval": _run_eval}


def cmd_job(args: argparse.Namespace) -> int:
    """``pan upscale``, ``pan prepare``, ``pan train``, ``pan eval``: a spec file (if any) overridden
    by the flags."""
    from pipeline.config.settings import KINDS
    from pipeline.config.specfile import build_job

    job_class = KINDS[args.command]
    settings = _settings(args, job_class)
    job = job_class.from_yaml(args.config, **settings) if args.config else build_job(job_class, settings)
    return RUNNERS[job.kind](job)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config.specfile import load_spec

    spec = load_spec(args.spec, args.set or ())
    return RUNNERS[spec.kind](spec.job)


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.config.specfile import load_spec

    failed = 0
    for path in args.specs:
        try:
            spec = load_spec(path, args.set or ())
        except PipelineError as exc:
            _print_error(exc)
            failed += 1
            continue
        print(f"# {path}: a valid {spec.kind} job")
        print(yaml.safe_dump(spec.settings(), sort_keys=False).rstrip())
    return EXIT_USER_ERROR if failed else 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.cli.submit import client, submit, wait
    from pipeline.config.specfile import load_spec

    spec = load_spec(args.spec, args.set or ())  # before anything reaches the cluster
    submission = submit(spec, address=args.address, runtime_env=args.runtime_env, again=args.again)
    if submission.started:
        print(f"submitted {submission.submission_id}")
    elif submission.status == "SUCCEEDED":
        print(
            f"{submission.submission_id} already succeeded today (its spec runs on a schedule): "
            "no second run started; --again runs it once more"
        )
    else:
        print(f"{submission.submission_id} is {submission.status}: attached to it, no second job started")
    if not (args.wait or args.follow):
        print(f"follow it with: pan jobs logs {submission.submission_id} --follow")
        return 0
    try:
        return wait(client(args.address), submission.submission_id, follow=args.follow)
    except KeyboardInterrupt:
        print(
            f"pan: stopped waiting; {submission.submission_id} goes on (pan jobs stop ID ends it)",
            file=sys.stderr,
        )
        return 128 + signal.SIGINT


def cmd_jobs(args: argparse.Namespace) -> int:
    from pipeline.cli.submit import client, job_info, list_rows, status_of, wait
    from pipeline.ray_runtime.quiet import job_log_lines

    jobs = client(args.address)
    if args.action == "list":
        rows = list_rows(jobs)
        width = max([len(r["id"]) for r in rows] + [2])
        print(f"{'ID':<{width}}  {'STATUS':<9}  {'STARTED (UTC)':<16}  ENTRYPOINT")
        for r in rows:
            print(f"{r['id']:<{width}}  {r['status']:<9}  {r['start']:<16}  {r['entrypoint']}")
        return 0
    info = job_info(jobs, args.id)
    if args.action == "status":
        print(f"{args.id}: {status_of(info)}" + (f": {first_line(info.message)}" if info.message else ""))
    elif args.action == "logs":
        if args.follow:
            return wait(jobs, args.id, follow=True)
        print(job_log_lines(jobs.get_job_logs(args.id)), end="")
    elif args.action == "stop":
        stopped = jobs.stop_job(args.id)
        print(f"{args.id}: {'stopping' if stopped else 'already ' + status_of(info)}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """``pan runs DEST``: the runs of a destination's ledger with their counts; ``--failed``: the
    inputs whose last attempt failed."""
    from pipeline.batch.lease import lease_holder
    from pipeline.batch.ledger import failed_inputs, run_rows
    from pipeline.batch.sinks import LEASE_NAME, read_record
    from pipeline.io.storage import Files, join, resolve_location

    dest = resolve_location(args.dest)
    files = Files(getattr(args, "storage_options", None))
    record = read_record(dest, files)
    if record is None:
        raise PipelineError(f"{args.dest} is not a destination of pan upscale (no _pan.json)")
    if args.failed:
        rows = failed_inputs(dest, record.ledger_since, files)
        print("|input|attempts|error|last run|")
        print("|---|---|---|---|")
        for r in rows:
            print(
                f"|{r['key']}|{r['attempts']}|{r['error_type']}: {_one_line(r['error'] or '')}|{r['run_id']}|"
            )
        print(f"{len(rows)} inputs failed at their last attempt", file=sys.stderr)
        return 0
    holder = lease_holder(join(dest, LEASE_NAME), files)
    print("|run|state|succeeded|failed|skipped|given up|suspect|output MP|seconds|")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in run_rows(dest, files):
        running = holder is not None and holder.run_id == r["run_id"] and not holder.dead_because()
        state = "finished" if r["finished"] else "running" if running else "killed"
        if record.ledger_since and r["run_id"] < record.ledger_since:
            state += " (before an --overwrite)"
        cells = [r.get(k, "") for k in ("succeeded", "failed", "skipped", "given_up", "suspect")]
        mp, seconds = r.get("output_megapixels"), r.get("seconds")
        extra = [f"{mp:.1f}" if mp is not None else "", f"{seconds:.0f}" if seconds is not None else ""]
        print("|" + "|".join([r["run_id"], state, *map(str, cells), *extra]) + "|")
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    from pipeline.io.weights import KNOWN_WEIGHTS

    print("|id|scale|params|Set5 PSNR_Y/SSIM_Y|source|reference|")
    print("|---|---|---|---|---|---|")
    for w in KNOWN_WEIGHTS:
        print(
            f"|{w.id}|x{w.scale}|{w.num_params:,}|{w.set5_psnr_y:.2f}/{w.set5_ssim_y:.4f}|{w.source}|{w.reference}|"
        )
    return 0


EXIT_USER_ERROR = 2


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _print_error(exc: PipelineError) -> None:
    """``pan: error: ...`` on stderr: one line; for an ``InvalidSettingsError``, its summary and
    then its problems, one indented line each."""
    from pipeline.errors import InvalidSettingsError

    if isinstance(exc, InvalidSettingsError):
        print(
            f"pan: error: {exc.summary}",
            *(f"  {problem}" for problem in exc.problems),
            sep="\n",
            file=sys.stderr,
        )
    else:
        print(f"pan: error: {_one_line(str(exc))}", file=sys.stderr)
