"""``pan submit`` and ``pan jobs`` against a real Ray head with its job server on loopback, with
token authentication on (as the cluster manifests set it); ids, attach rules and the shipped job
without a cluster."""

import datetime
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli.submit import LOCK_FILE, PROJECT_ROOT, staged_job, submission_id
from pipeline.config.specfile import load_spec

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NIGHTLY = REPO / "jobs/nightly-upscale.yaml"


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head():
    """``ray start --head --block`` on free ports, token auth on; stopped by the pid it started.

    Four logical CPUs on the 2-core machine: the driver of a job holds one (entrypoint_num_cpus),
    and the pipeline needs whole CPUs for its decode/encode tasks beside its model actor."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    gcs, dashboard, *others = _free_ports(7)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    # As in the cluster's image: `python` is the environment pan is installed in, and no `pan`
    # script is on the head's PATH (a head started as .venv/bin/ray start has none either).
    python = Path(temp) / "bin/python"
    python.parent.mkdir()
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if Path(p).resolve() != BIN.resolve()]
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=os.pathsep.join([str(python.parent), *path]),
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    ports = dict(
        zip(
            [
                "--dashboard-agent-listen-port",
                "--metrics-export-port",
                "--runtime-env-agent-port",
                "--ray-client-server-port",
                "--dashboard-agent-grpc-port",
            ],
            others,
            strict=True,
        )
    )
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        "--num-cpus=4",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    log = open(Path(temp) / "head.log", "wb")  # noqa: SIM115
    head = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/gcs_healthz", timeout=2).read()
            break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                head.kill()
                pytest.fail(f"ray head did not start: {(Path(temp) / 'head.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield {"url": url, "gcs": f"127.0.0.1:{gcs}", "token": token}
    head.send_signal(signal.SIGTERM)  # `ray start --block` stops every process it started
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


def _pan(args, *, token=None, timeout=300, **env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(env_vars)
    if token:
        env["RAY_AUTH_TOKEN"] = token  # pan turns RAY_AUTH_MODE=token on for a configured token
    return subprocess.run(
        [str(BIN / "pan"), *map(str, args)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _images(benchmarks_dir: Path, folder: Path, n: int = 3) -> list[str]:
    folder.mkdir()
    names = []
    for path in sorted((benchmarks_dir / "Set5/LR_bicubic/X4").iterdir())[:n]:
        shutil.copy(path, folder / path.name)
        names.append(path.stem)
    return names


@pytest.mark.slow
@pytest.mark.integration
def test_submit_wait_upscales_and_a_second_submission_the_same_day_attaches(
    ray_head, benchmarks_dir, weights_dir, tmp_path
):
    names = _images(benchmarks_dir, tmp_path / "in")
    sets = [
        f"source={tmp_path / 'in'}",
        f"dest={tmp_path / 'out'}",
        f"weights={weights_dir / 'PANx2_DF2K.pth'}",
        "device=cpu",
        "actors=1",
    ]
    args = ["submit", NIGHTLY, "--address", ray_head["url"], *(f"--set={s}" for s in sets)]
    first = _pan([*args, "--wait"], token=ray_head["token"])
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = first.stdout.split("submitted ", 1)[1].split()[0]
    today = datetime.datetime.now(datetime.timezone.utc).date()
    assert job_id == submission_id(load_spec(NIGHTLY, [s.replace("'", "") for s in sets]), today)
    assert job_id.endswith(f"-{today:%Y%m%d}")
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.png")) == names
    rows = pq.read_table(tmp_path / "out/parquet", columns=["key"]).column("key").to_pylist()
    assert sorted(Path(k).stem for k in rows) == names

    again = _pan([*args, "--wait"], token=ray_head["token"])  # a scheduled spec: once a day
    assert again.returncode == 0, again.stderr
    assert f"{job_id} already succeeded today (its spec runs on a schedule): no second run" in again.stdout
    listing = _pan(["jobs", "list", "--address", ray_head["url"]], token=ray_head["token"])
    assert listing.returncode == 0 and listing.stdout.count(job_id) == 1, listing.stdout
    assert f"python -m pipeline run {NIGHTLY.stem}.yaml" in listing.stdout  # no `pan` on the head's PATH
    status = _pan(["jobs", "status", job_id, "--address", ray_head["url"]], token=ray_head["token"])
    assert status.stdout.startswith(f"{job_id}: SUCCEEDED")
    logs = _pan(["jobs", "logs", job_id, "--address", ray_head["url"]], token=ray_head["token"])
    assert "3 inputs: 3 succeeded, 0 failed, 0 skipped" in logs.stdout
    forced = _pan([*args, "--again", "--wait"], token=ray_head["token"])
    assert forced.returncode == 0 and f"submitted {job_id}-2" in forced.stdout, forced.stdout + forced.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_a_spec_without_a_schedule_runs_again_once_its_job_has_ended(
    ray_head, benchmarks_dir, weights_dir, tmp_path
):
    spec = tmp_path / "catch-up.yaml"
    spec.write_text(
        "\n".join(line for line in NIGHTLY.read_text().splitlines() if not line.startswith("schedule"))
    )
    _images(benchmarks_dir, tmp_path / "in", n=2)
    weights = weights_dir / "PANx2_DF2K.pth"
    sets = [f"source={tmp_path / 'in'}", f"dest={tmp_path / 'out'}", f"weights={weights}", "device=cpu",
            "actors=1", "format=png"]  # fmt: skip
    args = ["submit", spec, "--address", ray_head["url"], *(f"--set={s}" for s in sets), "--wait"]
    first = _pan(args, token=ray_head["token"])
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = first.stdout.split("submitted ", 1)[1].split()[0]
    shutil.copy(benchmarks_dir / "Set5/LR_bicubic/X4/womanx4.png", tmp_path / "in/womanx4.png")  # new tonight
    second = _pan(args, token=ray_head["token"])
    assert second.returncode == 0 and f"submitted {job_id}-2" in second.stdout, second.stdout + second.stderr
    logs = _pan(["jobs", "logs", f"{job_id}-2", "--address", ray_head["url"]], token=ray_head["token"])
    assert "3 inputs: 1 succeeded, 0 failed, 2 skipped" in logs.stdout


@pytest.mark.slow
@pytest.mark.integration
def test_a_failing_job_exits_non_zero_with_its_log_tail_and_follow_streams(ray_head, tmp_path):
    args = [
        "submit",
        NIGHTLY,
        "--address",
        ray_head["url"],
        f"--set=source={tmp_path / 'missing'}",
        f"--set=dest={tmp_path / 'out'}",
    ]
    failed = _pan([*args, "--wait"], token=ray_head["token"])
    assert failed.returncode == 2, failed.stdout + failed.stderr  # the job's own exit code: a user error
    assert "last" in failed.stderr and "source not found" in failed.stderr, failed.stderr
    assert "FAILED" in failed.stderr
    # Submitting a failed job again starts a second attempt, whose logs --follow streams.
    retried = _pan([*args, "--follow"], token=ray_head["token"])
    assert retried.returncode == 2 and "submitted " in retried.stdout
    assert retried.stdout.split("submitted ", 1)[1].split()[0].endswith("-2")
    assert "source not found" in retried.stdout  # streamed, not a tail


@pytest.mark.slow
@pytest.mark.integration
def test_a_followed_training_job_shows_its_steps_and_none_of_rays_lines(ray_head, shared_dir, tmp_path):
    sets = [f"data={shared_dir / 'train/BSDS200'}", "lr_data=null", "val_data=null", "workers=1", "gpu=false",
            "max_steps=20", "log_every=10", "val_every=10", "batch_size=4", "patch_size=24",
            f"storage={tmp_path}", "loader_workers=0"]  # fmt: skip
    args = ["submit", REPO / "jobs/retrain-x2.yaml", "--address", ray_head["url"], "--follow"]
    run = _pan([*args, *(f"--set={s}" for s in sets)], token=ray_head["token"])
    assert run.returncode == 0, run.stdout + run.stderr
    shown = run.stdout + run.stderr
    assert "step 10/20 loss" in run.stdout and "step 20/20 loss" in run.stdout
    for noise in ("\x1b[", "pid=", "Uploading package", "Running entrypoint", "INFO", "Warning", "Reporting"):
        assert noise not in shown, shown


@pytest.mark.slow
@pytest.mark.integration
def test_bad_specs_and_tokens_fail_before_anything_is_submitted(ray_head, tmp_path):
    spec = tmp_path / "typo.yaml"
    spec.write_text(NIGHTLY.read_text() + "tilee: 64\n")
    bad = _pan(["submit", spec, "--address", ray_head["url"], "--wait"], token=ray_head["token"])
    assert bad.returncode == 2 and "tilee: not a setting of upscale jobs" in bad.stderr, bad.stderr
    no_token = _pan(["submit", NIGHTLY, "--address", ray_head["url"]])
    assert no_token.returncode == 2 and "wants a token: set RAY_AUTH_TOKEN" in no_token.stderr, (
        no_token.stderr
    )
    wrong = _pan(["jobs", "list", "--address", ray_head["url"]], token="0" * 64)
    assert wrong.returncode == 2 and "refused the token" in wrong.stderr
    listing = _pan(["jobs", "list", "--address", ray_head["url"]], token=ray_head["token"])
    assert "typo" not in listing.stdout
    nothing = _pan(["jobs", "status", "pan-nope", "--address", ray_head["url"]], token=ray_head["token"])
    assert nothing.returncode == 2 and "no job pan-nope" in nothing.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_address_runs_join_a_token_cluster(ray_head, benchmarks_dir, weights_dir, tmp_path):
    names = _images(benchmarks_dir, tmp_path / "in", n=2)
    args = [
        "upscale",
        tmp_path / "in",
        tmp_path / "out",
        "--scale=2",
        f"--weights={weights_dir / 'PANx2_DF2K.pth'}",
        "--device=cpu",
        "--actors=1",
        "--address",
        ray_head["gcs"],
    ]
    done = _pan(args, token=ray_head["token"])
    assert done.returncode == 0, done.stderr
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.png")) == names


def _drivers(ray_head) -> int:
    """How many drivers (jobs and plain ``ray.init`` drivers) the head has seen."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(ray_head["url"], headers={"Authorization": f"Bearer {ray_head['token']}"})
    return len(client.list_jobs())


