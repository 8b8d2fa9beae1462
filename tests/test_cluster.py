"""cluster/: what every node runs and where jobs run, checked without a cluster.

- KubeRay objects (cluster/kuberay/*.yaml) against the ray.io/v1 CRD schemas of KubeRay 1.7 in
  ``../shared/schemas``, strictly: the CRDs allow unknown fields (the API server prunes them silently),
  so each object schema with ``properties`` is closed here, as ``kubectl --validate=strict`` would.
- Core Kubernetes objects (Secrets, ...) and every object's metadata with kubernetes-validate, strict.
- cluster/aws.yaml against the cluster launcher schema that ships inside Ray.
- Consistency: one image everywhere, the Ray version of the image, the lock and this venv, secrets only
  through Secret references, GPUs only on workers, entrypoints that name valid job specs, the nightly
  RayCronJob's schedule equal to its spec's.
- What an SRE ships: every pod pulls with ``imagePullPolicy: Always`` and names the registry pull secret,
  Ray's object store fits the pod's ``/dev/shm`` and that fits the memory limit, every entrypoint runs
  ``python -m pipeline`` and the nightly RayCronJob sets its own buckets.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import torch
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "aws.yaml"
LOCK = REPO / "requirements.lock"
CRDS = Path("schemas") / "kuberay-v1.7.0"  # under ../shared
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
# The Kubernetes minor whose schemas kubernetes-validate checks core objects against (EKS/GKE have it).
K8S_VERSION = "1.33"
# Where the image (cluster/Dockerfile) and aws.yaml's file_mounts put this repository on every node.
REMOTE_REPO = "/home/ray/pan-pipeline"
# Environment variables that carry secrets: only ever from a Secret, never a literal `value:`.
SECRET_ENV = re.compile(
    r"^(AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)$|SECRET|PASSWORD"
)
# KubeRay 1.7's name limits (utils/constant.go): each object's derived names must stay valid.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
PAN_COMMAND = re.compile(r"\b(?:pan|python -m pipeline) (?:run|submit) ([\w./-]+\.ya?ml)\b")
# How every entrypoint starts: the module, not the `pan` script, which a venv's `ray start` leaves off PATH.
PYTHON_M_PIPELINE = ["python", "-m", "pipeline"]
# The docker-registry Secret every pod pulls the image with.
PULL_SECRET = "pan-registry"
# Ray's object store, unless rayStartParams give object-store-memory: this share of the memory it sees.
RAY_OBJECT_STORE_FRACTION = 0.3
GiB = 1024**3


# ---------------------------------------------------------------------------------------------- loading


def _kuberay_documents() -> list[tuple[str, dict]]:
    """(id, object) for every YAML document in cluster/kuberay/*.yaml, in file order."""
    found = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                found.append(
                    (f"{path.name}[{i}]:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}", doc)
                )
    return found


DOCUMENTS = _kuberay_documents()
RAY_OBJECTS = [(i, d) for i, d in DOCUMENTS if d["apiVersion"].startswith("ray.io/")]
CORE_OBJECTS = [(i, d) for i, d in DOCUMENTS if not d["apiVersion"].startswith("ray.io/")]


def _of_kind(kind: str) -> list[dict]:
    return [d for _, d in RAY_OBJECTS if d["kind"] == kind]


def _cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: standalone, inside a RayJob, inside a RayCronJob's job template."""
    specs = [(f"RayCluster/{d['metadata']['name']}", d["spec"]) for d in _of_kind("RayCluster")]
    specs += [(f"RayJob/{d['metadata']['name']}", d["spec"]["rayClusterSpec"]) for d in _of_kind("RayJob")]
    specs += [
        (f"RayCronJob/{d['metadata']['name']}", d["spec"]["jobTemplate"]["rayClusterSpec"])
        for d in _of_kind("RayCronJob")
    ]
    return specs


def _job_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec: standalone and as a RayCronJob's job template."""
    return [(f"RayJob/{d['metadata']['name']}", d["spec"]) for d in _of_kind("RayJob")] + [
        (f"RayCronJob/{d['metadata']['name']}", d["spec"]["jobTemplate"]) for d in _of_kind("RayCronJob")
    ]


def _containers(cluster_spec: dict) -> Iterator[tuple[str, dict]]:
    """("head" | worker group name, container) for every Ray container of a RayCluster spec."""
    for c in cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]:
        yield "head", c
    for group in cluster_spec.get("workerGroupSpecs", []):
        for c in group["template"]["spec"]["containers"]:
            yield group["groupName"], c


def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def _lock_pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def _to_repo_path(spec: str) -> Path:
    """A job spec path as a node sees it (/home/ray/pan-pipeline/...) or relative to the repo root."""
    if spec.startswith(REMOTE_REPO + "/"):
        return REPO / spec.removeprefix(REMOTE_REPO + "/")
    assert not spec.startswith("/"), f"{spec}: absolute, but not under {REMOTE_REPO}/ (the repo on a node)"
    return REPO / spec


def _entrypoint(entrypoint: str) -> tuple[Path, dict[str, str]]:
    """(job spec in the repo, --set KEY=VALUE settings) of `python -m pipeline run SPEC [--set K=V ...]`."""
    argv = shlex.split(entrypoint)
    assert argv[:4] == [*PYTHON_M_PIPELINE, "run"] and len(argv) >= 5, (
        f"entrypoint {entrypoint!r} is not `python -m pipeline run <job spec> [--set KEY=VALUE ...]`"
    )
    spec, rest = argv[4], argv[5:]
    assert re.fullmatch(r"\S+\.ya?ml", spec), f"{spec}: not a job spec"
    assert len(rest) % 2 == 0 and all(flag == "--set" for flag in rest[::2]), f"{entrypoint!r}: only --set"
    settings = dict(s.split("=", 1) for s in rest[1::2])
    assert len(settings) == len(rest) // 2, f"{entrypoint!r}: a setting given twice"
    return _to_repo_path(spec), settings


def _entrypoint_spec(entrypoint: str) -> Path:
    return _entrypoint(entrypoint)[0]


def _ray_node_groups() -> Iterator[tuple[str, str, dict, dict]]:
    """(where, "head" | "worker", rayStartParams, pod template) for every node group of every cluster."""
    for where, spec in _cluster_specs():
        head = spec["headGroupSpec"]
        yield f"{where} head", "head", head["rayStartParams"], head["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield (
                f"{where} {group['groupName']}",
                "worker",
                group.get("rayStartParams", {}),
                group["template"],
            )


def _pod_templates() -> list[tuple[str, dict]]:
    """(where, pod template) for every pod the manifests describe: Ray nodes and RayJob submitters."""
    pods = [(where, template) for where, _, _, template in _ray_node_groups()]
    pods += [
        (f"{w} submitter", j["submitterPodTemplate"]) for w, j in _job_specs() if "submitterPodTemplate" in j
    ]
    return pods


def _launcher_commands() -> list[str]:
    config = _launcher()
    keys = [k for k in config if k.endswith("_commands")]
    assert "setup_commands" in keys and "head_start_ray_commands" in keys, keys
    return [cmd for key in keys for cmd in config[key]]


_QUANTITY_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_QUANTITY_UNITS |= {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity (16Gi, 512Mi, 4G, 4294967296) in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(quantity))
    assert match, f"{quantity}: not a memory quantity this test reads"
    return int(float(match[1]) * _QUANTITY_UNITS[match[2] or ""])


def _documented_specs() -> list[str]:
    """Job specs (repo-relative) named by `pan run|submit <spec>` anywhere in cluster/, comments too."""
    return sorted(
        {
            str(_to_repo_path(m).relative_to(REPO))
            for path in sorted(CLUSTER.rglob("*"))
            if path.is_file() and path.suffix in {".yaml", ".yml", ".sh", ""}
            for m in PAN_COMMAND.findall(path.read_text())
        }
    )


# ------------------------------------------------------------------------------------ strict CRD schemas


def _closed(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema that rejects unknown fields and accepts int-or-string as declared."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_closed(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_validator(shared: Path, api_version: str, kind: str) -> jsonschema.protocols.Validator:
    group, version = api_version.split("/")
    for path in sorted((shared / CRDS).glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        if crd["spec"]["group"] != group or crd["spec"]["names"]["kind"] != kind:
            continue
        for v in crd["spec"]["versions"]:
            if v["name"] == version and v["served"]:
                return jsonschema.Draft202012Validator(_closed(v["schema"]["openAPIV3Schema"]))
        raise AssertionError(f"{path.name} serves no version {version} of {kind}")
    raise AssertionError(f"no CRD for {kind} in group {group} under {shared / CRDS}")


def _crd_errors(shared: Path, doc: dict) -> list[str]:
    validator = _crd_validator(shared, doc["apiVersion"], doc["kind"])
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]


def _literal_secrets(doc: Any, where: str = "$") -> list[str]:
    """Env entries that give a secret-bearing variable a literal value instead of a Secret reference."""
    found = []
    if isinstance(doc, dict):
        name = doc.get("name")
        is_env = isinstance(name, str) and ("value" in doc or "valueFrom" in doc)
        if is_env and SECRET_ENV.search(name) and "secretKeyRef" not in doc.get("valueFrom", {}):
            found.append(f"{where}: {name} must come from valueFrom.secretKeyRef (or envFrom a Secret)")
        for key, sub in doc.items():
            found += _literal_secrets(sub, f"{where}.{key}")
    elif isinstance(doc, list):
        for i, sub in enumerate(doc):
            found += _literal_secrets(sub, f"{where}[{i}]")
    return found


# ------------------------------------------------------------------------------------- schema validation


@pytest.mark.integration
@pytest.mark.parametrize("doc", [d for _, d in RAY_OBJECTS], ids=[i for i, _ in RAY_OBJECTS])
def test_kuberay_object_matches_its_crd_strictly(shared_dir: Path, doc: dict):
    assert doc["apiVersion"] == "ray.io/v1"
    assert _crd_errors(shared_dir, doc) == []


@pytest.mark.integration
def test_strict_crd_validation_rejects_an_unknown_field(shared_dir: Path):
    cluster = copy.deepcopy(_of_kind("RayCluster")[0])
    head = cluster["spec"]["headGroupSpec"]
    head["rayStartParam"] = head.pop("rayStartParams")  # the typo the API server would prune silently
    head["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"  # deep in the pod template
    errors = _crd_errors(shared_dir, cluster)
    assert any("'rayStartParam' was unexpected" in e for e in errors), errors
    assert any("'imagePullPolicyy' was unexpected" in e for e in errors), errors


@pytest.mark.integration
def test_crd_validation_checks_types_and_int_or_string(shared_dir: Path):
    cluster = copy.deepcopy(_of_kind("RayCluster")[0])
    limits = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]
    limits["nvidia.com/gpu"], limits["cpu"] = 2, "7"  # int-or-string: both forms are quantities
    assert _crd_errors(shared_dir, cluster) == []
    limits["memory"] = "lots"
    cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # rayStartParams are strings
    errors = _crd_errors(shared_dir, cluster)
    assert len(errors) == 3, errors


@pytest.mark.parametrize("doc", [d for _, d in CORE_OBJECTS], ids=[i for i, _ in CORE_OBJECTS])
def test_core_object_is_valid_kubernetes_strictly(doc: dict):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("doc", [d for _, d in DOCUMENTS], ids=[i for i, _ in DOCUMENTS])
def test_metadata_is_valid_object_meta(doc: dict):
    # The CRDs declare metadata as a bare object; the API server checks it as ObjectMeta, which any core
    # kind's schema carries: a ConfigMap that holds only this metadata validates exactly that.
    holder = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
    kubernetes_validate.validate(holder, K8S_VERSION, strict=True)
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), f"{name}: not a DNS-1035 label"
    assert len(name) <= MAX_NAME.get(doc["kind"], 63), f"{name}: longer than KubeRay allows for {doc['kind']}"


def test_strict_kubernetes_validation_rejects_an_unknown_field():
    secret = copy.deepcopy(next(d for _, d in CORE_OBJECTS if d["kind"] == "Secret"))
    secret["stringdata"] = secret.pop("stringData")
    with pytest.raises(kubernetes_validate.ValidationError, match="stringdata"):
        kubernetes_validate.validate(secret, K8S_VERSION, strict=True)


def test_launcher_config_matches_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _launcher()
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    # What `ray up` runs before it touches AWS: defaults merged in, then Ray's own checks (head node type
    # among the node types, min_workers within max_workers, docker settings).
    validate_config(prepare_config(copy.deepcopy(config)))
    config["available_node_types"]["gpu_a10g"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))


# -------------------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("doc", [d for _, d in DOCUMENTS], ids=[i for i, _ in DOCUMENTS])
def test_secrets_come_only_from_secret_references(doc: dict):
    assert _literal_secrets(doc) == []


def test_literal_secret_values_are_caught():
    cluster = copy.deepcopy(_of_kind("RayCluster")[0])
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head.setdefault("env", []).append({"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI/K7MDENG"})
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker.setdefault("env", []).append(
        {"name": "RAY_AUTH_TOKEN", "valueFrom": {"configMapKeyRef": {"key": "t"}}}
    )
    found = _literal_secrets(cluster)
    assert len(found) == 2, found
    assert "AWS_SECRET_ACCESS_KEY" in found[0] and "RAY_AUTH_TOKEN" in found[1]


def test_launcher_holds_no_secrets():
    # Commands and docker options are strings: a secret there would be `NAME=value`.
    text = yaml.safe_dump(_launcher())  # without the comments, which name the variables
    assert not re.search(
        r"(AWS_ACCESS_KEY_ID|AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|RAY_AUTH_TOKEN)\s*=", text
    )
    # A registry login (initialization_commands, for a private image) reads its password from stdin.
    for cmd in _launcher_commands():
        if "docker login" in cmd:
            assert "--password-stdin" in cmd and not re.search(r"\s(-p|--password)[\s=]", cmd), cmd


def test_referenced_secrets_are_defined_with_their_keys():
    secrets = {
        d["metadata"]["name"]: set(d.get("stringData", {})) | set(d.get("data", {}))
        for _, d in CORE_OBJECTS
        if d["kind"] == "Secret"
    }
    for where, spec in _cluster_specs():
        auth = spec.get("authOptions", {})
        # KubeRay requires the key `auth_token` in the Secret named by authOptions.secretName.
        assert "auth_token" in secrets.get(auth.get("secretName"), set()), f"{where}: {auth}"
        for group, c in _containers(spec):
            for source in c.get("envFrom", []):
                assert source["secretRef"]["name"] in secrets, f"{where} {group}: {source}"
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], set()), f"{where} {group}: {env}"


def test_every_ray_container_gets_the_s3_credentials_and_token_auth():
    for where, spec in _cluster_specs():
        # Token auth the way KubeRay 1.7 defines it: it injects RAY_AUTH_MODE=token and RAY_AUTH_TOKEN
        # (from the Secret) into every Ray container, the autoscaler and the job submitter.
        assert spec["authOptions"]["mode"] == "token", where
        for group, c in _containers(spec):
            has_s3 = any("secretRef" in s for s in c.get("envFrom", [])) or any(
                e.get("name") == "AWS_SECRET_ACCESS_KEY" for e in c.get("env", [])
            )
            assert has_s3, f"{where} {group}: no S3 credentials from a Secret"
            assert all(
                e.get("name") != "RAY_AUTH_MODE" or e.get("value") == "token" for e in c.get("env", [])
            )


# ------------------------------------------------------------------------------------- shape of clusters


def _gpus(container: dict, which: str) -> int:
    return int(container.get("resources", {}).get(which, {}).get("nvidia.com/gpu", 0))


def _cpus(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_head_is_cpu_only_and_workers_have_one_gpu_with_cpus_beside_it():
    for where, spec in _cluster_specs():
        assert spec["headGroupSpec"]["rayStartParams"].get("num-gpus") == "0", where
        assert spec["workerGroupSpecs"], f"{where}: no worker group"
        for group, c in _containers(spec):
            resources = c["resources"]
            # Ray sizes a node from its limits; requests equal to them keep the pod where it was placed.
            assert resources["requests"] == resources["limits"], f"{where} {group}"
            if group == "head":
                assert _gpus(c, "limits") == 0, where
                continue
            assert _gpus(c, "requests") == _gpus(c, "limits") == 1, f"{where} {group}: one GPU per worker"
            assert _cpus(resources["limits"]["cpu"]) >= 4, f"{where} {group}: CPUs to decode and encode"


def test_worker_group_sizes():
    for where, spec in _cluster_specs():
        for group in spec["workerGroupSpecs"]:
            low, high = group["minReplicas"], group["maxReplicas"]
            assert 0 <= low <= group.get("replicas", low) <= high, f"{where} {group['groupName']}"
    standing = _of_kind("RayCluster")
    assert standing and all(c["spec"]["enableInTreeAutoscaling"] for c in standing)
    assert all(g["minReplicas"] == 0 for c in standing for g in c["spec"]["workerGroupSpecs"])


def test_jobs_keep_the_driver_off_the_gpus_and_clean_up():
    assert _job_specs()
    for where, job in _job_specs():
        assert job.get("entrypointNumGpus", 0) == 0, where
        assert job.get("entrypointNumCpus", 0) >= 1, where
        assert job["shutdownAfterJobFinishes"] is True, where
        assert job["ttlSecondsAfterFinished"] >= 0, where


def test_training_job_has_a_gpu_worker_per_train_worker():
    for where, job in _job_specs():
        spec = yaml.safe_load(_entrypoint_spec(job["entrypoint"]).read_text()) or {}
        if "workers" in spec:
            gpus = sum(g["maxReplicas"] for g in job["rayClusterSpec"]["workerGroupSpecs"])
            assert gpus >= spec["workers"], f"{where}: {spec['workers']} train workers, {gpus} GPU workers"


def test_launcher_head_is_cpu_only_and_gpu_workers_autoscale():
    config = _launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    assert any("--num-gpus=0" in cmd for cmd in config["head_start_ray_commands"])
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers and all(
        t["resources"]["GPU"] >= 1 and t["resources"]["CPU"] >= 4 for t in workers.values()
    )
    assert all(t["min_workers"] == 0 for t in workers.values())
    assert sum(t["max_workers"] for t in workers.values()) <= config["max_workers"]
    assert config["file_mounts"][REMOTE_REPO] == "."
    assert any(f"-r {REMOTE_REPO}/requirements.lock" in cmd for cmd in config["setup_commands"])
    assert any(f"--no-deps {REMOTE_REPO}" in cmd for cmd in config["setup_commands"])
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert commands[0] == "ray stop"


# ------------------------------------------------------------------------- object store and /dev/shm


def _shm_problems(where: str, role: str, params: dict, template: dict) -> list[str]:
    """What is wrong with a Ray node's object store, /dev/shm and memory limit, if anything."""
    pod = template["spec"]
    container = pod["containers"][0]  # KubeRay's Ray container is the first
    limit = _bytes(container["resources"]["limits"]["memory"])
    mounts = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
    volumes = [v for v in pod.get("volumes", []) if v["name"] in mounts]
    # Without a mount of its own KubeRay adds one as large as the whole memory limit.
    if len(volumes) != 1:
        return [f"{where}: no /dev/shm volume of its own"]
    empty_dir = volumes[0].get("emptyDir", {})
    if empty_dir.get("medium") != "Memory" or "sizeLimit" not in empty_dir:
        return [f"{where}: /dev/shm is not a Memory emptyDir with a sizeLimit"]
    shm = _bytes(empty_dir["sizeLimit"])
    if "object-store-memory" in params:
        store_text = params["object-store-memory"]
        if not re.fullmatch(r"[1-9]\d*", store_text):
            return [f"{where}: object-store-memory {store_text!r}: `ray start` takes a number of bytes"]
        store = int(store_text)
    else:
        store = int(RAY_OBJECT_STORE_FRACTION * limit)
    problems = []
    if store > shm:
        problems.append(
            f"{where}: object store {store / GiB:.1f} GiB > /dev/shm {shm / GiB:.1f} GiB (Ray would fall back"
            " to disk)"
        )
    # /dev/shm is RAM charged to the container: what it may hold is not there for the processes.
    if limit - shm < limit / 2:
        problems.append(
            f"{where}: /dev/shm {shm / GiB:.1f} GiB leaves under half of the {limit / GiB:.0f} GiB limit"
        )
    # Beside the object store, torch DataLoader workers pass batches through /dev/shm.
    if role == "worker" and shm - store < 1 * GiB:
        problems.append(f"{where}: /dev/shm has under 1 GiB beside the object store for DataLoader workers")
    return problems


@pytest.mark.parametrize("group", list(_ray_node_groups()), ids=[g[0] for g in _ray_node_groups()])
def test_object_store_fits_dev_shm_which_fits_the_memory_limit(group: tuple):
    where, role, params, template = group
    assert "object-store-memory" in params, f"{where}: the object store size is left to Ray's default"
    assert _shm_problems(where, role, params, template) == []


def test_shm_check_catches_what_ray_would_do_by_default():
    spec = copy.deepcopy(_of_kind("RayCluster")[0]["spec"])
    head, worker = spec["headGroupSpec"], spec["workerGroupSpecs"][0]
    # 30% of a 16Gi head is 4.8 GiB: more than a 4Gi /dev/shm.
    del head["rayStartParams"]["object-store-memory"]
    for volume in head["template"]["spec"]["volumes"]:
        volume["emptyDir"]["sizeLimit"] = "4Gi"
    worker["rayStartParams"]["object-store-memory"] = "6Gi"
    problems = _shm_problems("head", "head", head["rayStartParams"], head["template"])
    problems += _shm_problems("gpu", "worker", worker["rayStartParams"], worker["template"])
    assert len(problems) == 2, problems
    assert "4.8 GiB > /dev/shm 4.0 GiB" in problems[0] and "takes a number of bytes" in problems[1]
    worker["rayStartParams"]["object-store-memory"] = str(15 * GiB + GiB // 2)  # 0.5 GiB beside it
    for volume in worker["template"]["spec"]["volumes"]:
        volume["emptyDir"]["sizeLimit"] = "16Gi"  # and 10Gi of 26Gi left to the processes
    problems = _shm_problems("gpu", "worker", worker["rayStartParams"], worker["template"])
    assert len(problems) == 2 and "under half" in problems[0] and "DataLoader" in problems[1], problems


# ---------------------------------------------------------------------------- image and pinned versions


def _all_images() -> dict[str, str]:
    images = {
        f"{where} {c['name']}": c["image"]
        for where, template in _pod_templates()
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", [])
    }
    images["cluster/aws.yaml docker.image"] = _launcher()["docker"]["image"]
    return images


def test_one_image_everywhere_tagged_with_the_project_version():
    images = _all_images()
    assert len(set(images.values())) == 1, images
    image = next(iter(images.values()))
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    # NAME:TAG, or NAME:TAG@sha256:DIGEST to pin one build (the digest decides, the tag documents).
    match = re.fullmatch(r"(?P<name>[^@]+):(?P<tag>[\w][\w.-]*)(?:@sha256:[0-9a-f]{64})?", image)
    assert match and "/" in match["name"], f"{image}: not REGISTRY/NAME:TAG[@sha256:DIGEST]"
    assert match["tag"] == version, f"{image}: tag is not the project version {version}"
    assert image == image.lower(), f"{image}: image references are lower case"


def _pull_policies(doc: Any, where: str = "$") -> Iterator[tuple[str, Any]]:
    """(path, value) of every imagePullPolicy anywhere in a document."""
    if isinstance(doc, dict):
        for key, sub in doc.items():
            if key == "imagePullPolicy":
                yield f"{where}.{key}", sub
            yield from _pull_policies(sub, f"{where}.{key}")
    elif isinstance(doc, list):
        for i, sub in enumerate(doc):
            yield from _pull_policies(sub, f"{where}[{i}]")


def test_every_image_is_pulled_always():
    # The tag (the project version) is pushed again for each build of that version: IfNotPresent would
    # keep a node's old build. Always costs a registry round trip per pod start; layers stay cached.
    policies = [(f"{i} {path}", value) for i, doc in RAY_OBJECTS for path, value in _pull_policies(doc)]
    assert policies and all(value == "Always" for _, value in policies), policies
    for where, template in _pod_templates():
        for c in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            assert c.get("imagePullPolicy") == "Always", f"{where} {c['name']}: pulls IfNotPresent by default"
    for where, spec in _cluster_specs():
        # KubeRay gives the autoscaler container the head's image, pulled IfNotPresent unless set here.
        if spec.get("enableInTreeAutoscaling"):
            assert spec["autoscalerOptions"].get("imagePullPolicy") == "Always", where
    assert _launcher()["docker"]["pull_before_run"] is True, "aws.yaml: the launcher's Always"


def test_job_submitters_pull_the_image_as_the_head_does():
    for where, job in _job_specs():
        if job.get("submissionMode", "K8sJobMode") != "K8sJobMode":
            continue
        # KubeRay 1.7's default submitter pod runs the head's image with neither its pull secret nor its
        # pull policy: the jobs bring their own pod template.
        assert "submitterPodTemplate" in job, f"{where}: KubeRay's default submitter pod"
        pod = job["submitterPodTemplate"]["spec"]
        assert pod["restartPolicy"] == "Never", f"{where}: a Job's pods restart Never or OnFailure"
        head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert pod["containers"][0]["image"] == head["image"], where
        assert "command" not in pod["containers"][0], f"{where}: KubeRay writes the submit command"


def test_every_pod_names_the_registry_pull_secret():
    secrets = {d["metadata"]["name"]: d for _, d in CORE_OBJECTS if d["kind"] == "Secret"}
    pull_secret = secrets.get(PULL_SECRET)
    assert pull_secret, f"secrets.example.yaml defines no {PULL_SECRET}"
    # The shape `kubectl create secret docker-registry` writes; the API server checks the JSON.
    assert pull_secret["type"] == "kubernetes.io/dockerconfigjson"
    assert set(pull_secret["stringData"]) == {".dockerconfigjson"}
    config = json.loads(pull_secret["stringData"][".dockerconfigjson"])
    image = next(iter(_all_images().values()))
    assert image.split("/", 1)[0] in config["auths"], f"{PULL_SECRET}: not for the image's registry"
    pods = _pod_templates()
    assert {w.rsplit(" ", 1)[1] for w, _ in pods} >= {"head", "gpu", "submitter"}
    for where, template in pods:
        assert template["spec"].get("imagePullSecrets") == [{"name": PULL_SECRET}], where


def test_image_ray_version_equals_lock_and_installed_ray():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert len(base) == 1, base
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-gpu", base[0])
    assert match, f"{base[0]}: not Ray's GPU image of one Ray version"
    assert match[1] == _lock_pins()["ray"] == ray.__version__
    for where, spec in _cluster_specs():
        assert spec["rayVersion"] == ray.__version__, where


def _dockerfile_instructions() -> list[str]:
    """cluster/Dockerfile's instructions, continuation lines joined, comments left out."""
    lines = [ln.strip() for ln in (CLUSTER / "Dockerfile").read_text().splitlines()]
    joined = "\n".join(ln for ln in lines if ln and not ln.startswith("#"))
    return [" ".join(i.split()) for i in re.sub(r"\\\n", " ", joined).splitlines()]


def test_dockerfile_installs_the_lock_then_the_package_as_the_ray_user():
    lines = _dockerfile_instructions()
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] == "ray", users
    assert f"WORKDIR {REMOTE_REPO}" in lines
    lock = next(i for i, ln in enumerate(lines) if "pip install --no-cache-dir -r requirements.lock" in ln)
    package = next(i for i, ln in enumerate(lines) if "pip install --no-cache-dir --no-deps ." in ln)
    assert lock < package


def test_dockerignore_keeps_local_state_out_and_the_build_inputs_in():
    patterns = [
        ln.strip().rstrip("/")
        for ln in (REPO / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert {".git", ".venv", "runs"} <= set(patterns)
    needed = [
        "pyproject.toml",
        "README.md",
        "requirements.lock",
        "pipeline/cli/__init__.py",
        "jobs/retrain-x2.yaml",
    ]
    for path in needed:
        prefixes = [str(Path(*Path(path).parts[: i + 1])) for i in range(len(Path(path).parts))]
        excluded = [p for p in patterns if any(fnmatch.fnmatch(x, p.removeprefix("**/")) for x in prefixes)]
        assert not excluded, f"{path} is needed in the image but .dockerignore excludes it: {excluded}"


