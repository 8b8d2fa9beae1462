"""The destination lease: one run at a time, renewed while it works, taken over when it expires or,
at once, when its holder's process on this host is gone; local files and S3 (moto); and
``pan upscale`` runs that meet a held, a waited-for and a killed one."""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.batch import lease as lease_module
from pipeline.batch.lease import (
    EXIT_LEASE_HELD,
    Lease,
    LeaseHeldError,
    LeaseLostError,
    LeaseRecord,
    lease_holder,
)
from pipeline.errors import DestinationError, StorageError
from pipeline.io.storage import Files

FILES = Files()  # no storage options: local files and the loopback S3 of the environment

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
    FILES.write_bytes(location, json.dumps(record).encode())


def _holder(location: str) -> dict:
    return json.loads(FILES.read_bytes(location))


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
    with Lease(place, "run-a", FILES) as lease:
        assert _holder(place)["run_id"] == "run-a" and _holder(place)["expires"] > time.time() + 200
        with pytest.raises(LeaseHeldError, match=r"held by run run-a .*--wait-for-lease") as caught:
            Lease(place, "run-b", FILES).acquire()
        assert caught.value.exit_code == EXIT_LEASE_HELD
        lease.check()
    with Lease(place, "run-b", FILES):
        assert _holder(place)["run_id"] == "run-b" and lease_holder(place, FILES).run_id == "run-b"
    assert lease_holder(place, FILES) is None


def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(place):
    _stale(place, expires_in=-1)
    with Lease(place, "next", FILES):
        assert _holder(place)["run_id"] == "next"
    _stale(place, "alive", expires_in=60)
    with pytest.raises(LeaseHeldError, match="alive"):
        Lease(place, "next", FILES).acquire()


def test_renewal_keeps_the_lease_and_notices_a_takeover(tmp_path):
    place = str(tmp_path / "_lease")
    with Lease(place, "slow", FILES, ttl_s=0.6) as lease:
        time.sleep(1.0)  # longer than the lease: only renewals keep it
        with pytest.raises(LeaseHeldError):
            Lease(place, "other", FILES).acquire()
        _stale(place, "thief", expires_in=60)  # what a takeover after a missed renewal looks like
        time.sleep(0.5)
        with pytest.raises(LeaseLostError, match="thief"):
            lease.check()
    assert _holder(place)["run_id"] == "thief"  # not ours: left alone


def test_waiting_for_the_lease(tmp_path):
    place = str(tmp_path / "_lease")
    first = Lease(place, "first", FILES)
    first.acquire()
    told: list[LeaseRecord] = []
    threading.Timer(0.4, first.release).start()
    started = time.monotonic()
    with Lease(place, "second", FILES, wait=True, poll_s=0.05, on_wait=told.append) as second:
        assert time.monotonic() - started >= 0.3
    assert [h.run_id for h in told] == ["first"]
    assert 0.3 <= second.waited_s <= time.monotonic() - started


def test_waited_s_counts_only_the_wait_for_a_live_holder(tmp_path):
    place = str(tmp_path / "_lease")
    with Lease(place, "alone", FILES, wait=True, poll_s=0.05) as alone:
        pass
    assert alone.waited_s == 0.0
    first = Lease(place, "first", FILES)
    first.acquire()
    threading.Timer(1.0, first.release).start()
    second = Lease(place, "second", FILES, wait=True, poll_s=0.05)
    started = time.monotonic()
    second.acquire()
    took = time.monotonic() - started
    second.release()
    assert 0.9 <= second.waited_s <= took < 3


# -- a holder on this host whose process is gone: taken over at once --------------------------------


def _here(tmp_path, **changes) -> dict:
    """A lease record as this process writes it (this host, boot, pid namespace, pid and start), changed."""
    probe = str(tmp_path / "probe" / "_lease")
    with Lease(probe, "probe", FILES):
        record = _holder(probe)
    return {**record, "run_id": "holder", "expires": time.time() + 300, **changes}


