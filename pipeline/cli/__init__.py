"""The ``pan`` command. Every error a user can cause ends in one line on stderr and exit code 2
(75 when another run holds the destination's lease: try later), before any image is computed
where it can be known before (``--debug`` adds the traceback); settings with several problems
end in a summary line and one indented line per problem.
Anything else is a bug and keeps its traceback. Ray's own logging stays hidden unless
``--verbose``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence

from pipeline.cli.commands import (
    EXIT_USER_ERROR,
    _one_line,
    _print_error,
    cmd_compare,
    cmd_job,
    cmd_jobs,
    cmd_run,
    cmd_runs,
    cmd_submit,
    cmd_upscale_image,
    cmd_validate,
    cmd_weights,
)
from pipeline.cli.flags import _add_settings
from pipeline.errors import PipelineError

POSITIONAL = {"upscale": ("source", "dest"), "prepare": ("sources", "dest")}  # the rest are flags


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every user error: one line on stderr, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"pan: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli.submit import RUNTIME_ENVS
    from pipeline.config.settings import KINDS, EvalJob, InferenceSpec, PrepareJob, TrainJob, UpscaleJob

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
        "prepare": "make training sources a prepared set of sub-images, once, on Ray (a re-run finishes it)",
        "train": "train or fine-tune PAN on Ray Train (the same name resumes)",
        "eval": "PSNR/SSIM on benchmark sets on Ray, with the bicubic baseline",
    }
    for kind, job_class in KINDS.items():
        p = sub.add_parser(kind, parents=[common], help=helps[kind], description=helps[kind])
        p.add_argument("--config", metavar="SPEC", help="job spec file (see jobs/); flags override it")
        _add_settings(p, job_class, positional=POSITIONAL.get(kind, ()))
        p.set_defaults(handler=cmd_job)
    assert set(helps) == set(KINDS) and {UpscaleJob, PrepareJob, TrainJob, EvalJob} == set(KINDS.values())

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


def main(argv: Sequence[str] | None = None) -> int:
    from pipeline.ray_runtime.quiet import quiet_ray
    from pipeline.ray_runtime.session import Terminated, shutdown_on_exit, use_configured_token

    args = build_parser().parse_args(argv)
    # Every command connects explicitly (ray_runtime.session.connect): a stray Ray call after the
    # shutdown must fail, not start a new Ray, dashboard and all, while the command exits.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    use_configured_token()
    logging.basicConfig(format="pan: %(message)s", level=logging.INFO if args.verbose else logging.WARNING)
    # our own decisions and waits: always said; with --verbose, the details too
    logging.getLogger("pipeline").setLevel(logging.DEBUG if args.verbose else logging.INFO)
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
