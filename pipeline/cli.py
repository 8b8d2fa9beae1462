"""The ``pan`` command. Every error a user can cause ends in one line on stderr and exit code 2
(75 when another run holds the destination's lease: try later), before any image is computed
where it can be known before (``--debug`` adds the traceback); settings with several problems
end in a summary line and one indented line per problem.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pipeline.errors import DestinationError, PipelineError

EXIT_USER_ERROR = 2


def _converter(annotation: Any, metadata: list[Any]) -> Callable[[str], Any]:
    """An argparse ``type`` that validates a flag's text as the job model would (jobspec)."""
    from pipeline.jobspec import coerce_setting

    def convert(text: str) -> Any:
        try:
            return coerce_setting(annotation, metadata, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return convert


def _add_settings(
    parser: argparse.ArgumentParser,
    job_class: type,
    names: Sequence[str] | None = None,
    *,
    positional: Sequence[str] = (),
    required: Sequence[str] = (),
    defaults: bool = False,
) -> None:
    """Arguments for the fields ``names`` (default: all) of a job model: the field's name as the
    flag, its type (choices, repeatable lists, --x/--no-x booleans), its description as help.

    Flags that are not given are absent from the parsed arguments, so a spec file's values stand,
    unless ``defaults``: then they take the field's default (commands without a spec file)."""
    from pydantic_core import PydanticUndefined

    from pipeline.jobspec import flag, options_of

    for name in names or job_class.model_fields:
        field = job_class.model_fields[name]
        help_text = (field.description or "").replace("%", "%%")
        if name in positional:
            parser.add_argument(name, metavar=name.upper(), type=_converter(field.annotation, field.metadata),
                                help=help_text)  # fmt: skip
            continue
        annotation = field.annotation
        options = options_of(annotation)
        kwargs: dict[str, Any] = {"required": name in required}
        default = field.get_default(call_default_factory=True)
        kwargs["default"] = default if defaults else argparse.SUPPRESS
        if default not in (None, PydanticUndefined, False, {}, ()):
            help_text += f" (default: {default})"
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is tuple:  # repeatable: --scale 2 --scale 3
            element = get_args(annotation)[0]
            kwargs.update(action="append", type=_converter(element, []))
            if get_origin(element) is Literal:
                kwargs["choices"] = get_args(element)
            if defaults:
                kwargs["default"] = None
        else:
            kwargs["type"] = _converter(annotation, field.metadata)
            literals = [v for o in options if get_origin(o) is Literal for v in get_args(o)]
            if len(options) == 1 and literals:
                kwargs["choices"] = literals
            elif literals:  # a number or a word: tile
                kwargs["metavar"] = f"{'|'.join(map(str, literals))}|{name.upper()}"
            elif get_origin(options[0]) is dict:
                kwargs["metavar"] = "JSON"
        parser.add_argument(flag(name), help=help_text, **kwargs)


def _settings(args: argparse.Namespace, job_class: type) -> dict[str, Any]:
    """The job settings given on the command line."""
    return {k: v for k, v in vars(args).items() if k in job_class.model_fields}


def _files(args: argparse.Namespace):
    """How ``upscale-image`` and ``compare`` reach their files: ``--storage-options``, once."""
    from pipeline.storage import Files

    return Files(args.storage_options)


def _upscaler(args: argparse.Namespace):
    from pipeline.engine import build_upscaler
    from pipeline.jobspec import InferenceSpec

    return build_upscaler(InferenceSpec(**_settings(args, InferenceSpec)), args.scale, files=_files(args))


def _refuse_overwriting_inputs(output: str, *inputs: str | None) -> None:
    """``upscale-image`` and ``compare`` never write over a file they read."""
    from pipeline.storage import same_location

    for source in inputs:
        if source and same_location(output, source):
            raise DestinationError(f"{output} is also an input: choose another output path")


def _check_output_folder(location: str, files) -> None:
    """Before computing: the folder ``location`` will be written in takes a write."""
    from pipeline.storage import is_url, resolve_location

    folder = location.rsplit("/", 1)[0] if is_url(location) else str(Path(resolve_location(location)).parent)
    files.check_writable(folder)


def _read_image(location: str, files):
    from pipeline.imaging import decode_image

    return decode_image(files.read_bytes(location), name=location)


def _output_format(location: str) -> str:
    suffix = Path(location).suffix.lower().lstrip(".")
    formats = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}
    if suffix not in formats:
        raise PipelineError(f"cannot tell the output format of {location}: end it in .png, .jpg or .webp")
    return formats[suffix]


def _save_picture(picture, location: str, files) -> None:
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format=_output_format(location).upper())
    files.write_bytes(location, buffer.getvalue())


def cmd_upscale_image(args: argparse.Namespace) -> int:
    from pipeline.imaging import encode_image

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
    result = upscaler.upscale_image(image)
    files.write_bytes(args.output, encode_image(result, fmt, png_compress_level=args.png_compress_level))
    print(f"{args.input} ({image.width}x{image.height}) -> {args.output} ({result.width}x{result.height})")
    if args.compare:
        _write_comparison(upscaler, image.pixels, None, args.compare, files)
    return 0