def _dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # reaped: its pid is free (and the kernel hands pids out in turn)
    return gone.pid


def _write(location: str, record: dict) -> None:
    FILES.write_bytes(location, json.dumps(record).encode())


linux = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")


def _took_over(place: str, caplog, *words: str) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pipeline.batch.lease"), Lease(place, "next", FILES):
        assert _holder(place)["run_id"] == "next"
    assert time.monotonic() - started < 5  # at once, not after the holder's lease (300 s) runs out
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and all(w in warned[0] for w in words), warned


@linux
def test_this_process_is_recorded_with_its_host_boot_and_start_time(tmp_path):
    psutil = pytest.importorskip("psutil")
    record = _here(tmp_path)
    assert record["pid"] == os.getpid() and record["pid_namespace"] == os.readlink("/proc/self/ns/pid")
    assert record["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    started = psutil.boot_time() + record["start_ticks"] / os.sysconf("SC_CLK_TCK")
    assert abs(started - psutil.Process().create_time()) < 0.05


def test_a_holder_on_this_host_whose_pid_is_gone_is_taken_over_at_once(place, tmp_path, caplog):
    pid = _dead_pid()
    _write(place, _here(tmp_path, pid=pid))
    _took_over(place, caplog, "holder", f"pid {pid}", "no process has pid")


@linux
def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path, caplog):
    place = str(tmp_path / "_lease")
    alive = _here(tmp_path)  # this process is alive, but it started later than the holder did
    _write(place, {**alive, "start_ticks": alive["start_ticks"] - 1})
    _took_over(place, caplog, "holder", f"pid {os.getpid()}", "another process")


@linux
def test_a_holder_that_exited_unreaped_is_taken_over(tmp_path, caplog):
    place = str(tmp_path / "_lease")
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie until reaped
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        _write(place, _here(tmp_path, pid=zombie.pid))
        _took_over(place, caplog, "holder", f"pid {zombie.pid}", "not yet reaped")
    finally:
        zombie.wait()


def test_a_live_holder_on_this_host_is_respected(tmp_path):
    place = str(tmp_path / "_lease")
    _write(place, _here(tmp_path))  # this very process, its real start time
    with pytest.raises(LeaseHeldError, match="held by run holder"):
        Lease(place, "next", FILES).acquire()


@pytest.mark.parametrize(
    "elsewhere",
    [{"host": "elsewhere"}, {"boot_id": "an-earlier-boot"}, {"pid_namespace": "pid:[1]"}],
    ids=["another host", "another boot", "another container"],
)
def test_a_holder_elsewhere_is_judged_by_expiry_only(tmp_path, elsewhere):
    place = str(tmp_path / "_lease")
    _write(place, _here(tmp_path, pid=_dead_pid(), **elsewhere))  # its pids are not ours to look up
    with pytest.raises(LeaseHeldError, match="held by run holder"):
        Lease(place, "next", FILES).acquire()
    _write(place, _here(tmp_path, pid=_dead_pid(), expires=time.time() - 1, **elsewhere))
    with Lease(place, "next", FILES):
        assert _holder(place)["run_id"] == "next"


def test_a_record_of_the_earlier_format_still_loads_and_its_dead_holder_is_taken_over(tmp_path, caplog):
    place = str(tmp_path / "_lease")
    old = {"run_id": "old", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time() - 60,
           "expires": time.time() + 300}  # fmt: skip
    _write(place, old)
    assert lease_holder(place, FILES) == LeaseRecord(**old)
    with pytest.raises(LeaseHeldError, match="held by run old"):  # no start time: a live pid is the holder
        Lease(place, "next", FILES).acquire()
    pid = _dead_pid()
    _write(place, {**old, "pid": pid})
    _took_over(place, caplog, "old", f"pid {pid}")


