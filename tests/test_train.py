"""Training on a real local Ray (gloo, CPU): checkpoints, resume, a killed worker, S3 storage."""

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import numpy as np
import psutil
import pytest

from pipeline.cli import main
from pipeline.config.settings import TrainJob
from pipeline.core.engine import Upscaler
from pipeline.evaluation.scoring import evaluate
from pipeline.io.pairs import load_benchmark
from pipeline.io.storage import Files
from pipeline.io.weights import load_pretrained
from pipeline.training.job import run_training

FILES = Files()  # no storage options: local files and the loopback S3 of the environment

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent
PAN_BIN = str(Path(sys.executable).with_name("pan"))


@pytest.fixture(scope="module")
def bsds(shared_dir):
    return str(shared_dir / "train/BSDS200")


def _job(**settings) -> TrainJob:
    """Tiny CPU runs: small batches of small patches."""
    return TrainJob(**{"workers": 1, "batch_size": 4, "patch_size": 24, **settings})


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_then_resume_without_repeating_a_step(local_ray, bsds, benchmarks_dir, tmp_path, capsys):
    argv = [
        "train",
        "--data",
        bsds,
        "--scale",
        "2",
        "--workers",
        "2",
        "--storage",
        str(tmp_path),
        "--name",
        "r",
    ]
    argv += [
        "--batch-size",
        "4",
        "--patch-size",
        "24",
        "--val-every",
        "3",
        "--val-data",
        str(benchmarks_dir / "Set5"),
    ]
    assert main([*argv, "--max-steps", "6"]) == 0
    run = tmp_path / "r"
    assert _steps(run) == [1, 2, 3, 4, 5, 6]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"val_psnr_y", "val_ssim_y"} <= set(records[2]) and "val_psnr_y" not in records[3]
    assert all(r["loss"] > 0 and r["lr"] > 0 for r in records)
    assert any(p.name.startswith("checkpoint") for p in run.iterdir())
    assert (run / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    for export in ("export", "export-best"):
        assert load_pretrained(run / export, scale=2).num_parameters() == 261_403
    capsys.readouterr()

    assert main([*argv, "--max-steps", "9"]) == 0
    assert _steps(run) == list(range(1, 10))
    assert "step 9" in capsys.readouterr().out

    # A resume at another scale would train another model into the same run: refused, naming both.
    exported = (run / "export/config.json").read_text()
    x3 = [a if a != "2" else "3" for a in argv]
    assert main([*x3, "--max-steps", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pan: error: run ") and "trains PAN x2" in err and "asks for x3" in err, err
    assert _steps(run) == list(range(1, 10)) and (run / "export/config.json").read_text() == exported


def test_the_readme_example_runs_from_the_checkout(shared_dir, tmp_path):
    """The README's `pan train` command, with its relative paths and every flag, from a checkout
    beside ../shared, but 20 steps instead of its 300 (those take 3 min on a 2-core CI machine,
    and the steps themselves are tested above); run again, it resumes and has nothing left to do."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^pan train (.+?[^\\])$", readme, flags=re.M | re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "), comments=True)
    for flag, value in (("--max-steps", "20"), ("--val-every", "10")):
        argv[argv.index(flag) + 1] = value
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (tmp_path / "shared").symlink_to(shared_dir)
    for _ in range(2):
        run = subprocess.run([PAN_BIN, "train", *argv], cwd=checkout, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stderr.strip() == "", run.stderr  # Ray's own chatter stays hidden
    name = argv[argv.index("--name") + 1]
    steps = _steps(checkout / "runs" / name)
    assert steps == list(range(1, int(argv[argv.index("--max-steps") + 1]) + 1))
    lines = [line for line in run.stdout.splitlines() if "step " in line and "/" in line]
    assert len(lines) == len(set(lines))  # each step printed once
    assert all(line.startswith("step ") for line in lines), lines  # no "(RayTrainWorker pid=...)", no colour


def _kill_one_train_worker() -> bool:
    """SIGKILL one Ray Train worker of this process's Ray (its raylet is our child): not another
    test process's, where tests run in parallel."""
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except psutil.Error:
            continue
        if any("RayTrainWorker" in part for part in cmdline):
            os.kill(proc.pid, signal.SIGKILL)
            return True
    return False


def test_killed_worker_is_restarted_from_the_last_checkpoint(local_ray, bsds, tmp_path):
    job = _job(data=bsds, scale=2, name="k", storage=str(tmp_path), workers=2, max_steps=40, val_every=5)
    result = {}
    runner = threading.Thread(target=lambda: result.update(outcome=run_training(job)))
    runner.start()
    metrics = tmp_path / "k/metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and _steps(tmp_path / "k")[-1] >= 10):
        time.sleep(0.2)
    assert _kill_one_train_worker()
    runner.join(timeout=600)
    outcome = result["outcome"]
    assert outcome.error is None and outcome.metrics["step"] == 40
    assert _steps(tmp_path / "k") == list(range(1, 41))  # resumed from a checkpoint: no step twice


def test_s3_storage(local_ray, s3_server, bsds):
    boto3.client("s3").create_bucket(Bucket="runs")
    job = _job(data=bsds, scale=3, name="s", storage="s3://runs/pan", patch_size=16, max_steps=4, val_every=2)
    assert run_training(job).error is None
    files = FILES.list_files("s3://runs/pan/s")
    assert "metrics.jsonl" in files and "export/config.json" in files
    assert any(f.startswith("checkpoint") for f in files)
    assert run_training(job.model_copy(update={"max_steps": 6})).error is None
    body = boto3.client("s3").get_object(Bucket="runs", Key="pan/s/metrics.jsonl")["Body"].read()
    steps = [json.loads(line)["step"] for line in body.decode().splitlines()]
    assert steps == list(range(1, 7))
    assert load_pretrained("s3://runs/pan/s/export", scale=3).num_parameters() == 261_403


def test_fine_tuning_official_weights_keeps_set5(local_ray, bsds, weights_dir, benchmarks_dir, tmp_path):
    weights = str(weights_dir / "PANx2_DF2K.pth")
    job = _job(data=bsds, scale=2, name="ft", storage=str(tmp_path), batch_size=8, patch_size=48)
    job = job.model_copy(update={"max_steps": 12, "val_every": 12, "lr": 2e-6, "init_weights": weights})
    assert run_training(job).error is None
    model = load_pretrained(tmp_path / "ft/export", scale=2)
    name, pairs = load_benchmark(str(benchmarks_dir / "Set5"), 2)
    report = evaluate(Upscaler(model, device="cpu"), name, pairs)
    assert abs(report.psnr_y - 38.0007) < 0.1
    official = load_pretrained(weights_dir / "PANx2_DF2K.pth", scale=2)
    changed = [
        not np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(model.state_dict().values(), official.state_dict().values(), strict=True)
    ]
    assert any(changed)  # it did train


def _training(ema: bool, amp: bool):
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from pipeline.core.model import PAN
    from pipeline.training.loop import _Training

    model = PAN(scale=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=7e-4)
    return _Training(
        model,
        optimizer,
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=10),
        torch.amp.GradScaler("cpu", enabled=amp),  # the CPU's scaler: the same state as CUDA's
        AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)) if ema else None,
    )


