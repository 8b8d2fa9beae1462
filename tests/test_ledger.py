"""The run ledger end to end on a real Ray, on a local folder and on a loopback S3 server: a nightly
rerun costs what is new, reads no output to know it, and gives up on inputs that always fail.
(The ledger's own rules, without Ray: tests/test_planner.py.)"""

import hashlib
import shutil
import uuid
from collections import Counter

import boto3
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem
from s3fs import S3FileSystem

from pipeline.batch.job import run_upscale
from pipeline.batch.ledger import MANIFEST_SCHEMA, read_ledger
from pipeline.cli import main
from pipeline.config.settings import UpscaleJob
from pipeline.io.storage import Files, join

FILES = Files()  # no storage options: local files and the loopback S3 of the environment

pytestmark = [pytest.mark.integration, pytest.mark.slow]
LISTINGS = ("find", "ls", "walk", "glob", "du")
READS = ("open", "cat", "cat_file", "read_bytes")


@pytest.fixture
def storage_calls(monkeypatch):
    """(method, path) of every listing and read this process makes through fsspec, and of every
    ``Files.read_bytes`` (local files are read without fsspec)."""
    calls: list[tuple[str, str]] = []

    def recording(name, method):
        def call(self, path, *args, **kwargs):
            calls.append((name, str(path)))
            return method(self, path, *args, **kwargs)

        return call

    for cls in (AbstractFileSystem, LocalFileSystem, S3FileSystem):
        for name in LISTINGS + READS:
            if name in cls.__dict__:
                monkeypatch.setattr(cls, name, recording(name, cls.__dict__[name]))
    read_bytes = Files.read_bytes

    def reading(self, location):
        calls.append(("read_bytes", location))
        return read_bytes(self, location)

    monkeypatch.setattr(Files, "read_bytes", reading)
    return calls


def _under(path: str, root: str) -> bool:
    path, root = path.removeprefix("s3://").rstrip("/"), root.removeprefix("s3://").rstrip("/")
    return path == root or path.startswith(root + "/")


class Place:
    """A source and a destination, local or on S3, and a way to write source files."""

    def __init__(self, kind: str, tmp_path):
        self.kind = kind
        if kind == "local":
            self.source, self.dest = str(tmp_path / "in"), str(tmp_path / "out")
        else:
            bucket = f"nightly-{uuid.uuid4().hex[:8]}"
            boto3.client("s3").create_bucket(Bucket=bucket)
            self.bucket, self.source, self.dest = bucket, f"s3://{bucket}/in", f"s3://{bucket}/out"

    def put(self, rel: str, data: bytes) -> None:
        FILES.write_bytes(join(self.source, rel), data)

    def pngs(self) -> list[str]:
        files = FILES.list_files(self.dest)
        return sorted(f for f in files if f.endswith(".png") and not f.startswith(("_", "parquet/")))


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path, s3_server):
    return Place(request.param, tmp_path)


