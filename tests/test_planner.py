"""The run ledger and planning from it, without Ray: what a run takes, what it skips, what it
gives up on, and how a killed run's commits are read back."""

import pyarrow.parquet as pq
import pytest

from pipeline.batch.ledger import MANIFEST_SCHEMA, RunLog, read_ledger, run_rows
from pipeline.batch.planner import plan_units
from pipeline.batch.records import LedgerEntry, OutputRow
from pipeline.batch.sinks import PartBuffer
from pipeline.batch.sources import InputUnit
from pipeline.config.settings import UpscaleJob
from pipeline.errors import DestinationError
from pipeline.io.storage import Files

FILES = Files()  # no storage options: local files and the loopback S3 of the environment


def _unit(rel: str, size: int = 10, version: str = "v1", kind: str = "image") -> InputUnit:
    return InputUnit(f"/src/{rel}", rel, kind, size, version)


def _entry(unit: InputUnit, key: str | None = None, status: str = "succeeded", **fields) -> dict:
    key = key or unit.rel
    return {
        "key": key, "unit": unit.rel, "unit_size": unit.size, "unit_version": unit.version,
        "unit_rows": 1, "name": key.rsplit(".", 1)[0] + ".png", "status": status, "attempts": 1,
        "png": status == "succeeded", "parquet": False, "part": None, "error_type": None, "error": None,
        "input_sha256": None, "weights_sha256": "w", "package_version": "0", "run_id": "r",
        **fields,
    }  # fmt: skip


def _row(name: str) -> OutputRow:
    return OutputRow(key=name, name=name, input_width=1, input_height=1, input_mode="RGB", output_width=2,
                     output_height=2, scale=2, weights_id="w", weights_sha256="w", png=b"x" * 100,
                     seconds=0.1, psnr_vs_input=None, pattern_levels=None, input_sha256=None,
                     package_version="0", run_id="r")  # fmt: skip


def _run(dest, run_id: str, entries, *, finish: bool = True, parquet: bool = False) -> RunLog:
    log = RunLog(str(dest), run_id, PartBuffer(1000, 10**9), files=FILES)
    log.start({})
    for e in entries:
        log.add(LedgerEntry(**{**e, "run_id": run_id}), _row(e["name"]) if parquet else None)
    if finish:
        log.finish({"succeeded": len(entries)})
    else:
        log.commit()
    return log


def _job(tmp_path, **settings) -> UpscaleJob:
    return UpscaleJob(source="/src", dest=str(tmp_path / "out"), scale=2, **settings)


def test_a_rerun_takes_what_is_new_changed_or_failed_and_skips_the_rest(tmp_path):
    dest = tmp_path / "out"
    old = [_unit(f"{i}.png") for i in range(5)]
    _run(dest, "run1", [_entry(u) for u in old[:4]] + [_entry(old[4], status="failed", attempts=1)])
    ledger = read_ledger(str(dest), None, FILES)
    assert ledger.runs == ("run1",) and ledger.entries.num_rows == 5
    changed = _unit("1.png", size=11)  # size differs
    touched = _unit("2.png", version="v2")  # same size, new ETag or mtime
    source = [old[0], changed, touched, old[3], old[4], _unit("new.png")]
    work = plan_units(_job(tmp_path, max_attempts=2), source, ledger)
    assert [u.rel for u in work.todo] == ["1.png", "2.png", "4.png", "new.png"]
    assert work.skipped == 2 and work.gave_up == 0 and not work.rescan
    assert dict(work.units) == {"changed": 2, "retried": 1, "new": 1}
    assert work.attempts == {"4.png": 1}
    # The second failure reaches --max-attempts 2: from then on it is given up on, not read.
    _run(dest, "run2", [_entry(old[4], status="failed", attempts=2)])
    work = plan_units(_job(tmp_path, max_attempts=2), old, read_ledger(str(dest), None, FILES))
    assert work.todo == [] and (work.skipped, work.gave_up) == (4, 1)


def test_an_input_done_in_one_sink_is_finished_in_the_other(tmp_path):
    dest = tmp_path / "out"
    unit = _unit("a.png")
    _run(dest, "run1", [_entry(unit)])  # format png
    work = plan_units(_job(tmp_path, format="both"), [unit], read_ledger(str(dest), None, FILES))
    (todo,) = work.todo
    assert todo.written == {"png": frozenset({"a.png"}), "parquet": frozenset()}
    assert plan_units(_job(tmp_path, format="png"), [unit], read_ledger(str(dest), None, FILES)).skipped == 1


