"""The batch job where clusters misbehave: a killed driver, a lost node, GPU scheduling."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.batch.job import run_upscale
from pipeline.batch.ledger import MANIFEST_SCHEMA, read_ledger
from pipeline.config.settings import UpscaleJob
from pipeline.errors import DeviceError
from pipeline.io.storage import Files
from pipeline.ray_runtime.pool import ActorPool, actor_gpu_share, actor_pool
from pipeline.ray_runtime.session import WATCHDOG_MARK

FILES = Files()  # no storage options: local files and the loopback S3 of the environment

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PAN_BIN = str(Path(sys.executable).with_name("pan"))


@pytest.fixture
def many_inputs(benchmarks_dir, tmp_path):
    """Set14 + Set5 X2 LR images, two copies each (38): a run of some seconds."""
    root = tmp_path / "in"
    for copy in range(2):
        for p in sorted(benchmarks_dir.glob("Set*/LR_bicubic/X2/*.png")):
            (root / f"c{copy}").mkdir(parents=True, exist_ok=True)
            shutil.copy(p, root / f"c{copy}" / p.name)
    return root


def _outputs(dest: Path) -> list[str]:
    """The PNG tree's files (hidden temporaries included: none may be left)."""
    return [f for f in FILES.list_files(str(dest)) if not f.startswith(("_", "parquet/"))]


def _ray_processes_of(driver_pid: int) -> list[str]:
    """Processes carrying the mark the driver's embedded Ray gives every process it starts."""
    found = []
    for proc in psutil.process_iter(["pid", "environ", "cmdline"]):
        try:
            mark = (proc.info["environ"] or {}).get(WATCHDOG_MARK, "")
        except psutil.Error:
            continue
        if mark.startswith(f"{driver_pid}-") and proc.info["pid"] != driver_pid:
            found.append(" ".join(proc.info["cmdline"] or [])[:60])
    return found


def _start_and_wait_for_outputs(
    argv: list[str], dest: Path, outputs: int, committed: bool = False
) -> subprocess.Popen:
    """Start ``argv`` and return once ``dest`` holds ``outputs`` PNGs (and, if ``committed``, a
    commit of the run ledger)."""
    run = subprocess.Popen(
        argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and (
        len(_outputs(dest)) < outputs or (committed and not list(dest.glob("_runs/*/manifest-*.parquet")))
    ):
        assert run.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.2)
    return run


def _gone_within(driver_pid: int, seconds: float) -> list[str]:
    deadline = time.time() + seconds
    while time.time() < deadline and _ray_processes_of(driver_pid):
        time.sleep(0.25)
    return _ray_processes_of(driver_pid)


