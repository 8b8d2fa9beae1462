"""What a job's cluster has and may grow to, and waiting for the GPUs its autoscaler brings.

A cluster that scales from zero rests with no GPU node: its autoscaler adds one when work waits for
a GPU, and takes it away once idle. So a job decides where its model actors go from what the
cluster may have, not only from what is up (``Capacity``): the GPUs up now; else, when an
autoscaler with node types of its own runs, the GPUs it may add (``max_gpus``: what Ray's cluster
config says; None where Ray does not say, as Ray 2.60's own autoscalers do not). The job then asks
for the GPUs it needs before it starts (``wait_for_gpus``: the autoscaler's ``request_resources``)
and waits for them, saying how it goes, for at most a time of its settings.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import ClusterError
from pipeline.ray_runtime import private

log = logging.getLogger(__name__)

# The node type an autoscaler without a config of its own reports for each node (``node_<id>``):
# `ray start --head` and an embedded Ray run one, and it can add nothing.
_SYNTHETIC_NODE_TYPE = re.compile(r"^node_[0-9a-f]+$")
POLL_S = 2.0
SAY_EVERY_S = 30.0


@dataclass(frozen=True)
class Capacity:
    """The cluster's GPUs and CPUs up now, whether an autoscaler may add nodes, and how many GPUs
    it may grow to where Ray says (``max_gpus``; None: it does not say)."""

    gpus: int
    cpus: float
    autoscaler: bool
    max_gpus: int | None = None

    @property
    def may_add_gpus(self) -> bool:
        return self.autoscaler and (self.max_gpus is None or self.max_gpus > self.gpus)

    @property
    def reachable_gpus(self) -> int | None:
        """The most GPUs the job can have: those up, or what the autoscaler may grow to (None:
        it does not say)."""
        if not self.autoscaler:
            return self.gpus
        return None if self.max_gpus is None else max(self.gpus, self.max_gpus)

    def describe(self) -> str:
        if not self.autoscaler:
            return f"{self.gpus} GPUs, {self.cpus:g} CPUs, no autoscaler"
        grows = f"up to {self.max_gpus} GPUs" if self.max_gpus is not None else "GPU nodes, as many as it may"
        return f"{self.gpus} GPUs up now; the autoscaler may add {grows}"


def capacity() -> Capacity:
    """The ``Capacity`` of the connected cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 1))
    maximum = _configured_maximum()
    if maximum is not None:
        return Capacity(gpus, cpus, autoscaler=True, max_gpus=int(maximum.get("GPU", 0)))
    return Capacity(gpus, cpus, autoscaler=_autoscaler_with_node_types())


def _configured_maximum() -> dict[str, int] | None:
    """The most of each resource the cluster may grow to, from the cluster config Ray keeps for
    its autoscaler (what Ray Data and Ray Train read); None where none is published."""
    try:
        return private.CLUSTER_CONFIG.get().get_max_resources_from_cluster_config() or None
    except Exception:  # a Ray without it, or a cluster that cannot answer: unknown
        return None


def _node_type_names() -> set[str]:
    """The node types the autoscaler reports: v2's cluster status, v1's debug status."""
    import ray

    names: set[str] = set()
    try:
        status = private.AUTOSCALER_STATUS.get()(ray.get_runtime_context().gcs_address)
        for node in [*status.active_nodes, *status.idle_nodes, *status.pending_nodes]:
            names.add(node.ray_node_type_name)
        names.update(launch.ray_node_type_name for launch in status.pending_launches)
    except Exception:
        pass
    report = _v1_report()
    names.update((report.get("node_type_mapping") or {}).values())
    names.update(report.get("pending_launches") or {})
    return {name for name in names if name}


def _v1_report() -> dict:
    try:
        raw = private.KV_GET.get()(private.V1_STATUS_KEY.name)
        return json.loads(raw or b"{}").get("autoscaler_report") or {}
    except Exception:
        return {}


def _autoscaler_with_node_types() -> bool:
    """Whether an autoscaler that may add nodes runs: a v2 autoscaler (started for a config, as
    KubeRay's is), or a v1 one that names node types of a config (``gpu``, ``headgroup``...), where
    one without a config names each node ``node_<id>``."""
    try:
        namespace = private.V2_FLAG_NAMESPACE.get()
        if private.KV_GET.get()(private.V2_FLAG_KEY.get(), namespace=namespace) == b"1":
            return True
    except Exception:
        pass
    return any(not _SYNTHETIC_NODE_TYPE.match(name) for name in _node_type_names())


def _starting() -> int:
    """Nodes the autoscaler is launching or that are starting, of any type but the head's."""
    import ray

    count = 0
    try:
        status = private.AUTOSCALER_STATUS.get()(ray.get_runtime_context().gcs_address)
        count += sum(launch.count for launch in status.pending_launches)
        count += sum(1 for node in status.pending_nodes if "head" not in node.ray_node_type_name)
    except Exception:
        pass
    report = _v1_report()
    count += sum((report.get("pending_launches") or {}).values()) + len(report.get("pending_nodes") or [])
    return count


def wait_for_gpus(
    needed: int,
    cpus_each: float,
    timeout_s: float,
    *,
    say: Callable[[str], None] = log.warning,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Ask the autoscaler for ``needed`` GPU bundles (a GPU and ``cpus_each`` CPUs each) and wait
    until that many GPUs are up, saying how it goes every ``SAY_EVERY_S``; the request is withdrawn
    when it is met or given up on (what then runs holds its own). ``ClusterError`` after
    ``timeout_s`` names what never came."""
    import ray
    from ray.autoscaler.sdk import request_resources

    bundle = {"GPU": 1, **({"CPU": cpus_each} if cpus_each else {})}
    request_resources(bundles=[bundle] * needed)
    start = said = clock()
    try:
        while True:
            up = int(ray.cluster_resources().get("GPU", 0))
            if up >= needed:
                if clock() > start + POLL_S:
                    say(f"{up} GPUs up after {clock() - start:.0f} s")
                return
            starting = _starting()
            waited = clock() - start
            line = f"waiting for {needed} GPUs: {up} of {needed} up, {starting} node(s) starting"
            if waited >= timeout_s:
                what = "no node was starting" if not starting else f"{starting} node(s) still starting"
                raise ClusterError(
                    f"{needed - up} of {needed} GPUs never came within {timeout_s:g} s ({what}): check the "
                    "cluster's GPU worker group (its max replicas, quota, node pool), or raise "
                    "--gpu-wait-seconds"
                )
            if clock() - said >= SAY_EVERY_S or said == start:
                say(line)
                said = clock()
            time.sleep(POLL_S)
    finally:
        request_resources(bundles=[])


def gpu_actors_reachable(cap: Capacity, per_gpu: int, unknown_cap: int) -> int:
    """How many model actors the job may place on GPUs: ``per_gpu`` per reachable GPU, or
    ``unknown_cap`` where the autoscaler does not say how far it may grow."""
    reachable = cap.reachable_gpus
    return unknown_cap if reachable is None else max(0, math.floor(reachable * per_gpu))