def test_shards_are_done_when_every_member_is(tmp_path):
    dest = tmp_path / "out"
    shard = _unit("s.tar", kind="tar")
    members = [_entry(shard, key=f"s.tar/{m}.jpg", name=f"s/{m}.png", unit_rows=3) for m in "ab"]
    _run(dest, "run1", members)
    work = plan_units(_job(tmp_path), [shard], read_ledger(str(dest), None, FILES))
    (todo,) = work.todo  # one member of three has no entry: killed before it was recorded
    assert todo.written == {"png": frozenset({"s/a.png", "s/b.png"})} and dict(work.units) == {
        "unfinished": 1
    }
    failed = _entry(shard, key="s.tar/c.jpg", name="s/c.png", unit_rows=3, status="failed", attempts=3)
    _run(dest, "run2", [failed])
    work = plan_units(_job(tmp_path), [shard], read_ledger(str(dest), None, FILES))
    assert work.todo == [] and (work.skipped, work.gave_up) == (2, 1)


def test_an_overwrite_run_starts_the_ledger_afresh(tmp_path):
    dest = tmp_path / "out"
    unit = _unit("a.png")
    _run(dest, "run1", [_entry(unit)])
    _run(dest, "run2", [])
    ledger = read_ledger(str(dest), "run2", FILES)
    assert ledger.runs == ("run2",) and ledger.entries.num_rows == 0
    assert [u.rel for u in plan_units(_job(tmp_path), [unit], ledger).todo] == ["a.png"]


def test_parquet_parts_are_sized_by_rows_or_bytes():
    by_rows, by_bytes = PartBuffer(max_rows=3, max_bytes=10**9), PartBuffer(max_rows=10**6, max_bytes=250)
    for i in range(3):
        assert not by_rows.full
        by_rows.add(_row(f"{i}.png"))
        by_bytes.add(_row(f"{i}.png"))
    assert by_rows.full and by_bytes.full and by_bytes.bytes == 300


def test_commits_write_a_part_per_fill_and_the_ledger_names_each_row_once(tmp_path):
    dest = tmp_path / "out"
    log = RunLog(str(dest), "run1", PartBuffer(max_rows=4, max_bytes=10**9), files=FILES)
    log.start({"job": "settings"})
    units = [_unit(f"{i}.png") for i in range(10)]
    for u in units:
        log.add(LedgerEntry(**{**_entry(u), "run_id": "run1"}), _row(f"{u.rel[:-4]}.png"))
    assert log.commits == 2  # two full parts of 4; two rows wait
    log.finish({"succeeded": 10})
    parts = sorted(p.name for p in (dest / "parquet").iterdir())
    assert parts == [f"part-run1-0000{n}.parquet" for n in (1, 2, 3)]
    assert [pq.read_metadata(dest / "parquet" / p).num_rows for p in parts] == [4, 4, 2]
    entries = read_ledger(str(dest), None, FILES, columns=MANIFEST_SCHEMA.names).entries.to_pylist()
    for e in entries:
        names = pq.read_table(dest / e["part"], columns=["name"]).column("name").to_pylist()
        assert e["parquet"] and names.count(e["name"]) == 1
    # The commits are merged into one manifest when the run finishes.
    assert sorted(p.name for p in (dest / "_runs/run1").iterdir()) == [
        "manifest.parquet",
        "settings.json",
        "summary.json",
    ]
    assert run_rows(str(dest), FILES) == [{"run_id": "run1", "finished": True, "succeeded": 10}]


def test_a_killed_runs_entries_whose_part_was_never_written_count_as_not_in_parquet(tmp_path):
    dest = tmp_path / "out"
    units = [_unit(f"{i}.png") for i in range(3)]
    log = _run(dest, "run1", [_entry(u, png=True) for u in units], finish=False, parquet=True)
    part = dest / "parquet" / f"part-run1-{log.commits:05d}.parquet"
    part.unlink()  # killed after its entries, before its part
    ledger = read_ledger(str(dest), None, FILES)
    assert ledger.unfinished == ("run1",)
    assert ledger.entries.column("parquet").to_pylist() == [False] * 3
    work = plan_units(_job(tmp_path, format="both"), units, ledger)
    assert [u.written for u in work.todo] == [
        {"png": frozenset({u.rel}), "parquet": frozenset()} for u in units
    ]
    assert run_rows(str(dest), FILES) == [
        {"run_id": "run1", "finished": False, "succeeded": 3, "failed": 0, "suspect": 0}
    ]


