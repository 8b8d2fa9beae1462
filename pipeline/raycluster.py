"""Ray plumbing shared by the jobs (upscale, eval, train): joining a cluster, sizing actor pools,
choosing an actor's device, and finding the user's error inside a Ray failure."""

from __future__ import annotations

import os
import re
from typing import Any

from pipeline.errors import PipelineError


def connect(address: str | None, *, dashboard: bool = True) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start an embedded local Ray; no-op if connected.

    ``dashboard=False`` starts an embedded Ray without its dashboard: about 1 s less start-up and one
    process fewer competing for a small machine's cores, for batch jobs that report their own
    progress. Training keeps it (Ray Train's state API needs it).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Workers of an embedded Ray inherit this process's environment (AWS_* included).
    ray.init(address=address, **({} if address or dashboard else {"include_dashboard": False}))


def actor_pool(actors: int | None, actor_cpus: float) -> dict[str, Any]:
    """Map-batches actor settings: one GPU per actor where the cluster has GPUs, else CPU actors
    reserving ``actor_cpus`` each (fractional, so CPU tasks around them still get scheduled), one
    per CPU unless ``actors`` says how many."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return {"size": actors or gpus, "num_gpus": 1, "num_cpus": 1}
    return {"size": actors or max(1, int(resources.get("CPU", 1))), "num_gpus": 0, "num_cpus": actor_cpus}


def actor_device(requested: str) -> str:
    """The device an actor computes on: with ``auto``, the GPU it was given, if any.

    An actor that was given a GPU must use it: a GPU that CUDA cannot see is then an error (the
    engine's ``resolve_device`` says so), never a silent fall-back to the CPU.
    """
    import ray

    if requested != "auto":
        return requested
    return "cuda" if ray.get_gpu_ids() else "cpu"


def user_error(exc: BaseException) -> PipelineError | None:
    """The PipelineError (bad weights, unusable device...) that made a Ray task or actor fail.

    Ray passes some failures (an actor's constructor) only as text, so the text is read too.
    """
    from pipeline import errors

    chain, seen = exc, set()
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, PipelineError):
            return chain
        chain = chain.__cause__ or chain.__context__
    match = re.search(r"pipeline\.errors\.(\w+): (.+)", str(exc))
    error_class = getattr(errors, match.group(1), None) if match else None
    if isinstance(error_class, type) and issubclass(error_class, PipelineError):
        return error_class(match.group(2).strip())
    return None
