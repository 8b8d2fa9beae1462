"""What each Ray Train worker runs: the training loop, its state, its files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config.settings import TrainJob
from pipeline.core.model import PAN
from pipeline.errors import SettingsError
from pipeline.io.storage import Files, join
from pipeline.io.weights import save_pretrained

STATE_FILE = "state.pt"
RUN_FILE = "run.json"  # the model a run trains (``training.job.claim_run``) and its last export

METRICS_FILE = "metrics.jsonl"

CURVE_FILE = "learning_curve.png"


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

    def input_time(self) -> dict[str, float]:
        """Where the recorded steps' time went: the ``steps`` timed, their ``step_seconds`` in all,
        the ``data_seconds`` of it spent waiting for batches, and ``data_wait_share``, the one over
        the other (0 without steps)."""
        timed = [r for r in self.records if "step_seconds" in r]
        steps, data = sum(r["step_seconds"] for r in timed), sum(r["data_seconds"] for r in timed)
        share = data / steps if steps else 0.0
        return {"steps": len(timed), "step_seconds": steps, "data_seconds": data, "data_wait_share": share}

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

    def set_peak_lr(self, peak: float, eta_min: float) -> None:
        """Move the schedule to another peak learning rate where it stands (a run resumed on another
        number of workers with ``batch_per_worker``): the cosine's value is affine in its peak."""
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            if base != peak and base != eta_min:
                group["lr"] = eta_min + (group["lr"] - eta_min) * (peak - eta_min) / (base - eta_min)
        self.scheduler.base_lrs = [peak] * len(self.optimizer.param_groups)

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
        save_pretrained(model, tmp)
        files.upload_dir(tmp, location)


def _validate(model: PAN, pairs: list, device: torch.device) -> tuple[float, float]:
    from pipeline.config.builder import build_upscaler
    from pipeline.config.settings import InferenceSpec
    from pipeline.evaluation.scoring import evaluate

    spec = InferenceSpec(precision="fp32")
    upscaler = build_upscaler(spec, model.scale, files=None, model=model, device=str(device))
    report = evaluate(upscaler, "val", pairs)
    return report.psnr_y, report.ssim_y


def global_batch(job: TrainJob, world: int) -> int:
    """Patches per step over all ``world`` workers: ``batch_size`` (the paper's recipe keeps it
    whatever the workers), or ``batch_size`` per worker with ``batch_per_worker``."""
    return job.batch_size * world if job.batch_per_worker else job.batch_size


def peak_lr(job: TrainJob, world: int) -> float:
    """The learning rate at the top of each cosine period: ``lr``, times ``world`` with
    ``batch_per_worker`` (the linear scaling rule: the batch grows by that factor)."""
    return job.lr * world if job.batch_per_worker else job.lr


def batch_share(job: TrainJob, rank: int, world: int) -> tuple[int, float]:
    """Rank ``rank``'s patches per step and the weight of its mean loss. The global batch is split
    as evenly as it goes (the first ``global % world`` ranks take one more), and DDP averages the
    ranks' gradients: weighting each rank's mean by its share times ``world`` makes the step's
    gradient that of the global batch's mean, however it divides (32 over 3 workers: 11, 11, 10)."""
    total = global_batch(job, world)
    mine = total // world + (rank < total % world)
    return mine, mine * world / total


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker loop (also runs in-process with ScalingConfig(num_workers=0))."""
    import ray.train
    import ray.train.torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from pipeline.io.pairs import load_benchmark
    from pipeline.io.weights import load_pretrained
    from pipeline.ray_runtime.quiet import say
    from pipeline.training.inputs import as_model_input, training_batches

    job = TrainJob(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # A worker given a GPU that CUDA cannot see (a logical GPU, as the autoscaling tests give) trains
    # on the CPU, as a model actor there does with --device cpu.
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
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
    optimizer = torch.optim.Adam(model.parameters(), lr=peak_lr(job, world), betas=(0.9, 0.99))
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
        training.set_peak_lr(peak_lr(job, world), job.min_lr)  # the workers may differ since
    files = _RunFiles(job, training.step) if rank == 0 else None
    training.model = model = ray.train.torch.prepare_model(model, move_to_device=device)

    val_pairs = []
    if job.val_data and rank == 0:
        val_pairs = load_benchmark(job.val_data, job.scale, files=job.files)[1]
    scheduler, scaler = training.scheduler, training.scaler
    patches, weight = batch_share(job, rank, world)
    batches = training_batches(job, patches, rank=rank, world=world, device=device, step=training.step)
    with contextlib.closing(batches):
        loop_start = started = time.perf_counter()
        since_log = {"steps": 0, "data_seconds": 0.0}
        while training.step < job.max_steps:
            began = time.perf_counter()
            lr_batch, hr_batch = next(batches)
            data_seconds = time.perf_counter() - began  # what the step waited for its batch
            lr_batch, hr_batch = as_model_input(lr_batch, device), as_model_input(hr_batch, device)
            training.step = step = training.step + 1
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                loss = torch.nn.functional.l1_loss(model(lr_batch), hr_batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss * weight).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(_unwrap(model))
            loss_value = float(loss.detach())  # waits for the device: the step ends here
            record = {"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                      "seconds": time.perf_counter() - loop_start, "data_seconds": data_seconds,
                      "step_seconds": time.perf_counter() - began, "workers": world}  # fmt: skip
            since_log["steps"] += 1
            since_log["data_seconds"] += data_seconds
            if rank == 0 and step % job.log_every == 0:
                elapsed = time.perf_counter() - started
                rate = since_log["steps"] * global_batch(job, world) / elapsed
                loss_text = f"loss {record['loss']:.5f} lr {record['lr']:.2e}"
                waiting = f"{since_log['data_seconds'] / elapsed:.0%} waiting for data"
                say(f"step {step}/{job.max_steps} {loss_text} {rate:.1f} patches/s, {waiting}")
                started, since_log = time.perf_counter(), {"steps": 0, "data_seconds": 0.0}
            if step % job.val_every == 0 or step == job.max_steps:
                _checkpoint(job, training, record, rank=rank, val_pairs=val_pairs, files=files)
            elif files is not None:
                files.records.append(record)
    if rank == 0:
        _export(training.scored, join(job.run_dir, "export"), job.files)
        _record_export(job, training.step, files.input_time())


def _record_export(job: TrainJob, step: int, input_time: dict[str, float]) -> None:
    """``run.json`` says which step ``export/`` holds: a run asked again for no more steps has
    nothing to do, and the driver can tell so without starting Ray (``training.job``). It says too
    where rank 0's step time went (``_RunFiles.input_time``)."""
    location = join(job.run_dir, RUN_FILE)
    record = {**json.loads(job.files.read_bytes(location)), "exported_step": step, "input": input_time}
    job.files.write_bytes(location, (json.dumps(record, indent=2) + "\n").encode())


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
    shown: dict[str, float] = {"best_val_psnr_y": training.best}  # reported, not the step's record
    ckpt = None
    if rank == 0:
        # Uploaded by Ray in a background thread while the steps go on (ASYNC), which deletes the
        # folder once uploaded; the last uploads finish before the workers end.
        tmp = tempfile.mkdtemp(prefix="pan-checkpoint-")
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
        shown = {
            "best_val_psnr_y": training.best,
            "data_wait_share": files.input_time()["data_wait_share"],
        }
    mode = ray.train.CheckpointUploadMode.ASYNC
    ray.train.report({**metrics, **shown}, checkpoint=ckpt, checkpoint_upload_mode=mode)
