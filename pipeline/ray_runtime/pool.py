"""The model actors of a job: how many, on what, with which engine; the Ray Data stage that runs
them and the iteration over its results."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pipeline.errors import DeviceError
from pipeline.ray_runtime.capacity import Capacity, capacity, wait_for_gpus
from pipeline.ray_runtime.quiet import verbose
from pipeline.ray_runtime.session import joined, user_error


@contextmanager
def dataset_batches(dataset: Any) -> Iterator[Iterator[dict[str, Any]]]:
    """``with dataset_batches(ds) as batches: for batch in batches: ...`` (numpy batches as they
    come). A task or actor that failed because of the user raises that ``PipelineError``; and
    however the block ends (Ctrl-C and SIGTERM included), Ray Data's executor is shut down then,
    not when the iterator is garbage-collected after Ray has gone, which would start a new Ray
    (with its dashboard) while the command exits."""
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        yield batches
    except Exception as exc:
        error = user_error(exc)
        if error is None:
            raise  # a bug: it keeps its whole chain
        raise error from None  # the user's error, as one line
    finally:
        batches.close()


def data_context() -> None:
    """Ray Data on the driver, for our jobs: no progress bars of its own (the commands show one),
    no warning for the Python objects (decoded images) that blocks carry pickled (intended), and
    no memory sampling in every task (a thread started and stopped around each task for Ray Data's
    stats, which nothing of ours reads: 2% of a task worker's CPU, benchmarks/README.md)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_fallback_to_arrow_object_ext_type = True
    context.memory_usage_poll_interval_s = None
    if not verbose():
        # Ray Data logs through a console handler of its own; its ERROR lines repeat the failure
        # that the command reports itself (one line for a user's error, the traceback for a bug).
        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":
                handler.setLevel(logging.CRITICAL)


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActorPool:
    """How a job's model actors run (``actor_pool``): ``size`` actors, each reserving ``num_gpus``
    and ``num_cpus``, taking ``calls`` Ray Data calls at once, and computing with ``threads``
    torch threads when it runs on the CPU (its share of the node's cores)."""

    size: int
    num_gpus: float
    num_cpus: float
    calls: int
    threads: int
    min_size: int | None = None  # where the pool grows as GPU nodes come: the actors it starts with

    @property
    def least(self) -> int:
        return self.size if self.min_size is None else self.min_size

    def describe(self) -> str:
        where = f"{self.num_gpus:g} GPU each" if self.num_gpus else f"{self.threads} CPU thread(s) each"
        count = f"{self.least} to {self.size}" if self.least != self.size else f"{self.size}"
        return f"{count} model actor(s), {where}"


# GPU actors a pool may grow to where the autoscaler does not say how many GPUs it may add (the
# GPU worker group of cluster/ grows to 8); ``--actors`` sets another number.
UNKNOWN_GROWTH_ACTORS = 8


def actor_pool(actors: int | None, actor_cpus: float, inputs: int, cap: Capacity | None = None) -> ActorPool:
    """The model actors for ``inputs`` inputs on a cluster of capacity ``cap`` (default: the
    connected one's): one per GPU where the cluster has GPUs or its autoscaler may add them
    (``actors`` beyond the GPUs share them, 1/k of a GPU each, k actors per GPU), else CPU actors
    reserving ``actor_cpus`` each (fractional, so CPU tasks around them still get scheduled), one
    per CPU unless ``actors`` says how many; never more actors than inputs. A pool on GPUs the
    autoscaler adds starts with the actors the GPUs up now hold (``min_size``, at least one) and
    grows to ``size`` as nodes come (Ray Data's autoscaling actor pool).

    ``calls``: Ray Data calls an actor takes at once. A GPU actor takes 2: while its model runs one
    batch (one at a time still), Ray fetches and formats the next one in the actor's other thread,
    so the GPU does not wait for it. A CPU actor takes 1: its one core is busy computing.

    ``threads``: on the CPU, one single-threaded actor per core beats fewer multi-threaded ones:
    PAN scales linearly over processes, while OpenMP threads stall at every barrier when a decode
    or encode task takes their core (measured on 2 cores: 1.35 vs 1.02 output MP/s,
    benchmarks/README.md). Fewer actors than cores (``actors``, or few inputs) share the cores."""
    cap = cap or capacity()
    cpus = cap.cpus
    if cap.gpus or cap.may_add_gpus:
        reachable = cap.reachable_gpus  # None: the autoscaler does not say
        size = max(1, min(actors or reachable or UNKNOWN_GROWTH_ACTORS, inputs))
        share = 1 / math.ceil(size / reachable) if reachable else 1.0  # 1/k: k actors fit each GPU
        least = max(1, min(size, math.floor(cap.gpus / share))) if cap.may_add_gpus else None
        threads = max(1, int(cpus // size))
        return ActorPool(size, share, _leave_cpus_to_tasks(1, size, cpus), 2, threads, min_size=least)
    size = max(1, min(actors or int(cpus), inputs))
    threads = max(1, int(cpus // size))
    return ActorPool(size, 0, _leave_cpus_to_tasks(actor_cpus, size, cpus), calls=1, threads=threads)


def place_model_actors(
    device: str, actors: int | None, actor_cpus: float, inputs: int, gpu_wait_s: float
) -> ActorPool:
    """The model actors of a job (``actor_pool``), decided from its ``device`` setting and the
    cluster's ``capacity``, and said (logged) on a cluster the command joined or one with GPUs. On
    GPUs the autoscaler adds, the first is asked for and waited for (``wait_for_gpus``, at most
    ``gpu_wait_s``) before the job starts. A CUDA device on a cluster that has no GPU and no
    autoscaler that may add one is refused at once."""
    cap = capacity()
    if device.startswith("cuda") and not (cap.gpus or cap.may_add_gpus):
        raise DeviceError(f"--device {device} asked for, but the Ray cluster has {cap.describe()}")
    pool = actor_pool(actors, actor_cpus, inputs, cap)
    if joined() or cap.gpus or cap.autoscaler:  # a command's own local Ray has nothing to decide
        log.info("%s (%s)", pool.describe(), cap.describe())
    if pool.num_gpus and not cap.gpus:
        wait_for_gpus(1, pool.num_cpus, gpu_wait_s, say=log.info)
        pool = actor_pool(actors, actor_cpus, inputs)
    return pool


def model_stage(dataset: Any, actor: type, pool: ActorPool, *, batch_size: int, **constructor: Any) -> Any:
    """``dataset`` mapped through ``pool``'s actors of class ``actor``, ``batch_size`` rows per
    call, each actor made with ``constructor`` plus its ``threads``."""
    import ray.data

    return dataset.map_batches(
        actor,
        fn_constructor_kwargs={**constructor, "threads": pool.threads},
        compute=ray.data.ActorPoolStrategy(
            min_size=pool.least, max_size=pool.size, max_concurrent_calls_per_actor=pool.calls
        ),
        num_gpus=pool.num_gpus,
        num_cpus=pool.num_cpus,
        batch_size=batch_size,
        udf_modifying_row_count=False,
    )


CPUS_LEFT_TO_TASKS = 2  # a read task and an encode task side by side (they reserve one CPU each)


def _leave_cpus_to_tasks(wanted: float, size: int, cpus: float) -> float:
    """The CPUs each of ``size`` actors may reserve, at most ``wanted``, so that
    ``CPUS_LEFT_TO_TASKS`` stay free for the tasks around them (as many as the cluster has).
    Reserving less only lets processes share cores, which they do anyway.

    Why two: Ray Data runs read tasks ahead, and with one CPU left the reads hold it while the
    first outputs wait to be encoded; with a read and an encode side by side the first output
    comes sooner (22 s instead of 38 s on 2 cores, benchmarks/README.md), at the same throughput.
    Why any: actors that took every CPU (a 1-CPU machine, or a 2-CPU one with a GPU) would leave
    no task able to start, and the run would hang."""
    return max(0.0, min(wanted, (cpus - CPUS_LEFT_TO_TASKS) / size))


def actor_device(requested: str) -> str:
    """The device an actor computes on: with ``auto``, the GPU it was given, if any.

    An actor that was given a GPU must use it: a GPU that CUDA cannot see is then an error (the
    engine's ``resolve_device`` says so), never a silent fall-back to the CPU.
    """
    import ray

    from pipeline.config.settings import AUTO

    if requested != AUTO:
        return requested
    return "cuda" if ray.get_gpu_ids() else "cpu"


def actor_gpu_share() -> float:
    """The share of its GPU this actor holds (``actor_pool``: 1/k with k actors per GPU); 1.0
    with a whole GPU or none. The engine scales its GPU memory budget by it."""
    import ray

    if not ray.is_initialized():  # asking the runtime context would start Ray
        return 1.0
    try:
        share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    except AssertionError:  # Ray's answer in a driver: only workers are assigned resources
        return 1.0
    return share if 0 < share < 1 else 1.0


def actor_upscaler(spec: Any, scale: int, threads: int, files: Any) -> Any:
    """A model actor's engine (``build_upscaler``) for the ``InferenceSpec`` ``spec`` at ``scale``,
    its weights read through ``files`` (the job's ``storage.Files``): on the device the actor was
    given (``actor_device``), computing with ``threads`` torch threads on the CPU
    (``ActorPool.threads``), with its share of the GPU's memory (``actor_gpu_share``). Actors on
    one kind of device make the same ``precision=auto`` choice (``engine.auto_precision``)."""
    import torch

    from pipeline.config.builder import build_upscaler

    device = actor_device(spec.device)
    if device == "cpu":
        # Ray sets OMP_NUM_THREADS to the (fractional, so 1) CPUs an actor reserves; the model is
        # the bottleneck, so let it use its share of the node's cores (1.9x on 2: benchmarks/README.md).
        torch.set_num_threads(threads)
    return build_upscaler(spec, scale, device=device, files=files, memory_share=actor_gpu_share())
