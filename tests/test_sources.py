import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.batch.sources import COLLISION, HIDDEN, OTHER, InputUnit, list_inputs, read_unit
from pipeline.io.storage import Files

FILES = Files()  # no storage options: local files and the loopback S3 of the environment


def test_shard_members_that_share_an_output_name_are_collisions(tmp_path):
    pq.write_table(
        pa.table({"key": ["x/a.jpg", "y/a.jpg", "b"], "image": [b"1", b"2", b"3"]}), tmp_path / "s.parquet"
    )
    unit = InputUnit(str(tmp_path / "s.parquet"), "s.parquet", "parquet")
    rows = list(read_unit(unit, ("png",), "image", FILES))
    assert [(r.key, r.name, r.error_type) for r in rows] == [
        ("s.parquet/x/a.jpg", "s/a.png", ""),
        ("s.parquet/y/a.jpg", "s/a.png", COLLISION),
        ("s.parquet/b", "s/b.png", ""),
    ]
    assert rows[0].data == b"1" and rows[1].data is None and not rows[1].skipped


def test_members_already_written_to_every_sink_are_skipped(tmp_path):
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        for name in ("a.png", "b.png", "c.json"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    written = {"png": frozenset({"t/a.png", "t/b.png"}), "parquet": frozenset({"t/a.png"})}
    unit = InputUnit(str(tmp_path / "t.tar"), "t.tar", "tar", written=written)
    rows = {r.name: r for r in read_unit(unit, ("png", "parquet"), "image", FILES)}
    assert set(rows) == {"t/a.png", "t/b.png"}  # the .json member is no image
    assert rows["t/a.png"].skipped and rows["t/a.png"].data is None
    assert rows["t/b.png"].sinks == ("parquet",) and rows["t/b.png"].data == b"x"  # half done: finished


def test_a_destination_inside_the_source_is_left_out(tmp_path):
    for name in ("a.png", "out/a.png", "out/sub/b.png", "outside.png", "_errors/x.png", ".hidden.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [u.rel for u in list_inputs(str(tmp_path), FILES).units] == [
        "_errors/x.png",
        "a.png",
        "out/a.png",
        "out/sub/b.png",
        "outside.png",
    ]
    listing = list_inputs(str(tmp_path), FILES, exclude="out")
    assert [u.rel for u in listing.units] == ["_errors/x.png", "a.png", "outside.png"]
    assert listing.ignored == {HIDDEN: 1}  # the destination's own files are neither inputs nor counted


def test_underscore_names_are_inputs_and_what_is_not_an_input_is_counted(tmp_path):
    names = ["_DSC0001.png", "_2024/head.png", "DSC0002.png", ".DS_Store", ".git/config", ".cache/a.png",
             "notes.txt", "raw/b.heic", "c.PNG", "d.parquet", "e.tar"]  # fmt: skip
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    listing = list_inputs(str(tmp_path), FILES)
    assert [(u.rel, u.kind) for u in listing.units] == [
        ("DSC0002.png", "image"),
        ("_2024/head.png", "image"),
        ("_DSC0001.png", "image"),
        ("c.PNG", "image"),
        ("d.parquet", "parquet"),
        ("e.tar", "tar"),
    ]
    assert listing.ignored == {HIDDEN: 3, OTHER: 2}
    assert listing.examples == {HIDDEN: (".DS_Store", ".cache/a.png", ".git/config"),
                                OTHER: ("notes.txt", "raw/b.heic")}  # fmt: skip


def test_shard_members_whose_name_another_input_owns_are_collisions(tmp_path):
    pq.write_table(pa.table({"key": ["a.jpg", "b.jpg"], "image": [b"1", b"2"]}), tmp_path / "s.parquet")
    unit = InputUnit(str(tmp_path / "s.parquet"), "s.parquet", "parquet", taken={"s/a.png": "s/a.jpg"})
    rows = list(read_unit(unit, ("png",), "image", FILES))
    assert [(r.key, r.error_type) for r in rows] == [("s.parquet/a.jpg", COLLISION), ("s.parquet/b.jpg", "")]
    assert "s/a.png is taken by the input s/a.jpg" in rows[0].error


def test_each_input_file_has_the_size_and_version_the_ledger_compares(tmp_path):
    (tmp_path / "a.png").write_bytes(b"12345")
    (unit,) = list_inputs(str(tmp_path), FILES).units
    assert unit.size == 5 and unit.version
    before = unit.version
    import os

    os.utime(tmp_path / "a.png", ns=(1, 10**18))
    (again,) = list_inputs(str(tmp_path), FILES).units
    assert again.size == 5 and again.version != before  # same size, new modification time
    (single,) = list_inputs(str(tmp_path / "a.png"), FILES).units
    assert (single.size, single.version) == (again.size, again.version)
