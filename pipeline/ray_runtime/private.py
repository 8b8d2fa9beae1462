"""Ray's private names that pan relies on, in one place, each checked on ``CHECKED_ON``.

The project allows ``ray>=2.50,<3``, and Ray renames its internals between releases. Every name
below is something Ray does not promise to keep: a logger named after a module, an attribute of a
``_private`` module, an environment variable Ray reads but does not document. Code elsewhere in
``ray_runtime`` refers to these constants, never to the strings; ``missing()`` lists those the
installed Ray lacks, and ``tests/test_ray_runtime.py`` fails on any.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

CHECKED_ON = "2.60.0"


@dataclass(frozen=True)
class Logger:
    """A logger Ray names after its module (``logging.getLogger(__name__)``)."""

    name: str

    def exists(self) -> bool:
        return importlib.util.find_spec(self.name) is not None


@dataclass(frozen=True)
class FileLogger:
    """A logger Ray names after a source file's path (relative to the ``ray`` package here)."""

    relative_path: str

    @property
    def name(self) -> str:
        import ray

        return os.path.join(os.path.dirname(ray.__file__), *self.relative_path.split("/"))

    def exists(self) -> bool:
        return os.path.isfile(self.name)


@dataclass(frozen=True)
class Attribute:
    """``module.attribute``, where the module is one of Ray's."""

    module: str
    attribute: str

    def get(self):
        return getattr(importlib.import_module(self.module), self.attribute)

    def exists(self) -> bool:
        try:
            self.get()
        except (ImportError, AttributeError):
            return False
        return True


@dataclass(frozen=True)
class Mention:
    """A name Ray's code spells out (an environment variable it reads, a handler it registers): it
    exists while some module of Ray under ``where`` (a folder of the package) still spells it."""

    name: str
    where: str

    def exists(self) -> bool:
        import ray

        root = os.path.join(os.path.dirname(ray.__file__), *self.where.split("/"))
        for folder, _, files in os.walk(root):
            for file in files:
                if file.endswith(".py"):
                    with open(os.path.join(folder, file), encoding="utf-8", errors="replace") as text:
                        if self.name in text.read():
                            return True
        return False


# -- the client side of a command: notices nobody asked for ---------------------------------------
TOKEN_NOTICE = Logger("ray._private.authentication.authentication_token_setup")  # "token auth is on"
PACKAGE_UPLOAD = Logger("ray._private.runtime_env.packaging")
DASHBOARD_SDK = Logger("ray.dashboard.modules.dashboard_sdk")  # "Uploading package ..."
JOB_SDK = Logger("ray.dashboard.modules.job.sdk")  # "WebSocket closed for job ..."

# -- worker output on the driver: Ray's dispatcher and the handler that prints with prefixes ----
WORKER_OUTPUT = Attribute("ray._private.ray_logging", "global_worker_stdstream_dispatcher")
RAY_PRINT_LOGS_HANDLER = Mention("ray_print_logs", "_private")  # the handler printing with prefixes

# -- Ray Train's workers and controller, per step or second -----------------------------------------
PLACEMENT_GROUP_CLEANER = Logger("ray.train.v2._internal.execution.controller.placement_group_cleaner")
TRAIN_CONTEXT = FileLogger("train/v2/_internal/execution/context.py")  # "Reporting training result"
TRAIN_PRINT_PATCH = Mention("RAY_TRAIN_ENABLE_PRINT_PATCH", "train")  # each print twice
TRAIN_PREEMPTION_WATCHER = Mention("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "train")

# -- the autoscaler: what a cluster may grow to, what is starting -------------------------------------
# The cluster config's most resources, as Ray Data and Ray Train read it
# (.get_max_resources_from_cluster_config()); published by newer autoscalers, not Ray 2.60's.
CLUSTER_CONFIG = Attribute("ray._private.state", "state")
AUTOSCALER_STATUS = Attribute("ray.autoscaler.v2.sdk", "get_cluster_status")  # nodes by type, launches
KV_GET = Attribute("ray.experimental.internal_kv", "_internal_kv_get")
V2_FLAG_KEY = Attribute("ray._raylet", "GCS_AUTOSCALER_V2_ENABLED_KEY")  # b"1" while a v2 autoscaler runs
V2_FLAG_NAMESPACE = Attribute("ray._raylet", "GCS_AUTOSCALER_STATE_NAMESPACE")
V1_STATUS_KEY = Mention("__autoscaling_status", "_private")  # the v1 monitor's report, as JSON

ALL = (
    TOKEN_NOTICE,
    PACKAGE_UPLOAD,
    DASHBOARD_SDK,
    JOB_SDK,
    WORKER_OUTPUT,
    RAY_PRINT_LOGS_HANDLER,
    PLACEMENT_GROUP_CLEANER,
    TRAIN_CONTEXT,
    TRAIN_PRINT_PATCH,
    TRAIN_PREEMPTION_WATCHER,
    CLUSTER_CONFIG,
    AUTOSCALER_STATUS,
    KV_GET,
    V2_FLAG_KEY,
    V2_FLAG_NAMESPACE,
    V1_STATUS_KEY,
)


def missing() -> list[str]:
    """The names above that the installed Ray does not have (empty on ``CHECKED_ON``)."""
    gone = [repr(name) for name in ALL if not name.exists()]
    dispatcher = WORKER_OUTPUT.get() if WORKER_OUTPUT.exists() else None
    if dispatcher is not None and not all(hasattr(dispatcher, m) for m in ("add_handler", "remove_handler")):
        gone.append(f"{WORKER_OUTPUT!r}: add_handler / remove_handler")
    return gone
