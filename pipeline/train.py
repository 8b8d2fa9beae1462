"""Training PAN on Ray Train: DDP over workers, checkpoints, resume, fault tolerance, export.

The recipe is the PAN paper's: L1 loss, Adam(0.9, 0.99), lr 7e-4 with cosine annealing and warm
restarts, batches of 64-px LR patches with the 8 flips/rotations, counted in iterations. AMP on GPU,
optional EMA of the weights. Validation every ``val_every`` steps on a benchmark set with the core
metrics; the best weights are tracked.

Layout under ``STORAGE/NAME`` (local or ``s3://``):
``checkpoint_*`` (Ray Train's: model, optimizer, scheduler, AMP loss scale, step, EMA, RNG, best score),
``metrics.jsonl`` (one object per step: step, loss, lr, seconds since this attempt's loop began,
and val_psnr_y/val_ssim_y on validation steps), ``learning_curve.png``, ``export/`` (final weights)
and ``export-best/`` (best validation), both in the ``save_pretrained`` layout that
``pan upscale --weights`` takes, and ``run.json``: the model the run trains (scale and PAN config).

Running again with the same storage and name resumes from the latest checkpoint: steps are never
done twice, and ``max_steps`` may be raised to train further. A resume that would train another
model (another scale, or ``init_weights`` of another shape) is refused before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError, SettingsError
from pipeline.jobspec import TrainJob
from pipeline.model import PAN, PANConfig
from pipeline.storage import Files, join

STATE_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"
RUN_FILE = "run.json"


# -- inside each worker ---------------------------------------------------------------------------


class _RunFiles:
    """metrics.jsonl and the learning curve, kept by rank 0 and rewritten at each checkpoint.

    Rewriting whole files (not appending) works on object stores too; on resume the records after
    the checkpoint's step are dropped, so no step appears twice.
    """

    def __init__(self, job: TrainJob, resumed_step: int) -> None:
        self.job = job
        self.records: list[dict[str, Any]] = []
        if resumed_step:
            try:
                text = job.files.read_bytes(join(job.run_dir, METRICS_FILE)).decode()
            except FileNotFoundError:
                text = ""
            rows = (json.loads(line) for line in text.splitlines() if line.strip())
            self.records = [r for r in rows if r["step"] <= resumed_step]

    def flush(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        files = self.job.files
        files.write_bytes(join(self.job.run_dir, METRICS_FILE), text.encode())
        files.write_bytes(join(self.job.run_dir, CURVE_FILE), learning_curve_png(self.records))


@dataclasses.dataclass
class _Training:
    """What a checkpoint saves and a resume restores, in one place (``state_dict`` and
    ``load_state_dict``, as torch's own objects do): the model (DDP-wrapped once prepared), its
    optimizer, the learning-rate schedule, AMP's loss scaler, the EMA copy, the step and the best
    validation score. The loss scale matters on a GPU: a resumed run that starts it again at 2^16
    skips steps on overflow until it has come down again."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.nn.Module | None
    step: int = 0
    best: float = float("-inf")

    @property
    def pan(self) -> PAN:
        """The model being trained, unwrapped."""
        return _unwrap(self.model)

    @property
    def scored(self) -> PAN:
        """The weights validated and exported: the EMA copy when there is one."""
        return _unwrap(self.ema) if self.ema is not None else self.pan

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.pan.state_dict(), "config": self.pan.config.to_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "step": self.step, "best": self.best, "rng": torch.get_rng_state()}  # fmt: skip
        if self.scaler.is_enabled():  # a disabled scaler has no state (and refuses to load one)
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any], *, rank: int, seed: int) -> None:
        """Restore a checkpoint's state. Rank 0 continues its saved random stream; the other
        ranks get fresh streams tied to the step. A checkpoint made without AMP (on a CPU) leaves
        the scaler as it is."""
        if state.get("config", self.pan.config.to_dict()) != self.pan.config.to_dict():  # run.json's backstop
            raise SettingsError(f"the checkpoint holds PAN {state['config']}, not {self.pan.config}")
        self.pan.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.step, self.best = state["step"], state["best"]
        if rank == 0:
            torch.set_rng_state(state["rng"])
        else:
            torch.manual_seed(seed + rank + 7919 * self.step)


