"""The destination lease: one run at a time, renewed while it works, taken over when it expires;
local files and S3 (moto); and ``pan upscale`` runs that meet a held, a waited-for and a dead one."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import DestinationError, StorageError
from pipeline.lease import EXIT_LEASE_HELD, Lease, LeaseHeldError, LeaseLostError, LeaseRecord, lease_holder
from pipeline.storage import create_exclusive, read_bytes, write_bytes

BIN = Path(sys.executable).parent


def _stale(location: str, run_id: str = "dead-run", *, expires_in: float = -1.0) -> None:
    now = time.time()
    record = {
        "run_id": run_id,
        "host": "elsewhere",
        "pid": 1,
        "started": now - 60,
        "expires": now + expires_in,
    }
    write_bytes(location, json.dumps(record).encode())


def _holder(location: str) -> dict:
    return json.loads(read_bytes(location))


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "dest" / "_lease")
    request.getfixturevalue("s3_server")
    import boto3

    bucket = f"lease-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/dest/_lease"


def test_one_holder_at_a_time_and_given_back_at_the_end(place):
    with Lease(place, "run-a") as lease:
        assert _holder(place)["run_id"] == "run-a" and _holder(place)["expires"] > time.time() + 200
        with pytest.raises(LeaseHeldError, match=r"held by run run-a .*--wait-for-lease") as caught:
            Lease(place, "run-b").acquire()
        assert caught.value.exit_code == EXIT_LEASE_HELD
        lease.check()
    with Lease(place, "run-b"):
        assert _holder(place)["run_id"] == "run-b" and lease_holder(place).run_id == "run-b"
    assert lease_holder(place) is None


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(place):
    _stale(place, expires_in=-1)
    with Lease(place, "next"):
        assert _holder(place)["run_id"] == "next"
    _stale(place, "alive", expires_in=60)
    with pytest.raises(LeaseHeldError, match="alive"):
        Lease(place, "next").acquire()


def test_renewal_keeps_the_lease_and_notices_a_takeover(tmp_path):
    place = str(tmp_path / "_lease")
    with Lease(place, "slow", ttl_s=0.6) as lease:
        time.sleep(1.0)  # longer than the lease: only renewals keep it
        with pytest.raises(LeaseHeldError):
            Lease(place, "other").acquire()
        _stale(place, "thief", expires_in=60)  # what a takeover after a missed renewal looks like
        time.sleep(0.5)
        with pytest.raises(LeaseLostError, match="thief"):
            lease.check()
    assert _holder(place)["run_id"] == "thief"  # not ours: left alone


def test_waiting_for_the_lease(tmp_path):
    place = str(tmp_path / "_lease")
    first = Lease(place, "first")
    first.acquire()
    told: list[LeaseRecord] = []
    threading.Timer(0.4, first.release).start()
    started = time.monotonic()
    with Lease(place, "second", wait=True, poll_s=0.05, on_wait=told.append):
        assert time.monotonic() - started >= 0.3
    assert [h.run_id for h in told] == ["first"]


def test_atomic_create_only_where_the_storage_has_one(tmp_path):
    assert create_exclusive(str(tmp_path / "a"), b"1") and not create_exclusive(str(tmp_path / "a"), b"2")
    assert (tmp_path / "a").read_bytes() == b"1" and os.listdir(tmp_path) == ["a"]
    with pytest.raises(StorageError, match="no atomic create"):
        create_exclusive("memory://bucket/lease", b"1")
    (tmp_path / "bad").write_text("not json")
    with pytest.raises(DestinationError, match="not a lease pan wrote"):
        Lease(str(tmp_path / "bad"), "x").acquire()


# -- pan upscale meets the lease (real Ray) ---------------------------------------------------------


def _pan(*args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen([str(BIN / "pan"), *map(str, args)], env=env, **pipes, **kwargs)


@pytest.fixture
def job(tmp_path, benchmarks_dir, weights_dir):
    src = tmp_path / "in"
    src.mkdir()
    for path in sorted((benchmarks_dir / "Set14/LR_bicubic/X4").iterdir())[:4]:
        shutil.copy(path, src / path.name)
    flags = ["--scale=2", f"--weights={weights_dir / 'PANx2_DF2K.pth'}", "--device=cpu", "--actors=1"]
    return src, tmp_path / "out", flags


def _succeeded(out: str) -> int:
    return int(re.search(r"(\d+) succeeded", out).group(1))


@pytest.mark.slow
@pytest.mark.integration
def test_a_held_destination_refuses_with_code_75_and_waits_with_the_flag(job):
    src, dest, flags = job
    held = Lease(str(dest / "_lease"), "someone-else")
    held.acquire()
    busy = _pan("upscale", src, dest, *flags)
    _, err = busy.communicate(timeout=120)
    assert busy.returncode == EXIT_LEASE_HELD, err
    assert err.strip().startswith("pan: error:") and "held by run someone-else" in err
    assert not list(dest.glob("*.png")) and not (dest / "_pan.json").exists()  # nothing claimed or written
    waiting = _pan("upscale", src, dest, *flags, "--wait-for-lease")
    time.sleep(8)
    assert waiting.poll() is None  # still waiting
    held.release()
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0, err
    assert "held by run someone-else" in err and "waiting for it" in err and _succeeded(out) == 4
    assert not (dest / "_lease").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_two_runs_at_once_never_process_an_input_twice(job):
    src, dest, flags = job
    runs = [_pan("upscale", src, dest, *flags) for _ in range(2)]
    results = [(r.communicate(timeout=300), r.returncode) for r in runs]
    codes = sorted(code for _, code in results)
    done = sum(_succeeded(out) for (out, _), code in results if code == 0)
    assert codes in ([0, 0], [0, EXIT_LEASE_HELD]) and done == 4, results
    if codes == [0, EXIT_LEASE_HELD]:
        assert any("held by run" in err for (_, err), code in results if code == EXIT_LEASE_HELD)
    assert len(list(dest.glob("*.png"))) == 4


@pytest.mark.slow
@pytest.mark.integration
def test_the_lease_of_a_killed_run_expires_and_the_next_run_proceeds(job):
    src, dest, flags = job
    first = _pan("upscale", src, dest, *flags, "--lease-seconds=10", start_new_session=True)
    deadline = time.monotonic() + 120
    while not (dest / "_lease").exists():
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    refused = _pan("upscale", src, dest, *flags)
    _, err = refused.communicate(timeout=120)
    if refused.returncode == EXIT_LEASE_HELD:  # still within the dead run's 10 s
        assert "expires in" in err
    after = _pan("upscale", src, dest, *flags, "--wait-for-lease")
    _, err = after.communicate(timeout=300)
    assert after.returncode == 0, err
    assert len(list(dest.glob("*.png"))) == 4 and not (dest / "_lease").exists()