def test_killed_driver_leaves_no_ray_behind_and_resumes_with_each_output_once(
    many_inputs, weights_dir, tmp_path
):
    dest = tmp_path / "out"
    argv = [PAN_BIN, "upscale", str(many_inputs), str(dest), "--scale", "2", "--format", "both"]
    argv += ["--weights", str(weights_dir / "PANx2_DF2K.pth"), "--parquet-part-rows", "4"]
    run = _start_and_wait_for_outputs([*argv, "--lease-seconds", "10"], dest, 5, committed=True)
    assert _ray_processes_of(run.pid)  # the embedded Ray is up
    os.kill(run.pid, signal.SIGKILL)  # the driver alone: what it started must not outlive it
    run.communicate()
    assert _gone_within(run.pid, 8) == []
    partial = len(_outputs(dest))
    inputs = len(list(many_inputs.rglob("*.png")))
    assert 5 <= partial < inputs
    killed = read_ledger(str(dest), None, FILES)
    assert len(killed.unfinished) == 1 and killed.entries.num_rows  # it committed some parts, then died

    # The killed run could not give its lease back: the next one waits for it to expire.
    again = subprocess.run([*argv, "--wait-for-lease"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    outputs = _outputs(dest)
    assert len(outputs) == len(set(outputs)) == inputs
    assert all(f.endswith(".png") and not Path(f).name.startswith(".") for f in outputs)
    assert "0 failed" in again.stdout and f"{inputs} inputs" in again.stdout
    # Each output has exactly one Parquet row, and the ledger names the part that holds it.
    names = pq.read_table(dest / "parquet", columns=["name"]).column("name").to_pylist()
    assert sorted(names) == sorted(outputs)
    entries = read_ledger(str(dest), None, FILES, columns=MANIFEST_SCHEMA.names).entries.to_pylist()
    assert sorted(e["name"] for e in entries) == sorted(outputs)
    for e in entries:
        assert e["status"] == "succeeded" and e["png"] and e["parquet"], e
        in_part = pq.read_table(dest / e["part"], columns=["name"]).column("name").to_pylist()
        assert in_part.count(e["name"]) == 1


@pytest.mark.parametrize(
    ("signum", "code", "said"), [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")]
)
def test_sigterm_and_ctrl_c_shut_ray_down(many_inputs, weights_dir, tmp_path, signum, code, said):
    dest = tmp_path / "out"
    argv = [PAN_BIN, "upscale", str(many_inputs), str(dest), "--scale", "2"]
    run = _start_and_wait_for_outputs([*argv, "--weights", str(weights_dir / "PANx2_DF2K.pth")], dest, 2)
    run.send_signal(signum)
    _, err = run.communicate(timeout=60)
    assert run.returncode == code and err.strip().splitlines()[-1] == f"pan: {said}", err
    assert _gone_within(run.pid, 8) == []


def test_losing_a_node_mid_run_still_gives_every_output(many_inputs, weights_dir, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        dest = tmp_path / "out"
        job = UpscaleJob(
            source=str(many_inputs),
            dest=str(dest),
            scale=2,
            weights=str(weights_dir / "PANx2_DF2K.pth"),
            actors=2,
        )
        result = {}
        runner = threading.Thread(target=lambda: result.update(summary=run_upscale(job)))
        runner.start()
        deadline = time.time() + 240
        while time.time() < deadline and len(_outputs(dest)) < 3 and runner.is_alive():
            time.sleep(0.2)
        cluster.remove_node(workers[0])
        runner.join(timeout=600)
        assert not runner.is_alive()
        inputs = len(list(many_inputs.rglob("*.png")))
        assert result["summary"].succeeded == inputs and result["summary"].failed == 0
        assert len(_outputs(dest)) == inputs
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.timeout(300)
def test_one_cpu_machine_leaves_the_cpu_to_the_tasks_and_finishes(benchmarks_dir, weights_dir, tmp_path):
    """On one CPU, an actor reserving half of it left no room for the 1-CPU read/decode/encode
    tasks: the run hung. The actor now reserves none, and shares the core."""
    import ray

    ray.shutdown()
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        src = benchmarks_dir / "Set5/LR_bicubic/X4"
        job = UpscaleJob(
            source=str(src), dest=str(tmp_path / "out"), scale=4, weights=str(weights_dir / "PANx4_DF2K.pth")
        )
        pool = ActorPool(size=1, num_gpus=0, num_cpus=0.0, calls=1, threads=1)
        assert actor_pool(job.actors, job.actor_cpus, 5) == pool
        assert run_upscale(job).succeeded == 5
    finally:
        ray.shutdown()


def test_logical_gpu_gets_one_actor_and_cpu_device_computes(benchmarks_dir, weights_dir, tmp_path):
    import ray

    ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        src = benchmarks_dir / "Set5/LR_bicubic/X4"
        weights = str(weights_dir / "PANx4_DF2K.pth")
        job = UpscaleJob(source=str(src), dest=str(tmp_path / "cpu"), scale=4, weights=weights, device="cpu")
        # one actor per GPU, taking the next batch while it computes (2 calls, one model run at a time)
        pool = ActorPool(size=1, num_gpus=1, num_cpus=0.0, calls=2, threads=2)
        assert actor_pool(job.actors, job.actor_cpus, 5) == pool
        # more actors than GPUs share them, 1/k each with k per GPU, and know their share
        shared = job.model_copy(update={"actors": 2})
        pool = ActorPool(size=2, num_gpus=0.5, num_cpus=0.0, calls=2, threads=1)
        assert actor_pool(2, job.actor_cpus, 5) == pool
        assert actor_pool(3, job.actor_cpus, 5).num_gpus == pytest.approx(1 / 3)
        # never more actors than inputs, and those few get the GPU's larger shares
        assert actor_pool(3, job.actor_cpus, 2) == pool
        shares = [ray.remote(num_gpus=n)(actor_gpu_share).remote() for n in (0.25, 0.5, 1, 0)]
        assert ray.get(shares) == [0.25, 0.5, 1.0, 1.0] and actor_gpu_share() == 1.0  # the driver: 1.0
        assert run_upscale(shared).succeeded == 5
        # the same actor on device "auto" must use its GPU, which CUDA cannot see here
        auto = UpscaleJob(source=str(src), dest=str(tmp_path / "auto"), scale=4, weights=weights)
        with pytest.raises(DeviceError, match="CUDA sees no GPU"):
            run_upscale(auto)
    finally:
        ray.shutdown()
    assert actor_gpu_share() == 1.0 and not ray.is_initialized()  # asking starts no Ray
