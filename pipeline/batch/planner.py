"""What a run of the upscaling job has to do: the source listing compared with the run ledger.

A run reads a source file when the ledger has never seen it at its size and version (new, or
changed since), when some of its inputs lack an output in a sink the run writes, or when one of its
inputs failed fewer than ``max_attempts`` times. Everything else is counted, not read: done inputs
as skipped, inputs that failed ``max_attempts`` times as given up. Planning lists the source and
reads the ledger (``pipeline.batch.ledger``); it lists the outputs and reads Parquet names only to
*rescan* the destination: when asked (``rescan_dest``), or once for a destination whose ledger
has no run yet (its outputs, if any, made without a ledger), whose finished outputs are then
adopted into the ledger.

An output name belongs to the first input that took it (``_Names``). Across runs the ledger says
who: the input that first made an output under the name owns it while that output stands, even
once the input has left the source, until ``--overwrite`` starts the ledger afresh. Names no run
has made yet are taken in path order: by an image, or by a shard for every name under its prefix
(``a.tar`` holds ``a/...``). No name may lie in pan's own files of the destination
(``sinks.reserved_by``). A later input that would reuse a taken name is a collision: an error of
that input naming the owner, which, like any failure, is reported until it has been tried
``max_attempts`` times; the owner's output keeps its bytes.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.batch.ledger import DONE, Ledger, read_ledger
from pipeline.batch.sinks import existing_outputs, output_name, reserved_by, shard_prefix
from pipeline.batch.sources import InputUnit, collision_message, list_inputs, missing_sinks
from pipeline.config.settings import UpscaleJob


@dataclass(frozen=True)
class Collision:
    unit: InputUnit
    name: str  # the output name (or shard prefix) another input took
    owner: str  # who holds it: "the input a.png", "pan's own folder _runs/ of the destination"
    attempts: int  # earlier runs that reported it

    @property
    def message(self) -> str:
        advice = "rename or move the input" if self.owner.startswith("pan's own") else "rename one of them"
        return collision_message(self.unit.rel, self.name, self.owner, advice)


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
    ignored: Mapping[str, int] = field(default_factory=dict)  # files that are not inputs (Listing)
    ignored_examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def plan(job: UpscaleJob, exclude: str | None = None, since: str | None = None) -> Plan:
    """The plan of a run of ``job``; ``exclude``: a folder of the source to leave out (a
    destination inside it); ``since``: the destination's ``ledger_since``."""
    listing = list_inputs(job.source, job.files, exclude=exclude)
    ledger = read_ledger(job.dest, since, job.files)
    result = plan_units(job, listing.units, ledger)
    return dataclasses.replace(result, ignored=listing.ignored, ignored_examples=listing.examples)


def plan_units(job: UpscaleJob, units: list[InputUnit], ledger: Ledger) -> Plan:
    """``plan`` on the inputs of a listing and a ledger already read."""
    wanted = job.sinks
    fresh = job.overwrite  # every input is redone (its run starts the ledger afresh: ``since``)
    rescan = not fresh and (job.rescan_dest or not ledger.runs)
    written = existing_outputs(job.dest, wanted, job.files) if rescan else {}
    triage = ledger.triage(units, wanted, job.max_attempts)
    result = Plan(rescan=rescan, unfinished_runs=ledger.unfinished)
    names = _Names(units, ledger.owners)
    clashes = {unit.rel: clash for unit in units if (clash := names.clash(unit))}
    failures = _failures(ledger, list(clashes))
    for unit in units:
        if unit.rel in clashes:
            name, owner = clashes[unit.rel]
            tried = failures.get(unit.rel, 0)
            if tried >= job.max_attempts:
                result.gave_up += 1
            else:
                result.collisions.append(Collision(unit, name, owner, tried))
            continue
        entries = triage.partial.get(unit.rel, [])
        done, gave_up = triage.complete.get(unit.rel, (0, 0))
        # A rescan decides what is done from the outputs; what failed for good stays given up.
        if unit.rel in triage.complete and (not rescan or not done):
            result.gave_up += gave_up
            result.skipped += done
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
        result.todo.append(dataclasses.replace(unit, written=mine, taken=names.taken_under(unit)))
    return result