def learning_curve_png(records: list[dict[str, Any]]) -> bytes:
    """Training loss and validation PSNR_Y against step, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, loss_ax = plt.subplots(figsize=(7, 4), dpi=100)
    loss_ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, label="L1 loss")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training L1 loss")
    loss_ax.set_yscale("log")
    val = [r for r in records if "val_psnr_y" in r]
    if val:
        psnr_ax = loss_ax.twinx()
        psnr_ax.plot([r["step"] for r in val], [r["val_psnr_y"] for r in val], "o-", color="tab:red")
        psnr_ax.set_ylabel("validation PSNR_Y (dB)", color="tab:red")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _export(model: PAN, location: str, files: Files) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files.upload_dir(tmp, location)


def _validate(model: PAN, pairs: list, device: torch.device) -> tuple[float, float]:
    from pipeline.engine import build_upscaler
    from pipeline.evaluate import evaluate
    from pipeline.jobspec import InferenceSpec

    spec = InferenceSpec(precision="fp32")
    upscaler = build_upscaler(spec, model.scale, files=None, model=model, device=str(device))
    report = evaluate(upscaler, "val", pairs)
    return report.psnr_y, report.ssim_y


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop (also runs in-process with ScalingConfig(num_workers=0))."""
    import ray.train
    import ray.train.torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from pipeline.datasets import PatchDataset, open_pairs
    from pipeline.evaluate import load_benchmark
    from pipeline.raycluster import say
    from pipeline.weights import load_pretrained

    job = TrainJob(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(job.seed + rank)

    files = job.files
    model = load_pretrained(job.init_weights, scale=job.scale, files=files) if job.init_weights else None
    model = model or PAN(scale=job.scale)
    # On the device before the optimizer exists: a resumed optimizer's state is loaded onto its
    # parameters' device, and moving the model afterwards (prepare_model) would leave that state on
    # the CPU (Adam then fails on a GPU: "found at least two devices, cuda:0 and cpu").
    model.to(device).train()
    ema = None
    if job.ema_decay:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(job.ema_decay), use_buffers=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.lr, betas=(0.9, 0.99))
    training = _Training(
        model,
        optimizer,
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=job.restart_every, eta_min=job.min_lr
        ),
        torch.amp.GradScaler(device.type, enabled=device.type == "cuda"),
        ema,
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
        try:
            training.load_state_dict(state, rank=rank, seed=job.seed)
        except SettingsError as exc:
            raise SettingsError(f"{job.run_dir}: {exc}") from exc
    files = _RunFiles(job, training.step) if rank == 0 else None
    training.model = model = ray.train.torch.prepare_model(model)

    pairs = open_pairs(job.data, job.scale, lr_source=job.lr_data, files=files)
    dataset = PatchDataset(
        pairs, job.scale, job.patch_size, five_crop=job.five_crop, cache_images=job.cache_images
    )
    per_worker = max(1, job.batch_size // world)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_worker, shuffle=True, drop_last=True, num_workers=job.loader_workers
    )
    loader = ray.train.torch.prepare_data_loader(loader)  # DistributedSampler: each worker its shard
    if len(loader) == 0:
        raise PipelineError(f"{job.data} has too few images for a batch of {per_worker} per worker")
    val_pairs = load_benchmark(job.val_data, job.scale, files=files)[1] if job.val_data and rank == 0 else []
    scheduler, scaler = training.scheduler, training.scaler

    loop_start = started = time.perf_counter()
    done_since_log = 0
    epoch = training.step // len(loader)
    while training.step < job.max_steps:
        if hasattr(loader, "sampler") and hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for lr_batch, hr_batch in loader:
            training.step = step = training.step + 1
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                loss = torch.nn.functional.l1_loss(model(lr_batch), hr_batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(_unwrap(model))
            done_since_log += 1
            record = {"step": step, "loss": float(loss.detach()), "lr": scheduler.get_last_lr()[0],
                      "seconds": time.perf_counter() - loop_start}  # fmt: skip
            if rank == 0 and step % job.log_every == 0:
                rate = done_since_log * per_worker * world / (time.perf_counter() - started)
                loss_text = f"loss {record['loss']:.5f} lr {record['lr']:.2e}"
                say(f"step {step}/{job.max_steps} {loss_text} {rate:.1f} patches/s")
                started, done_since_log = time.perf_counter(), 0
            if step % job.val_every == 0 or step == job.max_steps:
                _checkpoint(job, training, record, rank=rank, val_pairs=val_pairs, files=files)
            elif files is not None:
                files.records.append(record)
            if step >= job.max_steps:
                break
        epoch += 1
    if rank == 0:
        _export(training.scored, join(job.run_dir, "export"), job.files)


def _unwrap(model: torch.nn.Module) -> PAN:
    while hasattr(model, "module"):
        model = model.module
    return model


def _checkpoint(
    job: TrainJob,
    training: _Training,
    record: dict[str, Any],
    *,
    rank: int,
    val_pairs: list,
    files: _RunFiles | None,
) -> None:
    """Validate (rank 0), write metrics and a checkpoint; every rank reports. Updates ``training.best``."""
    import ray.train

    metrics = dict(record)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            scored = training.scored
            if val_pairs:
                scored.eval()
                metrics["val_psnr_y"], metrics["val_ssim_y"] = _validate(
                    scored, val_pairs, next(scored.parameters()).device
                )
                scored.train()
                if metrics["val_psnr_y"] > training.best:
                    training.best = metrics["val_psnr_y"]
                    _export(scored, join(job.run_dir, "export-best"), job.files)
            torch.save(training.state_dict(), Path(tmp) / STATE_FILE)
            files.records.append(metrics)
            files.flush()
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({**metrics, "best_val_psnr_y": training.best}, checkpoint=ckpt)


# -- the driver -----------------------------------------------------------------------------------


def model_config(job: TrainJob) -> PANConfig:
    """The PAN a run trains: the shape of ``init_weights`` (loading them checks them), else the
    paper's at ``job.scale``."""
    if job.init_weights:
        from pipeline.weights import load_pretrained

        return load_pretrained(job.init_weights, scale=job.scale, files=job.files).config
    return PANConfig(scale=job.scale)


def _describe(config: dict[str, Any]) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in config.items() if k != "scale")
    return f"x{config.get('scale')} ({shape})"