@pytest.mark.slow
@pytest.mark.integration
def test_an_embedded_run_leaves_a_ray_start_head_alone_and_auto_joins_it(
    ray_head, benchmarks_dir, weights_dir, tmp_path
):
    """A ``ray start`` head runs on the machine and its note names it (as ``ray start`` leaves it
    for ``ray.init()`` to find): without --address the command starts a Ray of its own anyway;
    ``--address auto`` joins the head."""
    temp = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    (temp / "ray").mkdir()
    (temp / "ray/ray_current_cluster").write_text(ray_head["gcs"])
    _images(benchmarks_dir, tmp_path / "in", n=1)
    args = [
        "upscale",
        tmp_path / "in",
        tmp_path / "out",
        "--scale=2",
        f"--weights={weights_dir / 'PANx2_DF2K.pth'}",
    ]
    before = _drivers(ray_head)
    own = _pan(args, token=ray_head["token"], RAY_TMPDIR=str(temp))
    assert own.returncode == 0, own.stderr
    assert "1 inputs: 1 succeeded" in own.stdout and _drivers(ray_head) == before
    joined = _pan([*args, "--address", "auto", "--overwrite"], token=ray_head["token"], RAY_TMPDIR=str(temp))
    assert joined.returncode == 0, joined.stderr
    assert "1 inputs: 1 succeeded" in joined.stdout and _drivers(ray_head) == before + 1
    shutil.rmtree(temp, ignore_errors=True)


