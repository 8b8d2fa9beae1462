"""What a run of the upscaling job has to do: the source listing compared with the run ledger.

A run reads a source file when the ledger has never seen it at its size and version (new, or
changed since), when some of its inputs lack an output in a sink the run writes, or when one of its
inputs failed fewer than ``max_attempts`` times. Everything else is counted, not read: done inputs
as skipped, inputs that failed ``max_attempts`` times as given up. Planning lists the source and
reads the ledger (``pipeline.ledger``); it lists the outputs and reads Parquet names only to
*rescan* the destination: when asked (``rescan_dest``), or once for a destination made before the
ledger existed, whose finished outputs are then adopted into the ledger.

Output names are taken in path order: by an image, or by a shard for every name under its prefix
(``a.tar`` holds ``a/...``); a later input that would reuse one is a collision, an error of that
input which, like any failure, is reported until it has been tried ``max_attempts`` times.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.jobspec import UpscaleJob
from pipeline.ledger import DONE, Ledger, read_ledger
from pipeline.sinks import existing_outputs, output_name, shard_prefix
from pipeline.sources import InputUnit, list_inputs, missing_sinks


@dataclass(frozen=True)
class Collision:
    unit: InputUnit
    name: str  # the output name (or shard prefix) another input took
    attempts: int  # earlier runs that reported it


@dataclass
class Plan:
    todo: list[InputUnit] = field(default_factory=list)  # each with its outputs already written
    collisions: list[Collision] = field(default_factory=list)
    skipped: int = 0  # inputs done before
    gave_up: int = 0  # inputs that failed max_attempts times: not tried again
    units: Counter = field(default_factory=Counter)  # files to read: new, changed, retried, unfinished
    attempts: dict[str, int] = field(default_factory=dict)  # key -> failed runs, of inputs tried again
    adopted: list[tuple[InputUnit, tuple[str, ...]]] = field(default_factory=list)  # rescan: (image, sinks)
    rescan: bool = False  # shard members found finished are adopted as they pass
    unfinished_runs: tuple[str, ...] = ()  # killed runs since the ledger's start


def plan(job: UpscaleJob, exclude: str | None = None, since: str | None = None) -> Plan:
    """The plan of a run of ``job``; ``exclude``: a folder of the source to leave out (a
    destination inside it); ``since``: the destination's ``ledger_since``."""
    units = list_inputs(job.source, job.storage_options, exclude=exclude)
    ledger = read_ledger(job.dest, since, job.storage_options)
    return plan_units(job, units, ledger)


def plan_units(job: UpscaleJob, units: list[InputUnit], ledger: Ledger) -> Plan:
    """``plan`` on a listing and a ledger already read."""
    wanted = job.sinks
    fresh = job.overwrite  # every input is redone (its run starts the ledger afresh: ``since``)
    rescan = not fresh and (job.rescan_dest or not ledger.runs)
    written = existing_outputs(job.dest, wanted, job.storage_options) if rescan else {}
    triage = ledger.triage(units, wanted, job.max_attempts)
    result = Plan(rescan=rescan, unfinished_runs=ledger.unfinished)
    shard_of: dict[str, str] = {}  # output prefix -> the shard that took it
    for unit in units:
        if unit.kind != "image":
            shard_of.setdefault(shard_prefix(unit.rel), unit.rel)
    seen: set[str] = set()
    for unit in units:
        taken = _collision(unit, shard_of, seen)
        entries = triage.partial.get(unit.rel, [])
        done, gave_up = triage.complete.get(unit.rel, (0, 0))
        # A rescan decides what is done from the outputs; what failed for good stays given up.
        if unit.rel in triage.complete and (taken or not rescan or not done):
            result.gave_up += gave_up
            result.skipped += 0 if taken else done
            continue
        if taken:
            tried = max((e["attempts"] for e in entries if e["key"] == unit.rel), default=0)
            result.collisions.append(Collision(unit, taken, tried))
            continue
        result.attempts.update({e["key"]: e["attempts"] for e in entries if e["status"] == "failed"})
        if rescan:
            mine = _written_by_scan(unit, written, wanted)
            if unit.kind == "image" and not missing_sinks(output_name(unit.rel), wanted, mine):
                result.skipped += 1
                result.adopted.append((unit, wanted))
                continue
        elif fresh:
            mine = {}
        else:
            mine = _written_by_ledger(entries, wanted, job.max_attempts)
        result.units[_why(unit, entries, triage.known, fresh)] += 1
        result.todo.append(dataclasses.replace(unit, written=mine))
    return result


def _collision(unit: InputUnit, shard_of: dict[str, str], seen: set[str]) -> str | None:
    """The output name (or prefix) of ``unit`` that an earlier input took, else None."""
    if unit.kind != "image":
        prefix = shard_prefix(unit.rel)
        return prefix if shard_of[prefix] != unit.rel else None
    name = output_name(unit.rel)
    if name in seen or any(name.startswith(p) for p in shard_of):
        return name
    seen.add(name)
    return None


def _written_by_ledger(entries: list[dict[str, Any]], wanted: tuple[str, ...], max_attempts: int) -> dict:
    """Per sink, the names of a partly done file's inputs not to make again: those done in that
    sink, and those given up on."""
    gave_up = {e["name"] for e in entries if e["status"] == "failed" and e["attempts"] >= max_attempts}
    return {
        s: frozenset({e["name"] for e in entries if e["status"] in DONE and e[s]} | gave_up) for s in wanted
    }


def _written_by_scan(unit: InputUnit, written: dict[str, frozenset[str]], wanted: tuple[str, ...]) -> dict:
    if unit.kind == "image":
        name = output_name(unit.rel)
        return {s: frozenset({name}) for s in wanted if name in written.get(s, ())}
    prefix = shard_prefix(unit.rel)
    return {s: frozenset(n for n in written.get(s, ()) if n.startswith(prefix)) for s in wanted}


def _why(unit: InputUnit, entries: list[dict[str, Any]], known: set[str], fresh: bool) -> str:
    if fresh:
        return "redone"
    if not entries:
        return "changed" if unit.rel in known else "new"
    return "retried" if any(e["status"] == "failed" for e in entries) else "unfinished"