def test_a_checkpoint_restores_every_part_of_the_training_state_with_the_loss_scale():
    """Model, optimizer, schedule, EMA, step, best score and AMP's loss scale and growth tracker:
    a resumed AMP run that started again at a scale of 2^16 would skip steps on overflow."""
    import torch

    before = _training(ema=True, amp=True)
    patch = torch.from_numpy(np.linspace(0, 1, 3 * 16 * 16, dtype=np.float32).reshape(1, 3, 16, 16))
    for _ in range(3):
        loss = torch.nn.functional.l1_loss(before.model(patch), torch.zeros(1, 3, 32, 32))
        before.optimizer.zero_grad()
        before.scaler.scale(loss).backward()
        before.scaler.step(before.optimizer)
        before.scaler.update()
        before.scheduler.step()
        before.ema.update_parameters(before.model)
    before.scaler.update(new_scale=512.0)  # as after overflows
    before.step, before.best = 3, 31.5
    after = _training(ema=True, amp=True)
    after.load_state_dict(before.state_dict(), rank=0, seed=0)
    assert (after.step, after.best) == (3, 31.5)
    assert after.scaler.get_scale() == 512.0
    assert after.scaler.state_dict() == before.scaler.state_dict()
    assert after.scheduler.state_dict() == before.scheduler.state_dict()
    assert after.optimizer.state_dict()["state"][0]["step"] == 3
    for a, b in [(after.model, before.model), (after.ema, before.ema)]:
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name