class _Names:
    """Who owns each output name (the module docstring): the ledger's ``owners`` first, then the
    listing's ``units`` in path order, each shard taking every name under its prefix."""

    def __init__(self, units: list[InputUnit], owners: pa.Table | None) -> None:
        if owners is None:
            owners = pa.table({c: pa.array([], pa.string()) for c in ("name", "key", "unit")})
        shards = [u.rel for u in units if u.kind != "image"]
        wanted = pa.array([output_name(u.rel) for u in units if u.kind == "image"], pa.string())
        mine = owners.filter(pc.is_in(owners["name"], wanted))
        self._owner = {r["name"]: (r["key"], r["unit"]) for r in mine.to_pylist()}  # image names only
        # For shards: every owned name, sorted, to find those under a prefix (``_owned_under``).
        self._sorted = owners.sort_by("name") if shards else owners.slice(0, 0)
        self._sorted_names = self._sorted["name"].to_pylist()
        self._shard_of: dict[str, str] = {}  # prefix -> the shard that holds it
        for rel in shards:  # a shard whose members made outputs before keeps its prefix
            prefix = shard_prefix(rel)
            if any(o["unit"] == rel for o in self._owned_under(prefix)):
                self._shard_of[prefix] = rel
        for rel in shards:
            self._shard_of.setdefault(shard_prefix(rel), rel)
        self._listed: dict[str, str] = {}  # name -> the image of this listing that took it

    def _owned_under(self, prefix: str) -> list[dict[str, str]]:
        start = bisect.bisect_left(self._sorted_names, prefix)
        end = bisect.bisect_left(self._sorted_names, prefix + "\U0010ffff")
        return self._sorted.slice(start, end - start).to_pylist()

    def clash(self, unit: InputUnit) -> tuple[str, str] | None:
        """(the name, who holds it) when ``unit``'s output name (a shard's: its prefix) is taken."""
        if unit.kind != "image":
            prefix = shard_prefix(unit.rel)
            if reserved := reserved_by(prefix):
                return prefix, f"pan's own {reserved} in the destination"
            holder = self._shard_of[prefix]
            return (prefix, f"the shard {holder}") if holder != unit.rel else None
        name = output_name(unit.rel)
        if reserved := reserved_by(name):
            return name, f"pan's own {reserved} in the destination"
        key, owner_unit = self._owner.get(name, (None, None))
        if key is not None:
            return None if owner_unit == unit.rel else (name, _earlier(key))
        holder = next((s for p, s in self._shard_of.items() if name.startswith(p)), None)
        if holder is not None:
            return name, f"the shard {holder}"
        first = self._listed.setdefault(name, unit.rel)
        return (name, f"the input {first}") if first != unit.rel else None

    def taken_under(self, unit: InputUnit) -> dict[str, str]:
        """A shard's member names that other inputs own (name -> owner key): collisions when read."""
        if unit.kind == "image":
            return {}
        return {
            o["name"]: o["key"] for o in self._owned_under(shard_prefix(unit.rel)) if o["unit"] != unit.rel
        }


def _earlier(key: str) -> str:
    return f"the input {key}, whose output an earlier run made (--overwrite redoes every input)"


def _failures(ledger: Ledger, keys: list[str]) -> dict[str, int]:
    """The failed attempts the ledger counts for ``keys`` (their latest entry failed)."""
    if not keys:
        return {}
    entries = ledger.entries
    mine = entries.filter(pc.is_in(entries["key"], pa.array(keys, pa.string())))
    return {e["key"]: e["attempts"] for e in mine.to_pylist() if e["status"] == "failed"}


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
