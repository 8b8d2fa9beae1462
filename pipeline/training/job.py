"""Training PAN on Ray Train: DDP over workers, checkpoints, resume, fault tolerance, export.

The recipe is the PAN paper's: L1 loss, Adam(0.9, 0.99), lr 7e-4 with cosine annealing and warm
restarts, batches of 64-px LR patches with the 8 flips/rotations, counted in iterations. AMP on GPU,
optional EMA of the weights. Validation every ``val_every`` steps on a benchmark set with the core
metrics; the best weights are tracked.

Layout under ``STORAGE/NAME`` (local or ``s3://``):
``checkpoint_*`` (Ray Train's: model, optimizer, scheduler, AMP loss scale, step, EMA, RNG, best score),
``metrics.jsonl`` (one object per step: step, loss, lr, seconds since this attempt's loop began,
``data_seconds`` (what rank 0's step waited for its batch), ``step_seconds`` (the whole step,
that wait included), ``workers``, and val_psnr_y/val_ssim_y on validation steps), ``learning_curve.png``,
``export/`` (final weights) and ``export-best/`` (best validation), both in the ``save_pretrained``
layout that ``pan upscale --weights`` takes, and ``run.json``: the model the run trains (scale and
PAN config), the step its export holds, and where the steps' time went (``input``: the share of
it spent waiting for data).

The data is a prepared set (``pan prepare``; each worker reads its own share of its shards) or
image sources (``pipeline.training.inputs``). The batch is ``batch_size`` patches over all workers
(``loop.batch_share``), or per worker with ``batch_per_worker``. With ``min_workers`` the run is
elastic (``scaling``): a lost worker restarts the group from the last checkpoint with the workers
that can be had.

Running again with the same storage and name resumes from the latest checkpoint: steps are never
done twice, and ``max_steps`` may be raised to train further. A resume that would train another
model (another scale, or ``init_weights`` of another shape) is refused before any worker starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from pipeline.config.settings import TrainJob
from pipeline.core.model import PANConfig
from pipeline.errors import PipelineError, SettingsError
from pipeline.io.storage import join
from pipeline.training.loop import METRICS_FILE, RUN_FILE, train_loop

log = logging.getLogger(__name__)


# -- the driver -----------------------------------------------------------------------------------


def model_config(job: TrainJob) -> PANConfig:
    """The PAN a run trains: the shape of ``init_weights`` (loading them checks them), else the
    paper's at ``job.scale``."""
    if job.init_weights:
        from pipeline.io.weights import load_pretrained

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


@dataclasses.dataclass(frozen=True)
class AlreadyTrained:
    """What ``run_training`` returns for a run whose export already holds ``max_steps`` or more:
    its last recorded metrics, as a Ray Train result gives them, and no error."""

    metrics: dict[str, Any]
    error: None = None


def _already_trained(job: TrainJob) -> AlreadyTrained | None:
    """The run's last metrics when its export holds at least ``job.max_steps`` steps, else None."""
    try:
        exported = json.loads(job.files.read_bytes(join(job.run_dir, RUN_FILE))).get("exported_step")
        lines = job.files.read_bytes(join(job.run_dir, METRICS_FILE)).decode().splitlines()
    except (FileNotFoundError, ValueError):
        return None
    if exported is None or exported < job.max_steps or not lines:
        return None
    return AlreadyTrained(json.loads(lines[-1]))


def _wait_for_gpu_workers(job: TrainJob) -> None:
    """``--gpu``: one GPU per worker (for the fewest workers of an elastic run), up now or added by
    the cluster's autoscaler (asked for and waited for, at most ``gpu_wait_seconds``); refused at
    once where they cannot come."""
    from pipeline.ray_runtime.capacity import capacity, wait_for_gpus

    needed = job.min_workers or job.workers
    cap = capacity()
    if cap.gpus >= needed:
        return
    reachable = cap.reachable_gpus
    if not cap.may_add_gpus or (reachable is not None and reachable < needed):
        raise PipelineError(
            f"--gpu with {needed} worker(s) needs {needed} GPU(s), but the Ray cluster has {cap.describe()}"
        )
    log.info("%d Ray Train worker(s), one GPU each (%s)", needed, cap.describe())
    wait_for_gpus(needed, 1, job.gpu_wait_seconds, say=log.info)


# How often an elastic run that runs short of workers checks whether more fit: a resize restarts
# the workers from the last checkpoint, so checking more often than checkpoints come buys nothing.
ELASTIC_RESIZE_SECONDS = 300.0


def scaling(job: TrainJob):
    """Ray Train's ``ScalingConfig``: ``workers`` workers, or elastic between ``min_workers`` and
    ``workers``: a worker group that lost a node restarts from the last checkpoint with the workers
    it can get (at least ``min_workers``), and is resized up when more fit, checked every
    ``ELASTIC_RESIZE_SECONDS``."""
    from ray.train import ScalingConfig

    if job.min_workers is None or job.min_workers == job.workers:
        return ScalingConfig(num_workers=job.workers, use_gpu=job.gpu)
    return ScalingConfig(
        num_workers=(job.min_workers, job.workers),
        use_gpu=job.gpu,
        elastic_resize_monitor_interval_s=ELASTIC_RESIZE_SECONDS,
    )


def _backend(job: TrainJob) -> str:
    """nccl between GPU workers where torch has it (every CUDA build), else gloo: a torch built
    without it (a CPU build, on GPUs CUDA cannot see) trains on the CPU."""
    import torch.distributed

    return "nccl" if job.gpu and torch.distributed.is_nccl_available() else "gloo"


def run_training(job: TrainJob):
    """Train (or resume) the run ``STORAGE/NAME`` on a Ray cluster; returns Ray Train's Result.

    Fails fast on the driver, before Ray starts: the data opens (a prepared set's manifest fits the
    run; image sources: names only, nothing decoded), the weights load, the storage takes a write,
    and a resume trains the same model.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.io.pairs import open_pairs
    from pipeline.ray_runtime import private
    from pipeline.ray_runtime.quiet import verbose
    from pipeline.ray_runtime.session import connect, user_error
    from pipeline.training.inputs import check_training_data

    check_training_data(job)
    if job.val_data:
        open_pairs(job.val_data, job.scale, files=job.files)
    config = model_config(job)
    job.files.check_writable(job.storage)
    claim_run(job, config)
    done = _already_trained(job)
    if done is not None:  # nothing to train: no Ray, no workers
        return done
    # Ray Train copies each print of a worker to the logs as well: every step would show twice.
    os.environ.setdefault(private.TRAIN_PRINT_PATCH.name, "0")
    if not (job.address or os.environ.get("RAY_ADDRESS")):  # an embedded Ray: no node is preempted
        os.environ.setdefault(private.TRAIN_PREEMPTION_WATCHER.name, "0")
    connect(job.address, ray_train=True)
    if job.gpu:
        _wait_for_gpu_workers(job)
    filesystem, storage_path = job.files.pyarrow_filesystem(job.storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=job.model_dump(),
        torch_config=TorchConfig(backend=_backend(job)),
        scaling_config=scaling(job),
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
        error = user_error(exc)
        if error is None:
            raise  # a bug: it keeps its whole chain
        raise error from None  # the user's error, as one line