def test_a_checkpoint_without_amp_resumes_with_amp_at_a_fresh_scale():
    """A run checkpointed on a CPU (no AMP, no scaler state) may resume on a GPU."""
    after = _training(ema=False, amp=True)
    after.load_state_dict(_training(ema=False, amp=False).state_dict(), rank=0, seed=0)
    assert after.scaler.get_scale() == 2.0**16


def test_s3_fine_tuning_with_credentials_only_in_storage_options(s3_server, bsds, weights_dir, tmp_path):
    """No AWS_* in the environment: the driver, the Ray Train worker (which loads the weights it
    fine-tunes) and Ray Train's checkpoint upload all reach S3 with the options given once."""
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="creds")
    s3.put_object(Bucket="creds", Key="w/PANx2_DF2K.pth", Body=(weights_dir / "PANx2_DF2K.pth").read_bytes())
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server}}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    argv = [PAN_BIN, "train", "--data", bsds, "--scale", "2", "--name", "ft", "--storage", "s3://creds/runs",
            "--init-weights", "s3://creds/w/PANx2_DF2K.pth", "--storage-options", json.dumps(options),
            "--max-steps", "2", "--val-every", "2", "--batch-size", "4", "--patch-size", "24"]  # fmt: skip
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="creds", Prefix="runs/ft/")["Contents"]}
    assert {"runs/ft/export/config.json", "runs/ft/metrics.jsonl"} <= keys
    assert any(k.startswith("runs/ft/checkpoint_") for k in keys)


def test_training_on_a_prepared_set_records_where_the_step_time_goes(
    local_ray, benchmarks_dir, tmp_path, capsys
):
    """`pan train --data` takes a prepared set (found by its manifest); each step's wait for its
    batch and its whole time are in metrics.jsonl, and their share in run.json and the summary."""
    from pipeline.config.settings import PrepareJob
    from pipeline.training.prepare import run_prepare

    prepared = str(tmp_path / "set")
    run_prepare(
        PrepareJob(sources=str(benchmarks_dir / "Set5/HR"), dest=prepared, scale=2, crop_size=96, step=48)
    )
    argv = ["train", "--data", prepared, "--scale", "2", "--workers", "2", "--storage", str(tmp_path)]
    argv += ["--name", "p", "--batch-size", "4", "--patch-size", "24", "--max-steps", "4", "--val-every", "4"]
    assert main(argv) == 0
    assert "the steps waited for data" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "p/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 <= r["data_seconds"] <= r["step_seconds"] for r in records)
    timed = json.loads((tmp_path / "p/run.json").read_text())["input"]
    assert timed["steps"] == 4 and 0 <= timed["data_wait_share"] < 1
    assert timed["step_seconds"] == pytest.approx(sum(r["step_seconds"] for r in records))


