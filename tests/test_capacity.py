"""pipeline.ray_runtime.capacity and the pools sized from it: jobs on a cluster that scales from
zero GPU nodes ask its autoscaler for GPUs, wait for them, and finish (Ray's fake autoscaler:
tests/fake_cluster.py), and refuse at once where no GPU can come."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.ray_runtime.capacity import Capacity
from pipeline.ray_runtime.pool import UNKNOWN_GROWTH_ACTORS, ActorPool, actor_pool

BIN = Path(sys.executable).parent

# -- sizing, without Ray ----------------------------------------------------------------------


def test_a_pool_on_gpus_the_autoscaler_adds_starts_with_one_actor_and_grows():
    resting = Capacity(gpus=0, cpus=4, autoscaler=True)  # how far it may grow: not said
    assert actor_pool(None, 0.5, 100, resting) == ActorPool(
        size=UNKNOWN_GROWTH_ACTORS, num_gpus=1.0, num_cpus=0.25, calls=2, threads=1, min_size=1
    )
    assert actor_pool(None, 0.5, 3, resting).size == 3  # never more actors than inputs
    assert actor_pool(2, 0.5, 100, resting).size == 2  # --actors says how many
    known = Capacity(gpus=1, cpus=4, autoscaler=True, max_gpus=4)
    pool = actor_pool(None, 0.5, 100, known)
    assert (pool.least, pool.size, pool.num_gpus) == (1, 4, 1.0)
    shared = actor_pool(8, 0.5, 100, known)  # 2 actors per GPU, the GPU up now holds 2 of them
    assert (shared.least, shared.size, shared.num_gpus) == (2, 8, 0.5)


def test_a_pool_without_gpus_or_an_autoscaler_stays_on_cpus_and_fixed():
    pool = actor_pool(None, 0.5, 100, Capacity(gpus=0, cpus=4, autoscaler=False))
    assert pool == ActorPool(size=4, num_gpus=0, num_cpus=0.5, calls=1, threads=1)
    assert pool.least == pool.size == 4  # a fixed pool
    full = Capacity(gpus=2, cpus=16, autoscaler=True, max_gpus=2)  # grown as far as it may
    assert actor_pool(None, 0.5, 100, full).least == 2


def test_cuda_where_no_gpu_can_come_is_refused_at_once(monkeypatch):
    from pipeline.errors import DeviceError
    from pipeline.ray_runtime import pool

    monkeypatch.setattr(pool, "capacity", lambda: Capacity(gpus=0, cpus=2, autoscaler=False))
    with pytest.raises(DeviceError, match="--device cuda asked for, but the Ray cluster has 0 GPUs"):
        pool.place_model_actors("cuda", None, 0.5, 10, 900)


# -- a cluster that scales from zero ----------------------------------------------------------


def _pan(cluster, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "pan"), *map(str, args), "--address", cluster.gcs_address],
        env=cluster.driver_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_an_upscale_on_a_cluster_resting_at_zero_gpus_brings_them_up_and_they_go(
    benchmarks_dir, weights_dir, tmp_path
):
    from fake_cluster import start_autoscaling_cluster

    src = benchmarks_dir / "Set5/LR_bicubic/X4"
    with start_autoscaling_cluster(v2=False, max_gpu_nodes=2, idle_timeout_s=10) as cluster:
        assert cluster.alive_gpu_nodes() == 0
        # --device cpu: the actors' logical GPUs are not CUDA's; they compute on the CPU
        run = _pan(cluster, "upscale", src, tmp_path / "out", "--scale", "4", "--device", "cpu",
                   "--weights", weights_dir / "PANx4_DF2K.pth")  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "5 inputs: 5 succeeded" in run.stdout
        assert "model actor(s), 1 GPU each (0 GPUs up now; the autoscaler may add" in run.stderr
        assert "waiting for 1 GPUs: 0 of 1 up" in run.stderr
        summary = json.loads((tmp_path / "out/_summary.json").read_text())
        assert summary["actor_gpu_hours"] > 0
        cluster.wait_gpu_nodes(lambda n: n == 0, timeout=120)  # idle: given back


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_training_on_a_cluster_resting_at_zero_gpus_gets_its_workers_or_names_what_never_came(
    shared_dir, tmp_path
):
    from fake_cluster import start_autoscaling_cluster

    data = shared_dir / "train/BSDS200"
    common = ["train", "--data", data, "--scale", "2", "--gpu", "--max-steps", "2", "--val-every", "2",
              "--batch-size", "3", "--patch-size", "16", "--storage", tmp_path]  # fmt: skip
    with start_autoscaling_cluster(v2=True, max_gpu_nodes=2, idle_timeout_s=10) as cluster:
        assert cluster.alive_gpu_nodes() == 0
        run = _pan(cluster, *common, "--name", "zero", "--workers", "1")
        assert run.returncode == 0, run.stderr
        assert "1 Ray Train worker(s), one GPU each (0 GPUs up now" in run.stderr
        assert (tmp_path / "zero/export/config.json").exists()
        # more GPUs than the worker group has: the wait ends in one line naming what never came
        more = _pan(cluster, *common, "--name", "more", "--workers", "3", "--gpu-wait-seconds", "20")
        assert more.returncode == 2, more.stderr
        error = more.stderr.strip().splitlines()[-1]
        assert error.startswith("pan: error: ") and " of 3 GPUs never came within 20 s" in error, more.stderr
        assert "waiting for 3 GPUs:" in more.stderr
        cluster.wait_gpu_nodes(lambda n: n == 0, timeout=120)
