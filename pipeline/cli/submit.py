"""Handing a job spec to a Ray cluster through Ray's job API (``ray.job_submission``), and
watching the jobs there.

A submission runs ``pan run SPEC`` on the cluster: the spec is validated here first (``--set``
applied, local paths made absolute), then shipped with the job, so the cluster runs exactly what
was checked. Local paths must therefore be ones the cluster's nodes share; URLs are safest.

Its code comes from one of two places (``--runtime-env``):
- ``installed`` (default): the package installed in the cluster's image (``cluster/Dockerfile``);
  only the spec file travels, as the job's working directory.
- ``working-dir``: this checkout's package (``pipeline/``, nothing else of the checkout: not its
  outputs, runs, data or virtualenvs) travels with it, with the pinned versions of
  ``requirements.lock`` installed by Ray in a virtualenv.
Either way the entrypoint is ``python -m pipeline run SPEC`` (``ENTRYPOINT``): it needs the
cluster's ``python`` to be the environment pan is installed in (the image's is), not a ``pan``
script on the head's PATH.

The driver asks for one CPU and no GPU (``entrypoint_num_cpus``/``entrypoint_num_gpus``): GPUs
are for the model actors.

Submission ids say what runs: ``pan-<spec name>-<hash of the settings>``, plus ``-<UTC date>`` for
a spec with a ``schedule``. A submission attaches to the job of its id while that job is pending or
running (a retraining still going is not started twice). Once it has ended, a new attempt starts,
as ``<id>-2``, ``<id>-3``...: the upscale job is incremental, so running it again is cheap and takes
what is new. One exception keeps a schedule's meaning: a scheduled spec whose run of the day
succeeded is not run again that day, unless asked (``again``).

Token authentication: a token in ``RAY_AUTH_TOKEN`` (or the file ``RAY_AUTH_TOKEN_PATH``) is sent
as ``Authorization: Bearer``; see ``pipeline.ray_runtime.session.auth_token``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from pipeline.config.specfile import Spec
from pipeline.errors import ClusterError, SettingsError, first_line
from pipeline.ray_runtime.quiet import job_log_lines

RUNTIME_ENVS = ("installed", "working-dir")
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the checkout, when pan runs from one
LOCK_FILE = "requirements.lock"
POLL_S = 2.0
LOG_TAIL_LINES = 40
_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


@dataclass(frozen=True)
class Submission:
    submission_id: str
    started: bool  # False: an existing job was attached to (pending or running), or already done today
    status: str


ENTRYPOINT = ("python", "-m", "pipeline", "run")  # + the spec file: independent of the head's PATH


def dashboard_address(address: str | None) -> str:
    """The job server's URL: ``--address``, else ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``;
    ``host:port`` means ``http://host:port``."""
    address = address or next((os.environ[v] for v in _ADDRESS_VARIABLES if os.environ.get(v)), None)
    if not address:
        raise ClusterError(
            "no cluster to talk to: give --address http://HEAD:8265 (the dashboard) or set RAY_ADDRESS"
        )
    return address if "://" in address else f"http://{address}"


