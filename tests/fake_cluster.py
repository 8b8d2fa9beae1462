"""A local scale-from-zero "GPU" cluster with Ray's fake autoscaler, for tests.

A head with CPUs and no GPU; one worker node type ``gpu`` ({CPU: 1, GPU: 1}, logical GPU),
min 0 / max 2, a short idle timeout. Worker nodes are real raylets on this machine, started
by the ``fake_multinode`` node provider inside the head's autoscaler (monitor) process.

Not ``ray.cluster_utils.AutoscalingCluster``: its ``start()`` runs ``ray stop --force`` (kills
every Ray on the machine) and reads an example.yaml the wheel does not ship. Here the head is
``ray start --head --block`` on free ports, its own temp dir and its own auth token; it is
stopped by signalling that process, and whatever outlives it (live worker nodes started by the
fake provider) is found (head descendants, RAY_TMPDIR in the environment, temp dir in the
command line) and killed by pid. Never ``ray stop``.

Use: ``with start_autoscaling_cluster(...) as cluster:``, a FakeAutoscalingCluster:
``gcs_address``, ``driver_env`` (the whole environment for a driver subprocess: RAY_ADDRESS,
RAY_AUTH_MODE=token, RAY_AUTH_TOKEN), ``alive_gpu_nodes()``, ``wait_gpu_nodes(pred)``,
``autoscaler_status()`` (``ray status`` text), ``nodes()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

BIN = Path(sys.executable).parent
# The fake provider's head node id (ray.autoscaler._private.fake_multi_node.node_provider);
# `ray start --head` with RAY_FAKE_CLUSTER=1 already gives the head this node id.
FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
GPU_NODE_TYPE = "gpu"


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def cluster_config(
    gcs_address: str,
    *,
    v2: bool = True,
    head_cpus: int = 2,
    gpu_node_cpus: int = 1,
    max_gpu_nodes: int = 2,
    idle_timeout_s: float = 10,
    gpu_node_object_store: int = 150 * 1024**2,
) -> dict:
    """The autoscaling config (cluster-launcher schema) for the fake provider."""
    provider = {
        # = type "fake_multinode", but that type makes the autoscaler read the provider's
        # defaults from fake_multi_node/example.yaml, which the wheel does not ship (v2 monitor
        # crashes on it); an "external" provider takes its (minimal) defaults from code.
        "type": "external",
        "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
        # worker nodes join this GCS (default would be <node ip>:6379)
        "gcs_address": gcs_address,
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    }
    if v2:
        provider.update(launch_multiple=True, head_node_id=FAKE_HEAD_NODE_ID)
    return {
        "cluster_name": "fake_gpu",
        "max_workers": max_gpu_nodes,
        "provider": provider,
        "available_node_types": {
            "ray.head.default": {
                "resources": {"CPU": head_cpus, "GPU": 0},
                "node_config": {},
                "max_workers": 0,
            },
            GPU_NODE_TYPE: {
                "resources": {
                    "CPU": gpu_node_cpus,
                    "GPU": 1,
                    "object_store_memory": gpu_node_object_store,
                },
                "node_config": {},
                "min_workers": 0,
                "max_workers": max_gpu_nodes,
            },
        },
        "head_node_type": "ray.head.default",
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass
class FakeAutoscalingCluster:
    gcs_address: str  # "127.0.0.1:<port>"
    dashboard_url: str
    token: str
    temp_dir: str
    driver_env: dict  # full environment for a driver subprocess (ray.init(address=gcs_address))
    head: subprocess.Popen = field(repr=False)
    config: dict = field(repr=False)

    # -- cluster state through the dashboard's HTTP API (token in the header): no ray.init
    #    and no GcsClient in the calling process, so its own Ray/auth state is untouched.
    def _get(self, path: str, timeout: float = 10) -> dict:
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())

    def nodes(self) -> list[dict]:
        """Alive nodes: [{"node_id", "resources_total", "labels", ...}] (state API)."""
        data = self._get("/api/v0/nodes?limit=100&detail=1")
        return [n for n in data["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def alive_gpu_nodes(self) -> int:
        return sum(1 for n in self.nodes() if n.get("resources_total", {}).get("GPU", 0) > 0)

    def autoscaler_status(self) -> str:
        """`ray status` text (the dashboard's /api/cluster_status formatted)."""
        data = self._get("/api/cluster_status?format=1")
        return data["data"]["clusterStatus"]

    def wait_gpu_nodes(self, predicate, timeout: float = 120, poll: float = 0.5) -> float:
        """Wait until predicate(alive GPU node count) holds; seconds waited."""
        start = time.monotonic()
        while True:
            count = self.alive_gpu_nodes()
            if predicate(count):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"GPU nodes: {count} after {timeout}s\n{self.autoscaler_status()}")
            time.sleep(poll)

    def our_processes(self) -> list[psutil.Process]:
        """Every process of this cluster: the head's descendants, plus any process whose
        environment carries this cluster's RAY_TMPDIR (all of them inherit it from the head,
        fake worker nodes and their workers included, however reparented) or whose command
        line names the temp dir. (Workers rename themselves, ray::IDLE etc., so /proc cmdline
        alone misses them.)"""
        found = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            head = psutil.Process(self.head.pid)
            for p in [head, *head.children(recursive=True)]:
                found[p.pid] = p
        me = os.getpid()
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.pid == me:
                continue
            with contextlib.suppress(psutil.Error, TypeError):
                if self.temp_dir in " ".join(p.info["cmdline"] or []):
                    found[p.pid] = p
                    continue
                if p.environ().get("RAY_TMPDIR") == self.temp_dir:
                    found[p.pid] = p
        return list(found.values())


