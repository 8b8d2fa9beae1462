"""Agreement across a pool's model actors on ``precision=auto``: one precision per kind of device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any


class _PrecisionChoices:
    """A run's ``precision=auto`` decisions, one per kind of device (``device_kind``): a Ray actor
    the driver starts when several model actors would each measure (``precision_choices``). The
    first actor of a kind to ``claim`` it measures, then says what it chose, or that it could not
    (``decide``); the others wait for that answer. So one run's outputs are made in one
    precision per kind of device, and actors sharing a GPU do not time their trials while the
    others run theirs, which skews each one's timing and splits their choices."""

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

    from pipeline.config.settings import AUTO

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

    from pipeline.config.settings import AUTO

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