def test_ids_name_the_spec_its_settings_and_the_day_of_scheduled_runs(tmp_path):
    nightly = load_spec(NIGHTLY)
    day = datetime.date(2026, 11, 26)
    base = submission_id(nightly, day)
    assert base.startswith("pan-nightly-upscale-") and base.endswith("-20261126")
    assert submission_id(load_spec(NIGHTLY), day) == base  # deterministic
    assert submission_id(nightly, day + datetime.timedelta(days=1)) != base
    assert submission_id(load_spec(NIGHTLY, ["scale=3"]), day) != base
    retrain = submission_id(load_spec(REPO / "jobs/retrain-x2.yaml"), day)
    assert "2026" not in retrain  # not scheduled: one id for these settings, whatever the day


def test_the_shipped_job_is_the_validated_spec(tmp_path):
    spec = load_spec(NIGHTLY, ["source=s3://b/in", "scale=3"])
    staging = tmp_path / "installed"
    staging.mkdir()
    command, env = staged_job(spec, "installed", staging)
    assert command == "python -m pipeline run nightly-upscale.yaml" and env == {"working_dir": str(staging)}
    assert load_spec(staging / "nightly-upscale.yaml").job == spec.job

    staging = tmp_path / "checkout"
    staging.mkdir()
    command, env = staged_job(spec, "working-dir", staging)
    assert command == "python -m pipeline run nightly-upscale.yaml"
    # the package and the spec: not the checkout's outputs, runs, data or virtualenvs
    assert sorted(p.name for p in staging.iterdir()) == ["nightly-upscale.yaml", "pipeline"]
    assert (staging / "pipeline/cli/__init__.py").is_file() and not list(staging.rglob("__pycache__"))
    pins = (PROJECT_ROOT / LOCK_FILE).read_text()
    assert env["pip"] and all(line in pins for line in env["pip"])
    assert any(line.startswith("ray==") for line in env["pip"])
    assert yaml.safe_load((staging / "nightly-upscale.yaml").read_text())["scale"] == 3