def test_a_rerun_processes_exactly_the_new_and_changed_inputs_without_reading_outputs(
    local_ray, place, benchmarks_dir, weights_dir, storage_calls, capsys
):
    set5 = sorted((benchmarks_dir / "Set5/LR_bicubic/X4").glob("*.png"))
    set14 = sorted((benchmarks_dir / "Set14/LR_bicubic/X4").glob("*.png"))[:5]
    for p in set5:
        place.put(f"day1/{p.name}", p.read_bytes())
    place.put("broken.png", b"\x89PNG\r\n\x1a\n broken")
    weights = str(weights_dir / "PANx4_DF2K.pth")
    job = UpscaleJob(
        source=place.source, dest=place.dest, scale=4, weights=weights, format="both", max_attempts=2
    )
    first = run_upscale(job)
    assert (first.succeeded, first.failed) == (5, 1)

    for p in set14:  # 5 new files, and 1 changed
        place.put(f"day2/{p.name}", p.read_bytes())
    place.put("day1/birdx4.png", set14[0].read_bytes())
    storage_calls.clear()
    second = run_upscale(job)
    assert (second.succeeded, second.failed, second.skipped) == (6, 1, 4)
    assert second.files == {"new": 5, "changed": 1, "retried": 1, "unfinished": 0, "redone": 0}
    # Knowing what to do cost no listing of the outputs and no read of a Parquet part: only the
    # source, the ledger (_runs) and the destination's own small files.
    listed = {p for m, p in storage_calls if m in LISTINGS and _under(p, place.dest)}
    assert listed and all(_under(p, f"{place.dest}/_runs") for p in listed), listed
    assert not [p for m, p in storage_calls if m in READS and _under(p, f"{place.dest}/parquet")]

    # The input that always fails was tried --max-attempts 2 times: now it is given up on.
    third = run_upscale(job)
    assert (third.succeeded, third.failed, third.skipped, third.given_up) == (0, 0, 10, 1)
    errors = (
        pq.read_table(f"{place.dest}/_errors").to_pylist()
        if place.kind == "local"
        else _s3_table(place, "_errors")
    )
    assert [e["key"] for e in errors] == ["broken.png", "broken.png"]
    assert {e["run_id"] for e in errors} == {first.run_id, second.run_id}

    assert place.pngs() == sorted(
        [f"day1/{p.stem}.png" for p in set5] + [f"day2/{p.stem}.png" for p in set14]
    )
    table = (
        _s3_table(place, "parquet")
        if place.kind == "s3"
        else pq.read_table(f"{place.dest}/parquet").to_pylist()
    )
    names = Counter(r["name"] for r in table)
    assert set(names) == set(place.pngs()) and names["day1/birdx4.png"] == 2 and names.total() == 11
    # The changed input's newest row (the latest run id) is made from its new bytes.
    bird = max((r for r in table if r["name"] == "day1/birdx4.png"), key=lambda r: r["run_id"])
    assert bird["run_id"] == second.run_id
    assert bird["input_sha256"] == hashlib.sha256(set14[0].read_bytes()).hexdigest()

    entries = read_ledger(place.dest, None, FILES, columns=MANIFEST_SCHEMA.names).entries.to_pylist()
    assert len(entries) == 11 and all(e["weights_sha256"] and e["package_version"] for e in entries)
    assert {e["key"]: e["attempts"] for e in entries if e["status"] == "failed"} == {"broken.png": 2}
    capsys.readouterr()
    assert main(["runs", place.dest]) == 0
    out = capsys.readouterr().out
    assert all(f"|{s.run_id}|finished|" in out for s in (first, second, third))
    assert main(["runs", place.dest, "--failed"]) == 0
    assert "|broken.png|2|TruncatedImageError: truncated PNG" in capsys.readouterr().out


def _s3_table(place: Place, folder: str) -> list[dict]:
    import s3fs

    fs = s3fs.S3FileSystem()
    files = sorted(fs.find(f"{place.bucket}/out/{folder}"))
    return [row for f in files for row in pq.read_table(fs.open(f, "rb")).to_pylist()]


def test_a_destination_made_before_the_ledger_is_adopted_once(
    local_ray, benchmarks_dir, weights_dir, tmp_path
):
    src, dest = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for p in sorted((benchmarks_dir / "Set5/LR_bicubic/X4").glob("*.png")):
        shutil.copy(p, src / p.name)
    job = UpscaleJob(source=str(src), dest=str(dest), scale=4, weights=str(weights_dir / "PANx4_DF2K.pth"))
    run_upscale(job)
    shutil.rmtree(dest / "_runs")  # as an older pan left it: outputs, no ledger
    (dest / "babyx4.png").unlink()
    adopted = run_upscale(job)
    assert (adopted.succeeded, adopted.skipped) == (1, 4)
    entries = {
        e["key"]: e["status"]
        for e in read_ledger(str(dest), None, FILES, columns=MANIFEST_SCHEMA.names).entries.to_pylist()
    }
    assert entries == {
        "babyx4.png": "succeeded",
        **{k: "adopted" for k in ("birdx4.png", "butterflyx4.png", "headx4.png", "womanx4.png")},
    }
    (dest / "birdx4.png").unlink()  # deleted by hand: the ledger does not know, a rescan does
    assert run_upscale(job).skipped == 5
    assert run_upscale(job.model_copy(update={"rescan_dest": True})).succeeded == 1
    assert (dest / "birdx4.png").exists()