def test_a_lost_node_shrinks_an_elastic_run_which_resumes_and_finishes(bsds, tmp_path, monkeypatch):
    """Spot GPUs: a node of an elastic run (min_workers 1 of 2) dies mid-run; the run goes on from
    its last checkpoint on the one worker left, repeats no step, and finishes. Ray Train first tries
    the lost size again, for as long as a worker group may take to start (60 s by default, time for
    an autoscaler to replace the node): 10 s here. An elastic run that started short of workers
    (the nodes' resources not yet seen) grows when it next checks: every 5 s here."""
    import ray
    from ray.cluster_utils import Cluster

    import pipeline.training.job

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")  # the nodes' processes inherit it
    monkeypatch.setattr(pipeline.training.job, "ELASTIC_RESIZE_SECONDS", 5.0)
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    metrics = tmp_path / "e/metrics.jsonl"

    def records() -> list[dict]:
        return [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []

    try:
        job = _job(data=bsds, scale=2, name="e", storage=str(tmp_path), workers=2, min_workers=1,
                   max_steps=150, val_every=10, max_failures=5, address=cluster.address)  # fmt: skip
        result = {}
        runner = threading.Thread(target=lambda: result.update(outcome=run_training(job)))
        runner.start()
        deadline = time.time() + 300
        while time.time() < deadline and runner.is_alive() and not any(r["workers"] == 2 for r in records()):
            time.sleep(0.2)
        assert any(r["workers"] == 2 for r in records()), "the run never had its two workers"
        cluster.remove_node(nodes[0])
        runner.join(timeout=600)
        assert not runner.is_alive()
        outcome = result["outcome"]
        assert outcome.error is None and outcome.metrics["step"] == 150
        done = records()
        assert [r["step"] for r in done] == list(range(1, 151))  # resumed: no step twice, none lost
        # Two workers when the node went (seen above), one after. The records of steps after the
        # last committed checkpoint were done again, so they may all be of one worker now.
        assert done[-1]["workers"] == 1
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.parametrize(("batch", "world"), [(32, 3), (4, 2), (5, 4)])
def test_the_ranks_weighted_losses_give_the_global_batchs_gradient(benchmarks_dir, batch, world):
    """However a global batch divides over the workers (32 over 3: 11, 11, 10), DDP's average of
    the ranks' weighted mean losses' gradients is the gradient of the whole batch's mean loss."""
    import torch

    from pipeline.core.model import PAN
    from pipeline.training.loop import batch_share

    job = _job(data="x", scale=2, name="g", batch_size=batch, workers=world)
    shares = [batch_share(job, rank, world) for rank in range(world)]
    assert sum(n for n, _ in shares) == batch and max(n for n, _ in shares) - min(n for n, _ in shares) <= 1
    hr = torch.from_numpy(np.asarray(_photo(benchmarks_dir), dtype=np.float32) / 255)
    hr = hr.permute(2, 0, 1)[:, : 12 * batch, :32].reshape(3, batch, 12, 32).permute(1, 0, 2, 3)
    lr = torch.nn.functional.avg_pool2d(hr, 2)
    torch.manual_seed(0)
    model = PAN(scale=2)

    def gradient(lr, hr, weight=1.0):
        model.zero_grad()
        (torch.nn.functional.l1_loss(model(lr), hr) * weight).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = gradient(lr, hr)
    starts = np.cumsum([0] + [n for n, _ in shares])
    averaged = (
        sum(
            gradient(lr[a:b], hr[a:b], w)
            for (a, b), (_, w) in zip(itertools.pairwise(starts), shares, strict=True)
        )
        / world
    )
    torch.testing.assert_close(averaged, whole, rtol=1e-4, atol=1e-6)


def _photo(benchmarks_dir):
    from PIL import Image

    return Image.open(benchmarks_dir / "Set14/HR/baboon.png").convert("RGB")


def test_batch_per_worker_scales_the_batch_and_the_learning_rate_and_a_resume_moves_the_schedule():
    import torch

    from pipeline.training.loop import _Training, batch_share, global_batch, peak_lr

    job = _job(
        data="x", scale=2, name="b", batch_size=16, workers=4, batch_per_worker=True, lr=1e-3, min_lr=0
    )
    assert global_batch(job, 4) == 64 and batch_share(job, 1, 4) == (16, 1.0) and peak_lr(job, 4) == 4e-3
    paper = job.model_copy(update={"batch_per_worker": False})
    assert global_batch(paper, 4) == 16 and peak_lr(paper, 4) == 1e-3
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=4e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=100, eta_min=0)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    training = _Training(parameter, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False), None)
    training.set_peak_lr(
        peak_lr(job, 2), 0
    )  # resumed on 2 workers: half the peak, the same place in the cosine
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 / 2)
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * (1 + np.cos(np.pi * 51 / 100)) / 2)


def test_settings_that_cannot_share_a_batch_are_refused():
    with pytest.raises(ValueError, match=r"min_workers\n.*3 is more than workers \(2\)"):
        _job(data="x", scale=2, name="w", workers=2, min_workers=3)
    with pytest.raises(ValueError, match=r"batch_size\n.*2 patches cannot be shared by 4 workers"):
        _job(data="x", scale=2, name="w", workers=4, batch_size=2)