def _write_comparison(upscaler, lr, hr, location: str, files) -> None:
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
    from pipeline.eval_job import run_eval
    from pipeline.progress import JobProgress
    from pipeline.report import markdown_table

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
    from pipeline.progress import JobProgress
    from pipeline.upscale import check_error_fraction, run_upscale

    def waiting(holder) -> None:
        print(f"pan: {job.dest} is held by {holder.describe()}; waiting for it", file=sys.stderr)

    with JobProgress("upscaling") as progress:
        summary = run_upscale(job, on_progress=progress.update, on_lease_wait=waiting)
    print(
        f"{summary['inputs']} inputs: {summary['succeeded']} succeeded, {summary['failed']} failed, "
        f"{summary['skipped']} skipped, {summary['given_up']} given up; "
        f"{summary['output_megapixels']:.1f} MP out in "
        f"{summary['seconds']:.1f} s ({summary['output_megapixels_per_second']:.2f} MP/s"
        + "".join(f", {n} in {p}" for p, n in sorted(summary["precision"].items()))
        + f") -> {job.dest}"
    )
    _print_ignored(summary["ignored"], summary["ignored_examples"])
    if summary["suspect"]:
        print(
            f"{summary['suspect']} outputs far from a bicubic upscale, flagged suspect "
            "(see --min-psnr-vs-bicubic)",
            file=sys.stderr,
        )
    if summary["given_up"]:
        print(
            f"{summary['given_up']} inputs failed --max-attempts {job.max_attempts} times and were not tried "
            f"again: pan runs {job.dest} --failed",
            file=sys.stderr,
        )
    if summary["failed"] or summary["suspect"]:
        print(f"errors table: {job.dest}/_errors", file=sys.stderr)
    check_error_fraction(job, summary)
    return 0


def _print_ignored(ignored: dict[str, int], examples: dict[str, list[str]]) -> None:
    """Say which files of the source were not inputs, so that none leaves a run unseen."""
    from pipeline.sources import HIDDEN, OTHER

    why = {
        HIDDEN: "hidden (a name starting with '.')",
        OTHER: "not an image, .parquet or .tar shard (by extension)",
    }
    for kind, count in ignored.items():
        shown = ", ".join(examples.get(kind, ())) + (", ..." if count > len(examples.get(kind, ())) else "")
        print(f"not inputs: {count} file(s) {why[kind]}: {shown}", file=sys.stderr)


def _run_train(job) -> int:
    from pipeline.train import run_training

    result = run_training(job)
    if result.error:
        raise PipelineError(f"training failed: {str(result.error).splitlines()[0]}")
    metrics = result.metrics or {}
    best = metrics.get("best_val_psnr_y")
    best_text = f", best val PSNR_Y {best:.3f} dB" if best not in (None, float("-inf")) else ""
    print(f"{job.name}: step {metrics.get('step')}, loss {metrics.get('loss', float('nan')):.5f}{best_text}")
    print(f"metrics -> {job.run_dir}/metrics.jsonl; weights -> {job.run_dir}/export")
    return 0


RUNNERS = {"upscale": _run_upscale, "train": _run_train, "eval": _run_eval}


def cmd_job(args: argparse.Namespace) -> int:
    """``pan upscale``, ``pan train``, ``pan eval``: a spec file (if any) overridden by the flags."""
    from pipeline.jobspec import KINDS, build_job

    job_class = KINDS[args.command]
    settings = _settings(args, job_class)
    job = job_class.from_yaml(args.config, **settings) if args.config else build_job(job_class, settings)
    return RUNNERS[job.kind](job)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.jobspec import load_spec

    spec = load_spec(args.spec, args.set or ())
    return RUNNERS[spec.kind](spec.job)


def cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.jobspec import load_spec

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
    from pipeline.jobspec import load_spec
    from pipeline.submit import client, submit, wait

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
    from pipeline.raycluster import job_log_lines
    from pipeline.submit import client, job_info, list_rows, status_of, wait

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
        print(f"{args.id}: {status_of(info)}" + (f": {info.message.splitlines()[0]}" if info.message else ""))
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
    from pipeline.lease import lease_holder
    from pipeline.ledger import failed_inputs, run_rows
    from pipeline.sinks import LEASE_NAME, read_record
    from pipeline.storage import Files, join, resolve_location

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
    from pipeline.jobspec import KINDS, EvalJob, InferenceSpec, TrainJob, UpscaleJob
    from pipeline.submit import RUNTIME_ENVS

    inference = ("scale", *InferenceSpec.model_fields, "storage_options")  # upscale-image and compare
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common.add_argument("--verbose", action="store_true", help="show Ray's own logs and warnings")
    parser = _Parser(prog="pan", description="PAN super-resolution, from one image to a cluster.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("upscale-image", parents=[common], help="upscale one image file")
    p.add_argument("input", help="image file or URL")
    p.add_argument("output", help="output file or URL (.png, .jpg, .webp)")
    _add_settings(p, UpscaleJob, (*inference, "png_compress_level"), required=("scale",), defaults=True)
    p.add_argument("--compare", metavar="PICTURE", help="also write a bicubic | PAN picture here")
    p.set_defaults(handler=cmd_upscale_image)

    p = sub.add_parser("compare", parents=[common], help="write a side-by-side bicubic | PAN | HR picture")
    p.add_argument("input", help="low-resolution image")
    p.add_argument("output", help="picture to write (.png, .jpg, .webp)")
    p.add_argument("--hr", help="the high-resolution original: adds a panel and PSNR labels")
    _add_settings(p, UpscaleJob, inference, required=("scale",), defaults=True)
    p.set_defaults(handler=cmd_compare)

    helps = {
        "upscale": "upscale a folder, S3 prefix or shards on Ray (the batch job)",
        "train": "train or fine-tune PAN on Ray Train (the same name resumes)",
        "eval": "PSNR/SSIM on benchmark sets on Ray, with the bicubic baseline",
    }
    for kind, job_class in KINDS.items():
        p = sub.add_parser(kind, parents=[common], help=helps[kind], description=helps[kind])
        p.add_argument("--config", metavar="SPEC", help="job spec file (see jobs/); flags override it")
        _add_settings(p, job_class, positional=("source", "dest") if job_class is UpscaleJob else ())
        p.set_defaults(handler=cmd_job)
    assert set(helps) == set(KINDS) and {UpscaleJob, TrainJob, EvalJob} == set(KINDS.values())

    sets = argparse.ArgumentParser(add_help=False)
    sets.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a setting of the spec (repeatable); VALUE is read as YAML, e.g. scale=3",
    )
    p = sub.add_parser("run", parents=[common, sets], help="run the job a spec file describes, here")
    p.add_argument("spec", metavar="SPEC", help="job spec file (YAML with kind: and settings; see jobs/)")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("validate", parents=[common, sets], help="check spec files; print resolved settings")
    p.add_argument("specs", metavar="SPEC", nargs="+", help="job spec files")
    p.set_defaults(handler=cmd_validate)

    address = argparse.ArgumentParser(add_help=False)
    address.add_argument(
        "--address",
        help="the cluster's job server, http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS or RAY_ADDRESS)",
    )
    p = sub.add_parser(
        "submit",
        parents=[common, sets, address],
        help="validate a spec, run it on a Ray cluster",
    )
    p.add_argument("spec", metavar="SPEC", help="job spec file (see jobs/)")
    p.add_argument(
        "--runtime-env",
        choices=RUNTIME_ENVS,
        default="installed",
        help="installed: the package in the cluster's image (default); working-dir: ship this checkout's "
        "pipeline/ package with requirements.lock",
    )
    p.add_argument(
        "--again",
        action="store_true",
        help="run a scheduled spec again although its run of the day succeeded (a spec without a schedule "
        "runs again whenever its last job has ended)",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--wait", action="store_true", help="wait for the end; exit code 0 only if it succeeded")
    how.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser("jobs", parents=[common], help="list, inspect, follow or stop a cluster's jobs")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=_Parser)
    actions.add_parser("list", parents=[common, address], help="jobs submitted to the cluster, newest first")
    for action, text in [("status", "a job's state"), ("logs", "a job's logs"), ("stop", "stop a job")]:
        q = actions.add_parser(action, parents=[common, address], help=text)
        q.add_argument("id", metavar="ID", help="submission id (see pan jobs list)")
        if action == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")
    p.set_defaults(handler=cmd_jobs)

    p = sub.add_parser(
        "runs", parents=[common], help="the runs of an upscale destination (its ledger) and their counts"
    )
    p.add_argument("dest", metavar="DEST", help="the destination folder or URL of pan upscale")
    p.add_argument("--failed", action="store_true", help="list the inputs whose last attempt failed")
    _add_settings(p, UpscaleJob, ("storage_options",))
    p.set_defaults(handler=cmd_runs)

    p = sub.add_parser("weights", parents=[common], help="list the known published weights")
    p.set_defaults(handler=cmd_weights)
    return parser


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


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.raycluster import Terminated, quiet_ray, shutdown_on_exit, use_configured_token

    args = build_parser().parse_args(argv)
    # Every command connects explicitly (raycluster.connect): a stray Ray call after the shutdown
    # must fail, not start a new Ray, dashboard and all, while the command exits.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    use_configured_token()
    logging.basicConfig(format="pan: %(message)s", level=logging.INFO if args.verbose else logging.WARNING)
    quiet_ray(verbose=args.verbose)
    try:
        with shutdown_on_exit():
            return args.handler(args)
    except PipelineError as exc:
        if args.debug:
            traceback.print_exc()
        _print_error(exc)
        return getattr(exc, "exit_code", EXIT_USER_ERROR)
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
