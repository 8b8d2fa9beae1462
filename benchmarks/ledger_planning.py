"""How long a nightly run takes to know what to do: a source listing of 100,000 files against a
run ledger of 1,000,000 done inputs (issue 10). Prints the planning time and the driver's memory.

    .venv/bin/python benchmarks/ledger_planning.py [--runs 100] [--per-run 10000] [--source 100000]

The ledger is real: ``--runs`` finished runs of ``--per-run`` entries each, written by
``pipeline.batch.ledger.RunLog`` into a temporary local destination. The source listing is synthetic
(``InputUnit``s with sizes and versions), as listing 100,000 real files measures the file system,
not the plan. Each scenario is planned in a fresh process, so its peak memory is its own:
- ``nothing new``: the source is 100,000 files the ledger has, unchanged;
- ``1% new, 1% changed``: 1,000 files the ledger has never seen and 1,000 whose size changed;
- ``1% failed``: 1,000 inputs whose last attempt failed, to be tried again.
Planning = reading the ledger (one listing of ``_runs/``, one read per run) + comparing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

SCENARIOS = ("nothing new", "1% new, 1% changed", "1% failed")


def _key(i: int) -> str:
    return f"photos/{i // 1000:04d}/img_{i:08d}.jpg"


def write_ledger(dest: Path, runs: int, per_run: int) -> None:
    """``runs`` finished runs; run r holds inputs r*per_run ... (r+1)*per_run - 1, all succeeded.
    Written as the merged manifest a finished run leaves, with the same schema and writer."""
    from pipeline.batch.ledger import MANIFEST_NAME, MANIFEST_SCHEMA
    from pipeline.batch.sinks import SUMMARY_NAME, parquet_bytes

    for r in range(runs):
        run_id = f"20260101T{r // 3600:02d}{r // 60 % 60:02d}{r % 60:02d}Z-bench-{r:06x}"
        folder = dest / "_runs" / run_id
        folder.mkdir(parents=True)
        ids = range(r * per_run, (r + 1) * per_run)
        keys = [_key(i) for i in ids]
        n = len(keys)
        table = pa.table(
            {
                "key": keys,
                "unit": keys,
                "unit_size": pa.array([100_000 + i % 5000 for i in ids], pa.int64()),
                "unit_version": [f'"{i:032x}"' for i in ids],
                "unit_rows": pa.array([1] * n, pa.int32()),
                "name": [k[:-4] + ".png" for k in keys],
                "status": ["succeeded"] * n,
                "attempts": pa.array([1] * n, pa.int16()),
                "png": [True] * n,
                "parquet": [True] * n,
                "part": [f"parquet/part-{run_id}-{1 + j // 10_000:05d}.parquet" for j in range(n)],
                "error_type": pa.nulls(n, pa.string()),
                "error": pa.nulls(n, pa.string()),
                "input_sha256": [f"{i:064x}" for i in ids],
                "weights_sha256": ["ab" * 32] * n,
                "package_version": ["0.4.0"] * n,
                "run_id": [run_id] * n,
            },
            schema=MANIFEST_SCHEMA,
        )
        (folder / MANIFEST_NAME).write_bytes(parquet_bytes(table))
        (folder / SUMMARY_NAME).write_text(json.dumps({"succeeded": n}))


def source_units(scenario: str, total: int, ledger_size: int, failed_at: list[int]):
    """The synthetic listing: the last ``total`` inputs of the ledger (the newest nights),
    with the scenario's changes."""
    from pipeline.batch.sources import InputUnit

    first = ledger_size - total
    units = [InputUnit(f"s3://bucket/{_key(i)}", _key(i), "image", 100_000 + i % 5000, f'"{i:032x}"')
             for i in range(first, ledger_size)]  # fmt: skip
    if scenario == "1% new, 1% changed":
        step = 100
        for j in range(0, total, step):
            u = units[j]
            units[j] = InputUnit(u.url, u.rel, u.kind, u.size + 1, u.version)  # changed size
        units += [
            InputUnit(f"s3://bucket/{_key(i)}", _key(i), "image", 1, '"new"')
            for i in range(ledger_size, ledger_size + total // step)
        ]
    failed_at += list(range(first, ledger_size, 100)) if scenario == "1% failed" else []
    return units


def measure(dest: str, scenario: str, total: int, ledger_size: int) -> dict:
    """Plan in this (fresh) process; memory above what the imports took."""
    from pipeline.batch.ledger import RunLog, read_ledger
    from pipeline.batch.planner import plan_units
    from pipeline.batch.records import LedgerEntry
    from pipeline.batch.sinks import PartBuffer
    from pipeline.config.settings import UpscaleJob
    from pipeline.io.storage import Files

    failed: list[int] = []
    units = source_units(scenario, total, ledger_size, failed)
    if failed:  # one more run, in which these inputs failed
        log = RunLog(dest, "20990101T000000Z-bench-failed", PartBuffer(10_000, 2**27), files=Files())
        for i in failed:
            log.add(LedgerEntry(key=_key(i), unit=_key(i), unit_size=100_000 + i % 5000,
                     unit_version=f'"{i:032x}"', unit_rows=1, name=_key(i)[:-4] + ".png",
                     status="failed", attempts=1, png=False, parquet=False, part=None,
                     error_type="OSError", error="timeout", input_sha256=None,
                     weights_sha256="ab" * 32, package_version="0.4.0", run_id="x"))  # fmt: skip
        log.finish({})
    job = UpscaleJob(source="s3://bucket/photos", dest=dest, scale=4, format="both")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pool = pa.default_memory_pool()
    start = time.perf_counter()
    ledger = read_ledger(dest, None, Files())
    read_s = time.perf_counter() - start
    work = plan_units(job, units, ledger)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "scenario": scenario,
        "ledger_entries": ledger.entries.num_rows,
        "runs": len(ledger.runs),
        "source_files": len(units),
        "to_do": len(work.todo),
        "skipped": work.skipped,
        "read_ledger_s": round(read_s, 2),
        "plan_s": round(seconds, 2),
        "peak_rss_above_imports_mib": round((peak - base) / 1024, 1),
        "arrow_peak_mib": round(pool.max_memory() / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--per-run", type=int, default=10_000)
    parser.add_argument("--source", type=int, default=100_000)
    parser.add_argument("--measure", nargs=2, metavar=("DEST", "SCENARIO"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = args.runs * args.per_run
    if args.measure:
        print(json.dumps(measure(args.measure[0], args.measure[1], args.source, size)))
        return
    with tempfile.TemporaryDirectory(prefix="pan-ledger-") as tmp:
        start = time.perf_counter()
        write_ledger(Path(tmp) / "ledger", args.runs, args.per_run)
        print(f"ledger: {args.runs} runs x {args.per_run} = {size:,} entries, written in "
              f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        for scenario in SCENARIOS:
            dest = Path(tmp) / scenario.replace(" ", "_").replace(",", "").replace("%", "pc")
            subprocess.run(["cp", "-r", str(Path(tmp) / "ledger"), str(dest)], check=True)
            out = subprocess.run(
                [sys.executable, __file__, "--source", str(args.source), "--runs", str(args.runs),
                 "--per-run", str(args.per_run), "--measure", str(dest), scenario],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            print(json.loads(out.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