def test_fields_of_a_later_format_are_ignored(tmp_path):
    place = str(tmp_path / "_lease")
    _write(place, _here(tmp_path, later_field="x"))
    assert lease_holder(place, FILES).run_id == "holder"


def test_without_proc_only_the_pid_is_asked_about(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(lease_module, "_PROC", str(tmp_path / "no-proc"))
    place = str(tmp_path / "_lease")
    record = _here(tmp_path)
    assert record["boot_id"] is record["start_ticks"] is record["pid_namespace"] is None
    _write(place, record)
    with pytest.raises(LeaseHeldError, match="held by run holder"):
        Lease(place, "next", FILES).acquire()
    pid = _dead_pid()
    _write(place, {**record, "pid": pid})
    _took_over(place, caplog, "holder", f"pid {pid}")


def test_the_lease_of_a_killed_process_is_taken_over_at_once(tmp_path, caplog):
    place = str(tmp_path / "dest" / "_lease")
    take = "import sys, time; from pipeline.batch.lease import Lease; from pipeline.io.storage import Files; "
    take += "Lease(sys.argv[1], 'victim', Files()).acquire(); "
    victim = subprocess.Popen(
        [sys.executable, "-c", take + "print('held', flush=True); time.sleep(120)", place],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert victim.stdout.readline() == "held\n"
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        victim.stdout.close()
    assert _holder(place)["run_id"] == "victim"  # left behind, 5 minutes from expiry
    _took_over(place, caplog, "victim", f"pid {victim.pid}", "no process has pid")


def test_atomic_create_only_where_the_storage_has_one(tmp_path):
    first, second = (
        FILES.create_exclusive(str(tmp_path / "a"), b"1"),
        FILES.create_exclusive(str(tmp_path / "a"), b"2"),
    )
    assert first and not second
    assert (tmp_path / "a").read_bytes() == b"1" and os.listdir(tmp_path) == ["a"]
    with pytest.raises(StorageError, match="no atomic create"):
        FILES.create_exclusive("memory://bucket/lease", b"1")
    (tmp_path / "bad").write_text("not json")
    with pytest.raises(DestinationError, match="not a lease pan wrote"):
        Lease(str(tmp_path / "bad"), "x", FILES).acquire()


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
    held = Lease(str(dest / "_lease"), "someone-else", FILES)
    held.acquire()
    busy = _pan("upscale", src, dest, *flags)
    _, err = busy.communicate(timeout=120)
    assert busy.returncode == EXIT_LEASE_HELD, err
    assert err.strip().startswith("pan: error:") and "held by run someone-else" in err
    assert not list(dest.glob("*.png")) and not (dest / "_pan.json").exists()  # nothing claimed or written
    launched = time.monotonic()
    waiting = _pan("upscale", src, dest, *flags, "--wait-for-lease")
    time.sleep(8)
    assert waiting.poll() is None  # still waiting
    held.release()
    out, err = waiting.communicate(timeout=300)
    wall = time.monotonic() - launched
    assert waiting.returncode == 0, err
    assert "held by run someone-else" in err and "waiting for it" in err and _succeeded(out) == 4
    # The minutes spent waiting are not the run's: its seconds (and MP/s) leave them out.
    assert json.loads((dest / "_summary.json").read_text())["seconds"] < wall - 4
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
def test_the_lease_of_a_killed_run_is_taken_over_at_once_by_the_next(job):
    src, dest, flags = job
    first = _pan("upscale", src, dest, *flags, start_new_session=True)  # its lease: 5 minutes
    deadline = time.monotonic() + 120
    while not (dest / "_lease").exists():
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    after = _pan("upscale", src, dest, *flags)  # no --wait-for-lease: the dead run's lease is no wait
    _, err = after.communicate(timeout=300)
    assert after.returncode == 0, err
    assert re.search(rf"pan: .*run \S+ \(pid {first.pid} on .*\) is dead: no process has pid", err), err
    assert len(list(dest.glob("*.png"))) == 4 and not (dest / "_lease").exists()