def _wait_http(url: str, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/gcs_healthz", timeout=2).read()
            return
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.5)


@contextlib.contextmanager
def start_autoscaling_cluster(
    *,
    v2: bool = True,
    autoscaler: bool = True,
    report_cluster_config: bool = False,
    keep_logs: str | None = None,
    head_env_overrides: dict | None = None,
    **config_kwargs,
):
    """Start the head (and with it the autoscaler); yield a FakeAutoscalingCluster; stop it.

    v2: autoscaler v2 (RAY_enable_autoscaler_v2=1) rather than the legacy v1 monitor.
    autoscaler=False: no --autoscaling-config (Ray still runs a monitor, read-only).
    report_cluster_config: publish the node groups to GCS (see publish_cluster_config).
    keep_logs: copy the temp dir (head.log, session logs of all nodes) there at the end.
    head_env_overrides: extra env for `ray start` (a value of None removes the variable).
    config_kwargs: see cluster_config (head_cpus, gpu_node_cpus, max_gpu_nodes, idle_timeout_s).
    """
    temp = tempfile.mkdtemp(prefix="fa", dir="/tmp")  # short: unix socket paths < 108 bytes
    gcs, dashboard, *others = _free_ports(7)
    gcs_address = f"127.0.0.1:{gcs}"
    token = secrets.token_hex(32)
    config = cluster_config(gcs_address, v2=v2, **config_kwargs)
    config_path = Path(temp) / "autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head_cpus = config["available_node_types"]["ray.head.default"]["resources"]["CPU"]

    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_enable_autoscaler", "RAY_FAKE"))
        and k not in ("RAY_CLOUD_INSTANCE_ID", "RAY_OVERRIDE_NODE_ID_FOR_TESTING", "RAY_NODE_TYPE_NAME")
    }
    base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    head_env = dict(base)
    head_env.update(
        PATH=f"{BIN}{os.pathsep}{base.get('PATH', '')}",
        AUTOSCALER_UPDATE_INTERVAL_S="1",  # v1 monitor loop period (default 5 s)
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
        RAY_TMPDIR=temp,
    )
    if autoscaler:
        head_env["RAY_FAKE_CLUSTER"] = "1"  # required by FakeMultiNodeProvider; fixes the head node id
    if v2:
        head_env.update(
            RAY_enable_autoscaler_v2="1",
        )
    if v2 and autoscaler:  # the v2 instance manager matches the head by this cloud instance id
        head_env.update(
            RAY_CLOUD_INSTANCE_ID=FAKE_HEAD_NODE_ID,
            RAY_OVERRIDE_NODE_ID_FOR_TESTING=FAKE_HEAD_NODE_ID,
        )
    for k, v in (head_env_overrides or {}).items():
        if v is None:
            head_env.pop(k, None)
        else:
            head_env[k] = v
    ports = dict(
        zip(
            [
                "--dashboard-agent-listen-port",
                "--metrics-export-port",
                "--runtime-env-agent-port",
                "--ray-client-server-port",
                "--dashboard-agent-grpc-port",
            ],
            others,
            strict=True,
        )
    )
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={gcs}",
        *([f"--autoscaling-config={config_path}"] if autoscaler else []),
        f"--num-cpus={head_cpus}",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--temp-dir={temp}",
        "--disable-usage-stats",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    log_path = Path(temp) / "head.log"
    log = open(log_path, "wb")  # noqa: SIM115
    head = subprocess.Popen(
        command, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dashboard}"
    cluster = FakeAutoscalingCluster(
        gcs_address=gcs_address,
        dashboard_url=url,
        token=token,
        temp_dir=temp,
        driver_env={**base, "RAY_ADDRESS": gcs_address},
        head=head,
        config=config,
    )
    try:
        _wait_http(url, head, log_path)
        if report_cluster_config:
            publish_cluster_config(cluster)
        yield cluster
    finally:
        t = time.monotonic()
        killed = stop_cluster(cluster)
        log.close()
        print(
            f"[fake cluster] stopped in {time.monotonic() - t:.1f}s; killed by pid: {killed}", file=sys.stderr
        )
        if keep_logs:  # copy head.log and the session logs (all nodes write there) first
            shutil.rmtree(keep_logs, ignore_errors=True)
            shutil.copytree(
                temp, keep_logs, ignore=shutil.ignore_patterns("sockets", "*.sock"), symlinks=True
            )
        shutil.rmtree(temp, ignore_errors=True)


