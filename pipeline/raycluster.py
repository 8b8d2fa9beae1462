"""Ray plumbing shared by the jobs (upscale, eval, train): joining a cluster or starting an
embedded one that is quiet and leaves nothing behind, sizing actor pools, choosing an actor's
device, and finding the user's error inside a Ray failure.

An embedded Ray (no address given) is the command's own: it starts without the dashboard, says
only what matters (Ray's own INFO lines, warnings and its one benign C++ error line are hidden
unless ``quiet_ray(verbose=True)``), is shut down when the command ends (normally, on an error,
on Ctrl-C or SIGTERM), and, should the command be killed outright, a watchdog process ends every
process it had started within a few seconds (Linux; without it two Ray agents, about 200 MB,
outlived a SIGKILLed driver by a minute or more).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ClusterError, PipelineError

_state = {"verbose": False, "watchdog": None, "stderr_filter": False}


class Terminated(KeyboardInterrupt):
    """SIGTERM, taken the way Ctrl-C is: the command unwinds and shuts its Ray down."""


def quiet_ray(*, verbose: bool) -> None:
    """How much of Ray's own output the command shows: everything with ``verbose``, else errors.

    Call it before Ray starts. Besides log levels (applied by ``connect``), this hides the token
    authentication notice of a new local cluster (authentication stays on), the job client's
    package uploads and its log-stream notices (``quiet_loggers``), Ray Data's warnings about its
    own sizing, and, where stderr is this process's own file descriptor 2 (a console, not a
    capture), filters Ray's C++ output to it.
    """
    _state["verbose"] = verbose
    quiet_loggers()
    if not verbose:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data(\.|$)")
        _filter_native_stderr()


# Loggers of Ray's client side that say what a user did not ask for: the token notice of a new
# local cluster, "Uploading package ...", "WebSocket closed for job ...". Ray's modules set their
# own level when imported, so this is applied again after each import (``quiet_loggers``).
_CLIENT_LOGGERS = (
    "ray._private.authentication.authentication_token_setup",
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)


def quiet_loggers() -> None:
    """Set Ray's client-side loggers to ERROR (INFO with ``verbose``). Call it after importing the
    Ray modules that own them: they set INFO on themselves at import."""
    level = logging.INFO if _state["verbose"] else logging.ERROR
    for name in _CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(level)


USER_LINE = "[pan] "  # a worker's line meant for the user (``say``); the driver shows those only


def say(text: str) -> None:
    """Print ``text`` from a Ray worker for the user to read on the driver: shown as it is (no
    ``(RayTrainWorker pid=...)`` prefix, no colour codes), while the rest of the workers' output
    stays hidden unless ``--verbose`` (``connect``)."""
    print(f"{USER_LINE}{text}", flush=True)


def _show_user_lines(data: dict[str, Any]) -> None:
    """Ray's stream of worker output on the driver, reduced to the ``say`` lines."""
    stream = sys.stderr if data.get("is_err") else sys.stdout
    for line in data.get("lines", ()):
        if line.startswith(USER_LINE):
            print(line[len(USER_LINE) :], file=stream, flush=True)


# Ray's dispatcher of worker output on the driver, and the name of the handler that prints it with
# prefixes and colours (ray/_private/worker.py, ray/_private/ray_logging/__init__.py; Ray 2.60).
_RAY_PRINT_LOGS = "ray_print_logs"


def _quiet_worker_output() -> None:
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler(_RAY_PRINT_LOGS)
    dispatcher.add_handler("pan_user_lines", _show_user_lines)


# Lines of a job's log that Ray's job manager writes around the driver's own output (its start,
# its runtime environment), and Ray's log records from the driver's process.
_JOB_LOG_NOISE = (
    re.compile(r"^Running entrypoint for job \S+: "),
    re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\t(DEBUG|INFO) \S+\.py:\d+ -- "),
)


def job_log_lines(text: str) -> str:
    """A job's logs as a user reads them: Ray's own lines left out unless ``verbose``."""
    if _state["verbose"]:
        return text
    kept = [
        line for line in text.splitlines(keepends=True) if not any(p.search(line) for p in _JOB_LOG_NOISE)
    ]
    return "".join(kept)


def verbose() -> bool:
    """Whether Ray's own output is shown (``quiet_ray``)."""
    return _state["verbose"]