def test_lock_pins_exact_versions_of_every_runtime_dependency():
    lines = [ln for ln in LOCK.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[A-Za-z0-9_.!]+", ln) for ln in lines), (
        "not all `name==version`"
    )
    pins = _lock_pins()
    assert "pan-pipeline" not in pins
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["ray"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but not in requirements.lock: bash cluster/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {req}"
    assert pins["torch"] == torch.__version__.split("+")[0]
    assert os.access(CLUSTER / "lock.sh", os.X_OK)


# -------------------------------------------------------------------------------------------- job specs


def test_cron_schedule_equals_the_job_specs_schedule():
    crons = _of_kind("RayCronJob")
    assert crons
    for cron in crons:
        spec_path = _entrypoint_spec(cron["spec"]["jobTemplate"]["entrypoint"])
        spec = yaml.safe_load(spec_path.read_text()) or {}
        assert "schedule" in spec, f"{spec_path.relative_to(REPO)} has no `schedule:`"
        assert cron["spec"]["schedule"] == spec["schedule"], spec_path.name
        assert len(cron["spec"]["schedule"].split()) == 5, "standard five-field cron"


def test_entrypoints_run_python_m_pipeline_on_a_job_spec_on_the_node():
    # `python -m pipeline run SPEC`, as `pan submit` generates it: a head whose Ray was started from a
    # venv has no `pan` on PATH.
    assert _job_specs()
    for where, job in _job_specs():
        argv = shlex.split(job["entrypoint"])
        assert argv[:4] == [*PYTHON_M_PIPELINE, "run"], where
        assert argv[4].startswith(f"{REMOTE_REPO}/jobs/"), where
        assert _entrypoint_spec(job["entrypoint"]).is_file(), where
    with pytest.raises(AssertionError, match="is not `python -m pipeline run"):
        _entrypoint(f"pan run {REMOTE_REPO}/jobs/nightly-upscale.yaml")


def test_launcher_and_image_run_the_package_as_a_module():
    # Nothing on a launcher node runs the `pan` script; anything that runs the package uses the module.
    for cmd in _launcher_commands():
        assert not re.search(r"(?:^|[;&|(]\s*)pan\s", cmd), f"aws.yaml runs `pan`: {cmd!r}"
        assert not re.search(r"(?<!python -m )\bpipeline (?:run|submit)\b", cmd), f"aws.yaml: {cmd!r}"
    runs = [i for i in _dockerfile_instructions() if i.startswith("RUN ")]
    assert any("python -m pipeline --help" in run for run in runs), runs


def test_nightly_cron_sets_its_own_buckets():
    # The spec in the image holds example buckets; the RayCronJob's entrypoint is where the real ones go.
    crons = _of_kind("RayCronJob")
    assert crons
    for cron in crons:
        spec_path, settings = _entrypoint(cron["spec"]["jobTemplate"]["entrypoint"])
        spec = yaml.safe_load(spec_path.read_text()) or {}
        for key in ("source", "dest"):
            assert key in settings, f"{cron['metadata']['name']}: no --set {key}=..."
            assert re.fullmatch(r"s3://[^/\s]+/\S*", settings[key]), settings[key]
            assert settings[key] != spec.get(key), f"{key}: the spec's example bucket"


@pytest.mark.parametrize("job", [j for _, j in _job_specs()], ids=[w for w, _ in _job_specs()])
def test_entrypoint_validates_with_its_settings(job: dict):
    spec_path, settings = _entrypoint(job["entrypoint"])
    argv = [sys.executable, "-m", "pipeline", "validate", str(spec_path)]
    argv += [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{job['entrypoint']}:\n{done.stdout}{done.stderr}"
    resolved = yaml.safe_load(done.stdout)
    for key, value in settings.items():
        assert resolved[key] == yaml.safe_load(value), key


@pytest.mark.parametrize("spec", _documented_specs())
def test_named_job_spec_validates(spec: str):
    path = REPO / spec
    assert path.is_file(), f"{spec}: no such job spec"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "validate", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"pan validate {spec}:\n{done.stdout}{done.stderr}"