@contextlib.contextmanager
def _without_address_variables() -> Iterator[None]:
    """Ray's client lets ``RAY_ADDRESS`` override the address it is given; ours must win."""
    saved = {v: os.environ.pop(v) for v in _ADDRESS_VARIABLES if v in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def client(address: str | None):
    """A ``JobSubmissionClient`` of the cluster, with the auth token when one is configured."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from pipeline.ray_runtime.quiet import quiet_loggers
    from pipeline.ray_runtime.session import auth_token

    quiet_loggers()
    url = dashboard_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        with _without_address_variables():
            return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as exc:
        said = "refused the token" if token else "wants a token"
        raise ClusterError(
            f"the cluster at {url} {said}: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, a file holding it) "
            "to the cluster's token"
        ) from exc
    except (ConnectionError, RuntimeError) as exc:
        raise ClusterError(f"no Ray job server at {url}: {first_line(exc)}") from exc


def submission_id(spec: Spec, today: datetime.date | None = None) -> str:
    """``pan-<name>-<settings hash>`` (+ ``-<YYYYMMDD>`` for scheduled specs), in ``[A-Za-z0-9_.-]``."""
    settings = json.dumps(spec.settings(), sort_keys=True)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.name)[:80]
    base = f"pan-{name}-{digest}"
    if spec.schedule:
        base += f"-{(today or datetime.datetime.now(datetime.timezone.utc).date()):%Y%m%d}"
    return base


def _attempt(job_id: str, base: str) -> int:
    """1 for ``base``, N for ``base-N``, 0 for any other id."""
    if job_id == base:
        return 1
    tail = job_id.removeprefix(f"{base}-")
    return int(tail) if tail != job_id and tail.isdigit() else 0


def staged_job(spec: Spec, mode: str, staging: Path) -> tuple[str, dict[str, Any]]:
    """(entrypoint, runtime_env) of the job, its working directory written into ``staging``.

    What travels is the validated spec, resolved (``--set`` applied, local paths absolute as they
    were here), so the cluster runs exactly the settings that were checked. ``working-dir`` adds a
    copy of this checkout's ``pipeline/`` package, all the job runs (nothing else of the checkout:
    its outputs, data and virtualenvs stay here), and the pins of ``requirements.lock``."""
    if mode not in RUNTIME_ENVS:
        raise SettingsError(f"--runtime-env must be one of {', '.join(RUNTIME_ENVS)}, not {mode!r}")
    env: dict[str, Any] = {"working_dir": str(staging)}
    if mode == "working-dir":
        lock = PROJECT_ROOT / LOCK_FILE
        if not (PROJECT_ROOT / "pyproject.toml").is_file() or not lock.is_file():
            raise SettingsError(
                f"--runtime-env working-dir ships a checkout with {LOCK_FILE}: none at {PROJECT_ROOT}"
            )
        shutil.copytree(
            PROJECT_ROOT / "pipeline", staging / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
        )
        env["pip"] = [
            line.strip() for line in lock.read_text().splitlines() if line.strip()[:1] not in ("", "#")
        ]
    spec_file = f"{spec.name}.yaml"
    header = f"# {spec.path} as validated by pan submit{''.join(f' --set {s}' for s in spec.sets)}\n"
    (staging / spec_file).write_text(header + yaml.safe_dump(spec.settings(), sort_keys=False))
    return shlex.join([*ENTRYPOINT, spec_file]), env


def submit(
    spec: Spec, *, address: str | None, runtime_env: str = "installed", again: bool = False
) -> Submission:
    """Start the spec's job on the cluster, or attach to its job while that one is pending or
    running; a scheduled spec that already succeeded today is left alone unless ``again`` (see
    the module docstring)."""
    jobs = client(address)
    base = submission_id(spec)
    attempts = sorted(
        ((_attempt(j.submission_id, base), j) for j in jobs.list_jobs() if j.submission_id),
        key=lambda pair: pair[0],
    )
    attempts = [(n, j) for n, j in attempts if n]
    if attempts:
        last = attempts[-1][1]
        status = status_of(last)
        done_today = status == "SUCCEEDED" and spec.schedule is not None and not again
        if status in ("PENDING", "RUNNING") or done_today:
            return Submission(last.submission_id, False, status)
    job_id = base if not attempts else f"{base}-{attempts[-1][0] + 1}"
    with tempfile.TemporaryDirectory(prefix="pan-submit-") as staging:
        command, env = staged_job(spec, runtime_env, Path(staging))
        try:
            jobs.submit_job(
                entrypoint=command,
                submission_id=job_id,
                runtime_env=env,
                entrypoint_num_cpus=1,
                entrypoint_num_gpus=0,
                metadata={"pan_spec": spec.path, "pan_sets": " ".join(spec.sets), "pan_kind": spec.kind},
            )
        except RuntimeError as exc:
            if "already exists" not in str(exc):  # else: submitted at the same moment elsewhere
                raise ClusterError(f"the cluster refused the job: {first_line(exc)}") from exc
            return Submission(job_id, False, status_of(jobs.get_job_info(job_id)))
    return Submission(job_id, True, "PENDING")


def status_of(job) -> str:
    """``PENDING``, ``RUNNING``, ``SUCCEEDED``, ``FAILED`` or ``STOPPED``."""
    return getattr(job.status, "value", str(job.status))


def job_info(jobs, job_id: str):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise ClusterError(f"no job {job_id} on this cluster (see pan jobs list)") from exc
        raise


def wait(jobs, job_id: str, *, follow: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Wait for the job to end (streaming its logs with ``follow``); the exit code that says how it
    ended: 0 succeeded, the job's own exit code (else 1) failed, 1 stopped. A job that did not
    succeed prints the tail of its logs (unless they were streamed)."""
    if follow:
        asyncio.run(_stream_logs(jobs, job_id, out))
    status, last = None, None
    while True:
        info = job_info(jobs, job_id)
        status = status_of(info)
        if status != last:
            print(f"pan: job {job_id}: {status}", file=err, flush=True)
            last = status
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(POLL_S)
    if status == "SUCCEEDED":
        return 0
    if not follow:
        tail = job_log_lines(jobs.get_job_logs(job_id)).rstrip().splitlines()[-LOG_TAIL_LINES:]
        print(f"--- last {len(tail)} lines of the job's logs ---", file=err)
        print("\n".join(tail), file=err, flush=True)
    if info.message:
        print(f"pan: job {job_id}: {first_line(info.message)}", file=err)
    return (info.driver_exit_code or 1) if status == "FAILED" else 1


async def _stream_logs(jobs, job_id: str, out: TextIO) -> None:
    """The job's logs as they come, whole lines at a time, Ray's own left out (``job_log_lines``)."""
    pending = ""
    async for chunk in jobs.tail_job_logs(job_id):
        lines = (pending + chunk).splitlines(keepends=True)
        pending = lines.pop() if lines and not lines[-1].endswith("\n") else ""
        out.write(job_log_lines("".join(lines)))
        out.flush()
    out.write(job_log_lines(pending))
    out.flush()


def list_rows(jobs) -> list[dict[str, str]]:
    """Submitted jobs, newest first: id, status, start (UTC), entrypoint."""
    rows = []
    for job in sorted(jobs.list_jobs(), key=lambda j: j.start_time or 0, reverse=True):
        if not job.submission_id:  # plain drivers (ray.init) are listed by Ray too
            continue
        start = datetime.datetime.fromtimestamp((job.start_time or 0) / 1000, datetime.timezone.utc)
        rows.append(
            {"id": job.submission_id, "status": status_of(job),
             "start": f"{start:%Y-%m-%d %H:%M}", "entrypoint": job.entrypoint}
        )  # fmt: skip
    return rows