# Lines Ray's C++ core writes straight to file descriptor 2, which no logging setting reaches, and
# which say nothing a user can act on. Ray Data's actor pools always trip this one.
_NATIVE_NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments"),
    re.compile(rb"task_manager\.cc:\d+: Failed to push error to driver"),  # on Ctrl-C / SIGTERM
)


def _filter_native_stderr() -> None:
    """Route fd 2 through a pipe whose reader thread drops ``_NATIVE_NOISE`` lines; Python's
    ``sys.stderr`` keeps writing to the original descriptor directly (so a terminal stays one)."""
    if _state["stderr_filter"]:
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):  # a capture (pytest), not a descriptor
        return
    _state["stderr_filter"] = True
    sys.stderr.flush()
    original = os.dup(2)
    sys.stderr = os.fdopen(
        original, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace"
    )
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                if not any(p.search(line) for p in _NATIVE_NOISE):
                    os.write(original, line)

    thread = threading.Thread(target=pump, name="pan-stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:  # at exit: fd 2 back, and what is still in the pipe written out
        os.dup2(original, 2)
        thread.join(timeout=1.0)

    atexit.register(restore)


AUTH_TOKEN_VARIABLES = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")  # Ray's own, read by Ray's clients


def use_configured_token() -> None:
    """Ray sends a token only under ``RAY_AUTH_MODE=token``, and an explicit address never turns
    that mode on: joining a token cluster then fails after 20 s of retries with no word about the
    token. So a configured token (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``) turns it on, here,
    before Ray is imported (its core reads the mode once)."""
    if any(os.environ.get(v) for v in AUTH_TOKEN_VARIABLES) and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"


def auth_token() -> str | None:
    """The Ray auth token the user configured (``RAY_AUTH_TOKEN``, else the first line of the file
    ``RAY_AUTH_TOKEN_PATH``), or None."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        try:
            token = Path(path).expanduser().read_text().strip().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise ClusterError(f"RAY_AUTH_TOKEN_PATH={path}: no token can be read there") from exc
    return token or None


def connect(address: str | None, *, ray_train: bool = False) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), else start an embedded local Ray; no-op if connected.

    Joining is explicit: ``auto`` (the Ray that ``ray start`` began on this machine), an address, or
    ``RAY_ADDRESS``. Without one the command's Ray is always a new one of its own (Ray's
    ``address="local"``), never a ``ray start`` cluster that happens to run on the machine (its
    resources and lifetime are not the command's), nor the dead one a stale
    ``/tmp/ray/ray_current_cluster`` names (``ray.init()`` would try to join that).

    The embedded Ray starts without its dashboard (about 1 s less start-up and a dozen processes,
    1.2 GB, fewer on a small machine); the commands report their own progress.

    ``ray_train``: the embedded Ray's workers run ``setup_worker`` first, which Ray Train's own
    actors need. Only training asks for it: a job with a runtime environment cannot use the
    workers Ray starts ahead with the cluster (for jobs without one), so every worker is started
    on demand. Measured on a 2-core VM: two tasks' first run 2.1 s against 0.6 s, and the README's
    ``pan upscale`` 27.2-28.6 s against 23.5-25.0 s.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    shown = _state["verbose"]
    embedded: dict[str, Any] = {}
    if not address:  # its workers inherit this process's environment (AWS_* included)
        _start_watchdog()
        embedded["include_dashboard"] = False
        if ray_train:
            embedded["runtime_env"] = {
                "worker_process_setup_hook": "pipeline.raycluster.setup_worker",
                "env_vars": {QUIET_WORKERS: "0" if shown else "1"},
            }
    level = logging.INFO if shown else logging.WARNING
    ray.init(address=address or EMBEDDED, logging_level=level, **embedded)
    quiet_loggers()
    if not shown:
        _quiet_worker_output()
    _terminate_on_sigterm()  # Ray's C++ core installs its own SIGTERM handler (a stack dump)


EMBEDDED = "local"  # ray.init's address for "start a new local Ray", whatever else runs here
QUIET_WORKERS = "PAN_QUIET_WORKERS"


def setup_worker() -> None:
    """Each worker of an embedded Ray started for training runs this first
    (``worker_process_setup_hook``, ``connect(ray_train=True)``).

    It names its own cluster in ``RAY_ADDRESS``: Ray Train's placement-group cleaner asks the
    State API for "the" local cluster and crashed with "Found multiple active Ray instances" when
    another command had a Ray running on the machine. In a quiet run, it also silences what Ray
    Train's internal actors log at every step or second, which its ``LoggingConfig`` does not
    reach: that a result was reported, and, with no dashboard to ask, that the controller's state
    could not be queried (that only matters on a shared cluster)."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    if os.environ.get(QUIET_WORKERS) != "1":
        return
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(
        logging.ERROR
    )
    # This logger is named after its file; found without importing Ray Train (0.7 s of CPU in
    # every worker, most of which never train).
    context = os.path.join(
        os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py"
    )
    logging.getLogger(context).setLevel(logging.WARNING)


@contextmanager
def dataset_batches(dataset: Any) -> Iterator[Iterator[dict[str, Any]]]:
    """``with dataset_batches(ds) as batches: for batch in batches: ...`` (numpy batches as they
    come). A task or actor that failed because of the user raises that ``PipelineError``; and
    however the block ends (Ctrl-C and SIGTERM included), Ray Data's executor is shut down then,
    not when the iterator is garbage-collected after Ray has gone, which started a new Ray (with
    its dashboard) while the command exited."""
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        yield batches
    except Exception as exc:
        raise (user_error(exc) or exc) from None
    finally:
        batches.close()


def data_context() -> None:
    """Ray Data on the driver, for our jobs: no progress bars of its own (the commands show one),
    and no warning for the Python objects (decoded images) that blocks carry pickled: intended."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_fallback_to_arrow_object_ext_type = True
    if not _state["verbose"]:
        # Ray Data logs through a console handler of its own; its ERROR lines repeat the failure
        # that the command reports itself (one line for a user's error, the traceback for a bug).
        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":
                handler.setLevel(logging.CRITICAL)


_WATCHDOG = r"""
import os, signal, sys, time
fd, mark, me = int(sys.argv[1]), sys.argv[2].encode(), os.getpid()
while os.read(fd, 4096):  # blocks until EOF: the driver has ended, however it ended
    pass
def marked():  # every process that inherited the driver's mark: Ray's GCS, raylet, agents, workers
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != me:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if mark in f.read().split(b"\0"):
                        yield int(pid)
            except OSError:
                pass
for sig, grace in ((signal.SIGTERM, 1.0), (signal.SIGKILL, 0.0)):
    for pid in marked():
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    end = time.monotonic() + grace
    while time.monotonic() < end and next(marked(), None):
        time.sleep(0.05)
"""
WATCHDOG_MARK = "PAN_RAY_OWNER"


def _start_watchdog() -> None:
    """Before an embedded Ray starts: a small process that waits for this one to end (EOF on a
    pipe only we hold; Python's pipes are not inherited by what Ray starts), then ends every
    process carrying this driver's mark in its environment, which all of Ray's processes inherit.
    A normal exit has already shut Ray down, so it finds nothing to do."""
    if _state["watchdog"] is not None or not os.path.isdir("/proc"):
        return
    mark = f"{os.getpid()}-{secrets.token_hex(8)}"
    read_end, write_end = os.pipe()
    env = {k: v for k, v in os.environ.items() if k != WATCHDOG_MARK}
    subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(read_end), f"{WATCHDOG_MARK}={mark}"],
        pass_fds=(read_end,), env=env, start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    os.close(read_end)
    _state["watchdog"] = write_end  # held open for this process's life
    os.environ[WATCHDOG_MARK] = mark


def _terminate_on_sigterm() -> None:
    if threading.current_thread() is not threading.main_thread():
        return

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not break the shutdown
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)


@contextmanager
def shutdown_on_exit() -> Iterator[None]:
    """Shut down the Ray the block started (or disconnect from the cluster it joined) when it ends:
    normally, on an error, on Ctrl-C, or on SIGTERM (raised as ``Terminated``), so that no Ray
    process of ours outlives the command. A Ray that was up before the block is left as it is."""
    previous = signal.getsignal(signal.SIGTERM)
    already = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    _terminate_on_sigterm()
    try:
        yield
    finally:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized() and not already:
            ray.shutdown()
            sys.unraisablehook = _after_shutdown(sys.unraisablehook)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)


def _after_shutdown(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable-exception hook that drops what Ray Data's iterators raise from ``__del__``
    when they are collected after the shutdown ("Ray has not been started yet"): a Ctrl-C that
    lands inside ``next()`` keeps the iterator alive in the traceback, past ``dataset_batches``'s
    close. Everything else goes to ``hook``."""

    def drop_ray_data_finalizers(unraisable: Any) -> None:
        where = getattr(unraisable.object, "__module__", None) or ""
        if type(unraisable.exc_value).__name__ == "RaySystemError" and where.startswith("ray.data"):
            return
        hook(unraisable)

    return drop_ray_data_finalizers


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


def actor_pool(actors: int | None, actor_cpus: float, inputs: int) -> ActorPool:
    """The model actors for ``inputs`` inputs: one per GPU where the cluster has GPUs (``actors``
    beyond the GPUs share them, 1/k of a GPU each, k actors per GPU), else CPU actors reserving
    ``actor_cpus`` each (fractional, so CPU tasks around them still get scheduled), one per CPU
    unless ``actors`` says how many; never more actors than inputs.

    ``calls``: Ray Data calls an actor takes at once. A GPU actor takes 2: while its model runs one
    batch (one at a time still), Ray fetches and formats the next one in the actor's other thread,
    so the GPU does not wait for it. A CPU actor takes 1: its one core is busy computing.

    ``threads``: on the CPU, one single-threaded actor per core beats fewer multi-threaded ones:
    PAN scales linearly over processes, while OpenMP threads stall at every barrier when a decode
    or encode task takes their core (measured on 2 cores: 1.35 vs 1.02 output MP/s,
    benchmarks/README.md). Fewer actors than cores (``actors``, or few inputs) share the cores."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1)
    size = max(1, min(actors or gpus or int(cpus), inputs))
    threads = max(1, int(cpus // size))
    if gpus:
        share = 1 / math.ceil(size / gpus)  # 1/k: k actors fit each GPU, whatever k (2/3 would not)
        return ActorPool(size, share, _leave_cpus_to_tasks(1, size, cpus), calls=2, threads=threads)
    return ActorPool(size, 0, _leave_cpus_to_tasks(actor_cpus, size, cpus), calls=1, threads=threads)


def model_stage(
    dataset: Any, actor: type, pool: ActorPool, precision: str, *, batch_size: int, **constructor: Any
) -> Any:
    """``dataset`` mapped through ``pool``'s actors of class ``actor``, ``batch_size`` rows per
    call, each actor made with ``constructor`` plus its ``threads`` and, where several must agree
    on ``precision=auto``, the ``choices`` they share (``precision_choices``)."""
    import ray.data

    return dataset.map_batches(
        actor,
        fn_constructor_kwargs={
            **constructor,
            "threads": pool.threads,
            "choices": precision_choices(precision, pool.size),
        },
        compute=ray.data.ActorPoolStrategy(size=pool.size, max_concurrent_calls_per_actor=pool.calls),
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

    Why two: Ray Data runs read tasks ahead, and with one CPU left the reads held it while the
    first outputs waited to be encoded: on 2 cores, a 1,900-input run gave its first output after
    38 s; with a read and an encode side by side, after 22 s, at the same throughput. Why any: on
    a 1-CPU machine (or a 2-CPU one with a GPU) the actors once took every CPU, and the run hung,
    as no task could start."""
    return max(0.0, min(wanted, (cpus - CPUS_LEFT_TO_TASKS) / size))


def actor_device(requested: str) -> str:
    """The device an actor computes on: with ``auto``, the GPU it was given, if any.

    An actor that was given a GPU must use it: a GPU that CUDA cannot see is then an error (the
    engine's ``resolve_device`` says so), never a silent fall-back to the CPU.
    """
    import ray

    from pipeline.jobspec import AUTO

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


class _PrecisionChoices:
    """A run's ``precision=auto`` decisions, one per kind of device (``device_kind``): a Ray actor
    the driver starts when several model actors would each measure (``precision_choices``). The
    first actor of a kind to ``claim`` it measures, then says what it chose, or that it could not
    (``decide``); the others wait for that answer. So one run's outputs are made in one
    precision per kind of device, and actors sharing a GPU do not time their trials while the
    others run theirs (on an H100, four such actors chose fp16/fp32 and fp32/bf16 in two runs)."""

    def __init__(self) -> None:
        self._choices: dict[str, Any] = {}  # kind -> asyncio.Future of the precision (None: measure)
        self._measurers: dict[str, str | None] = {}  # kind -> the Ray actor id that measures it

    async def claim(self, kind: str, caller: str | None, wait_s: float) -> str | None:
        """The precision chosen for ``kind``, or None: the caller measures, then decides. The
        measurer restarted by Ray (same actor id) measures again; a caller that waited ``wait_s``
        for an answer in vain measures too (its measurer may be gone for good)."""
        import asyncio

        if kind not in self._choices:
            self._choices[kind] = asyncio.get_running_loop().create_future()
            self._measurers[kind] = caller
            return None
        if caller is not None and caller == self._measurers[kind] and not self._choices[kind].done():
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(self._choices[kind]), wait_s)
        except asyncio.TimeoutError:
            return None

    async def decide(self, kind: str, precision: str | None) -> None:
        """``kind``'s precision (first answer wins); None when the measurer failed: those waiting
        measure for themselves."""
        future = self._choices[kind]
        if not future.done():
            future.set_result(precision)


# How long an actor waits for another's choice. Loading and timing take seconds; a measurer that
# dies mid-way and is not restarted (its node lost) never answers, and those waiting stall this
# long before measuring for themselves.
AGREE_WAIT_S = 60.0


def precision_choices(precision: str, actors: int) -> Any | None:
    """Where a run's model actors agree on ``precision=auto`` (a ``_PrecisionChoices`` actor), or
    None when there is nothing to agree on: a precision is given, or one actor decides alone."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.jobspec import AUTO

    if precision != AUTO or actors < 2:
        return None
    # On the driver's node, whose loss ends the run anyway: a worker node may go mid-run.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(_PrecisionChoices).remote()


def device_kind(device: str) -> str:
    """What a precision's speed depends on: the GPU's name, or the CPU's model and the instruction
    set torch uses on it (bf16 is fast only where the CPU has it)."""
    import platform

    import torch

    if device.startswith("cuda"):
        try:
            return "cuda " + torch.cuda.get_device_name(torch.device(device))
        except (AssertionError, RuntimeError, ValueError):  # no usable GPU: the engine says so, typed
            return device
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), model)
    return f"cpu {torch.backends.cpu.get_cpu_capability()} {model}"


def agreed_build(choices: Any | None, kind: str, precision: str, build: Callable[[str], Any]) -> Any:
    """``build(precision)``: an engine, whose ``precision`` says what it runs in. With ``choices``
    (``precision_choices``, so ``precision`` is ``auto``), in the precision the run's actors agree
    on for the ``kind`` of device: the first builds with ``auto``, measuring, and the others with
    its choice. Should the choices be lost (their node gone), each actor measures for itself."""
    import ray
    from ray.exceptions import RayActorError

    from pipeline.jobspec import AUTO

    if choices is None:
        return build(precision)
    try:
        caller = ray.get_runtime_context().get_actor_id()  # None outside an actor
        chosen = ray.get(choices.claim.remote(kind, caller, AGREE_WAIT_S))
    except RayActorError:
        return build(AUTO)
    if chosen is not None:
        return build(chosen)
    try:
        built = build(AUTO)
    except BaseException:
        choices.decide.remote(kind, None)
        raise
    choices.decide.remote(kind, built.precision)  # not waited for: a lost answer makes others measure
    return built


def actor_upscaler(spec: Any, scale: int, threads: int, choices: Any | None, files: Any) -> Any:
    """A model actor's engine (``build_upscaler``) for the ``InferenceSpec`` ``spec`` at ``scale``,
    its weights read through ``files`` (the job's ``storage.Files``):
    on the device the actor was given (``actor_device``), computing with ``threads`` torch threads
    on the CPU (``ActorPool.threads``), with its share of the GPU's memory (``actor_gpu_share``), in
    the precision the pool agrees on (``agreed_build``)."""
    import torch

    from pipeline.engine import build_upscaler

    device = actor_device(spec.device)
    if device == "cpu":
        # Ray sets OMP_NUM_THREADS to the (fractional, so 1) CPUs an actor reserves; the model is
        # the bottleneck, so let it use its share of the node's cores (measured: 1.9x on 2).
        torch.set_num_threads(threads)
    share = actor_gpu_share()

    def build(precision: str) -> Any:
        chosen = spec.model_copy(update={"precision": precision})
        return build_upscaler(chosen, scale, device=device, files=files, memory_share=share)

    return agreed_build(choices, f"x{scale} {device_kind(device)}", spec.precision, build)


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
