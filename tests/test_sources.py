import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sources import COLLISION, InputUnit, list_inputs, read_unit


def test_shard_members_that_share_an_output_name_are_collisions(tmp_path):
    pq.write_table(
        pa.table({"key": ["x/a.jpg", "y/a.jpg", "b"], "image": [b"1", b"2", b"3"]}), tmp_path / "s.parquet"
    )
    unit = InputUnit(str(tmp_path / "s.parquet"), "s.parquet", "parquet")
    rows = list(read_unit(unit, ("png",), "image", {}))
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
    rows = {r.name: r for r in read_unit(unit, ("png", "parquet"), "image", {})}
    assert set(rows) == {"t/a.png", "t/b.png"}  # the .json member is no image
    assert rows["t/a.png"].skipped and rows["t/a.png"].data is None
    assert rows["t/b.png"].sinks == ("parquet",) and rows["t/b.png"].data == b"x"  # half done: finished


def test_a_destination_inside_the_source_is_left_out(tmp_path):
    for name in ("a.png", "out/a.png", "out/sub/b.png", "outside.png", "_errors/x.png", ".hidden.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [u.rel for u in list_inputs(str(tmp_path))] == [
        "a.png",
        "out/a.png",
        "out/sub/b.png",
        "outside.png",
    ]
    assert [u.rel for u in list_inputs(str(tmp_path), exclude="out")] == ["a.png", "outside.png"]


def test_each_input_file_has_the_size_and_version_the_ledger_compares(tmp_path):
    (tmp_path / "a.png").write_bytes(b"12345")
    (unit,) = list_inputs(str(tmp_path))
    assert unit.size == 5 and unit.version
    before = unit.version
    import os

    os.utime(tmp_path / "a.png", ns=(1, 10**18))
    (again,) = list_inputs(str(tmp_path))
    assert again.size == 5 and again.version != before  # same size, new modification time
    (single,) = list_inputs(str(tmp_path / "a.png"))
    assert (single.size, single.version) == (again.size, again.version)