def claim_run(job: TrainJob, config: PANConfig) -> None:
    """Record the model a run trains (``run.json``); refuse a resume (a run with a checkpoint)
    that would train another, naming both: its checkpoints, metrics and exports would mix two
    models."""
    location = join(job.run_dir, RUN_FILE)
    try:
        recorded = json.loads(job.files.read_bytes(location)).get("model", {})
    except FileNotFoundError:
        recorded = None
    except (ValueError, AttributeError) as exc:
        raise SettingsError(
            f"{location} is damaged ({exc}); restore it or start a run of another name"
        ) from exc
    if recorded == config.to_dict():
        return
    resumable = any(f.startswith("checkpoint_") for f in job.files.list_files(job.run_dir))
    if recorded is not None and resumable:
        raise SettingsError(
            f"run {job.run_dir} trains PAN {_describe(recorded)}, but this resume asks for "
            f"{_describe(config.to_dict())}; resume it with its own settings, or give a new --name"
        )
    # A new run, or one that never reached a checkpoint: this run's model is the run's.
    job.files.write_bytes(location, (json.dumps({"model": config.to_dict()}, indent=2) + "\n").encode())


def run_training(job: TrainJob):
    """Train (or resume) the run ``STORAGE/NAME`` on a Ray cluster; returns Ray Train's Result.

    Fails fast on the driver, before Ray starts: the data sources open (names only, nothing
    decoded), the weights load, the storage takes a write, and a resume trains the same model.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.datasets import open_pairs
    from pipeline.raycluster import connect, user_error, verbose

    open_pairs(job.data, job.scale, lr_source=job.lr_data, files=job.files)
    if job.val_data:
        open_pairs(job.val_data, job.scale, files=job.files)
    config = model_config(job)
    job.files.check_writable(job.storage)
    claim_run(job, config)
    # Ray Train copies each print of a worker to the logs as well, which showed every step twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not (job.address or os.environ.get("RAY_ADDRESS")):  # an embedded Ray: no node is preempted
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    connect(job.address, ray_train=True)
    if job.gpu and not ray.cluster_resources().get("GPU"):
        raise PipelineError("--gpu asked for, but the Ray cluster has no GPUs")
    filesystem, storage_path = job.files.pyarrow_filesystem(job.storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job.model_dump(),
        torch_config=TorchConfig(backend="nccl" if job.gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.gpu),
        run_config=RunConfig(
            name=job.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="INFO" if verbose() else "ERROR"),
        ),
    )
    try:
        return trainer.fit()
    except Exception as exc:  # a worker failed for good: surface the user's error, if it is one
        raise (user_error(exc) or exc) from None