_REPORT = r"""
import json, sys
from ray._raylet import GcsClient
from ray.core.generated import autoscaler_pb2
cfg = json.loads(sys.argv[1])
cc = autoscaler_pb2.ClusterConfig()
for name, t in cfg["available_node_types"].items():
    if name == cfg["head_node_type"]:
        continue
    g = cc.node_group_configs.add(name=name, min_count=t.get("min_workers", 0), max_count=t["max_workers"])
    for k, v in t["resources"].items():
        g.resources[k] = int(v)
GcsClient(address=sys.argv[2]).report_cluster_config(cc.SerializeToString())
"""


def publish_cluster_config(cluster: FakeAutoscalingCluster) -> None:
    """Write the node groups into GCS as a ``ClusterConfig`` (what newer Ray's v2 autoscaler does
    itself, ray-project/ray PR #63012; Ray 2.60's does not). Then
    ``ray._private.state.state.get_cluster_config()`` / ``get_max_resources_from_cluster_config()``
    answer, and Ray Data (``is_autoscaling_enabled``) and Ray Train (its max-resources check) see
    the node types. Done in a subprocess with the cluster's token, so this process keeps no GCS
    client or token state."""
    subprocess.run(
        [sys.executable, "-c", _REPORT, json.dumps(cluster.config), cluster.gcs_address],
        env=cluster.driver_env,
        check=True,
        capture_output=True,
        timeout=60,
    )


def stop_cluster(cluster: FakeAutoscalingCluster, timeout: float = 60) -> list[str]:
    """Stop the head (SIGTERM to `ray start --block`), then kill by pid whatever of this
    cluster outlived it; returns the names of the processes that had to be killed."""
    procs = cluster.our_processes()  # before the head goes: afterwards orphans are reparented
    if cluster.head.poll() is None:
        cluster.head.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            cluster.head.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(cluster.head.pid, signal.SIGKILL)
            cluster.head.wait()
    procs += cluster.our_processes()
    # fake worker nodes are started by the autoscaler (monitor) with shutdown_at_exit=False:
    # they outlive it and would only exit once they give up on the dead GCS (~60 s)
    _, alive = psutil.wait_procs(procs, timeout=3)
    killed = []
    for p in alive:  # fake worker nodes' raylets & co.: by pid, never by name
        with contextlib.suppress(psutil.NoSuchProcess):
            killed.append(p.name())
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    left = [p for p in cluster.our_processes() if p.is_running()]
    if left:
        raise RuntimeError(f"processes left behind: {[(p.pid, p.name()) for p in left]}")
    return killed