def test_a_damaged_ledger_file_is_a_clear_error(tmp_path):
    dest = tmp_path / "out"
    _run(dest, "run1", [_entry(_unit("a.png"))])
    (dest / "_runs/run1/manifest.parquet").write_bytes(b"not parquet")
    with pytest.raises(DestinationError, match=r"run1/manifest\.parquet is damaged.*--rescan-dest"):
        read_ledger(str(dest), None, FILES)


def test_an_output_name_belongs_to_the_input_that_first_made_it_across_runs(tmp_path):
    dest = tmp_path / "out"
    png, jpg = _unit("x.png"), _unit("x.jpg")
    _run(dest, "run1", [_entry(png)])
    # x.jpg sorts first, but x.png made x.png before: x.jpg is the collision, naming its owner.
    work = plan_units(_job(tmp_path), [jpg, png], read_ledger(str(dest), None, FILES))
    assert work.todo == [] and work.skipped == 1
    (clash,) = work.collisions
    assert (clash.unit.rel, clash.name) == ("x.jpg", "x.png")
    assert clash.message.startswith(
        "x.jpg: its output name x.png is taken by the input x.png, whose output an"
    )
    # The owner left the source: its output stays its own.
    work = plan_units(_job(tmp_path), [jpg], read_ledger(str(dest), None, FILES))
    assert [c.unit.rel for c in work.collisions] == ["x.jpg"] and work.todo == []
    # A collision is a failure like any other: given up after --max-attempts.
    _run(dest, "run2", [_entry(jpg, name="x.png", status="failed", attempts=3)])
    work = plan_units(_job(tmp_path), [jpg, png], read_ledger(str(dest), None, FILES))
    assert (work.collisions, work.gave_up, work.skipped) == ([], 1, 1)
    # --overwrite starts the ledger afresh: names are taken in path order again.
    _run(dest, "run3", [])
    work = plan_units(_job(tmp_path, overwrite=True), [jpg, png], read_ledger(str(dest), "run3", FILES))
    assert [u.rel for u in work.todo] == ["x.jpg"] and [c.unit.rel for c in work.collisions] == ["x.png"]


def test_a_shard_keeps_its_prefix_and_names_made_by_others_stay_theirs(tmp_path):
    dest = tmp_path / "out"
    shard, image = _unit("s.tar", kind="tar"), _unit("s/m.jpg")
    _run(dest, "run1", [_entry(shard, key="s.tar/a.jpg", name="s/a.png", unit_rows=1), _entry(image)])
    other = _unit("s.parquet", kind="parquet")  # sorts first, but s.tar holds the prefix s/
    work = plan_units(_job(tmp_path), [other, shard, image], read_ledger(str(dest), None, FILES))
    assert [(c.unit.rel, c.name, c.owner) for c in work.collisions] == [
        ("s.parquet", "s/", "the shard s.tar")
    ]
    assert work.skipped == 2  # s.tar (done) and s/m.jpg, which owns s/m.png inside the prefix
    # The shard changed and holds m.jpg now: that member collides when read, the rest is made.
    changed = _unit("s.tar", kind="tar", size=99)
    (todo,) = plan_units(_job(tmp_path), [changed, image], read_ledger(str(dest), None, FILES)).todo
    assert todo.taken == {"s/m.png": "s/m.jpg"}


def test_no_output_lies_in_pans_own_files(tmp_path):
    units = [_unit("_lease/a.png"), _unit("_runs/x.jpg"), _unit("parquet.tar", kind="tar"),
             _unit("parquet/b.jpg"), _unit("_summary.png"), _unit("_x/_errors.png")]  # fmt: skip
    work = plan_units(_job(tmp_path), units, read_ledger(str(tmp_path / "out"), None, FILES))
    assert [u.rel for u in work.todo] == ["_summary.png", "_x/_errors.png"]
    assert {c.unit.rel: c.owner for c in work.collisions} == {
        "_lease/a.png": "pan's own _lease in the destination",
        "_runs/x.jpg": "pan's own _runs in the destination",
        "parquet.tar": "pan's own parquet in the destination",
        "parquet/b.jpg": "pan's own parquet in the destination",
    }
    assert work.collisions[0].message.endswith("rename or move the input")
